"""Stripe webhook Event objects -> canonical billing events (pure)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Any, get_args

from churnsignal.schemas import identity
from churnsignal.schemas._util import (
    dict_at,
    epoch_to_iso,
    get_in,
    integer,
    number,
    show,
    str_id,
    text,
)
from churnsignal.schemas.events import SubscriptionStatus

# Stripe event type -> canonical type. Types not listed are valid but unused (skipped, counted).
TYPE_MAP = {
    "customer.subscription.created": "subscription_created",
    "customer.subscription.updated": "subscription_updated",
    "customer.subscription.deleted": "subscription_deleted",
    "customer.subscription.paused": "subscription_paused",
    "customer.subscription.resumed": "subscription_resumed",
    "customer.subscription.trial_will_end": "trial_will_end",
    "invoice.paid": "invoice_paid",
    "invoice.payment_succeeded": "invoice_paid",
    "invoice.payment_failed": "payment_failed",
    "invoice.payment_action_required": "payment_action_required",
    "invoice.upcoming": "invoice_upcoming",
    "charge.failed": "charge_failed",
    "charge.dispute.created": "dispute_created",
    "customer.source.expiring": "card_expiring",
    "payment_method.automatically_updated": "payment_method_updated",
}

# Months per recurring interval, to normalise a price to a monthly amount.
_MONTHS = {"day": 12 / 365, "week": 12 / 52, "month": 1.0, "year": 12.0}
# Beyond these a provider value is garbage, not a customer: the field becomes unknown (None)
# and the event is kept. 10^12 cents is $10bn a month, and sums of such stay within Int64.
MAX_CENTS = 10**12
MAX_SEATS = 10_000_000  # the contract's own limit (SubscriptionData.seats)
_STATUSES = frozenset(get_args(SubscriptionStatus))


def looks_like_stripe(payload: dict[str, Any]) -> bool:
    return payload.get("object") == "event" and isinstance(get_in(payload, "data", "object"), dict)


def monthly_cents(subscription: dict[str, Any]) -> tuple[int | None, int | None]:
    """(MRR in minor units, seats) of a Stripe subscription, from its items' prices; (None,
    None) when any item is unreadable (an unknown MRR, rather than a wrong one)."""
    items = get_in(subscription, "items", "data")
    if not isinstance(items, list):
        return None, None
    total = 0.0
    seats = 0
    for item in items:
        if not isinstance(item, dict):
            return None, None
        price = item.get("price") or item.get("plan")
        price = price if isinstance(price, dict) else {}
        recurring = dict_at(price, "recurring") or price
        interval = recurring.get("interval")
        raw_count = recurring.get("interval_count")
        count = 1 if raw_count is None else integer(raw_count, 1, 1000)
        raw_quantity = item.get("quantity")  # absent for metered prices: one unit
        quantity = 1 if raw_quantity is None else integer(raw_quantity, 0, MAX_SEATS)
        if count is None or quantity is None:
            return None, None
        seats += quantity
        amount = number(price.get("unit_amount", price.get("amount")), 0, MAX_CENTS)
        if isinstance(interval, str) and interval in _MONTHS and amount is not None:
            total += amount * quantity / (_MONTHS[interval] * count)
    known_seats = seats if seats <= MAX_SEATS else None
    raw_discount = get_in(subscription, "discount", "coupon", "percent_off")
    discount = 0.0 if raw_discount is None else number(raw_discount, 0, 100)
    if discount is None:
        return None, known_seats
    mrr = round(total * (1 - discount / 100))  # finite: every factor above is bounded
    return (mrr if mrr <= MAX_CENTS else None), known_seats


def _plan_name(subscription: dict[str, Any]) -> str | None:
    items = get_in(subscription, "items", "data")
    if isinstance(items, list) and items and isinstance(items[0], dict):
        price = items[0].get("price") or items[0].get("plan")
        price = price if isinstance(price, dict) else {}
        name = str_id(price.get("lookup_key") or price.get("nickname") or price.get("id"))
    else:
        name = str_id(get_in(subscription, "plan", "id"))
    return text(name)


def _period_end(subscription: dict[str, Any]) -> Any:
    """current_period_end moved from the subscription to its items in newer API versions."""
    if subscription.get("current_period_end") is not None:
        return subscription["current_period_end"]
    items = get_in(subscription, "items", "data")
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return items[0].get("current_period_end")
    return None


def _metadata_account(obj: dict[str, Any], key: str) -> str | None:
    """metadata[key] on the object, or on its subscription details."""
    for path in (("metadata",), ("subscription_details", "metadata"),
                 ("parent", "subscription_details", "metadata")):
        account = str_id(get_in(obj, *path, key))
        if account is not None:
            return account
    return None


def _charge_id(obj: dict[str, Any]) -> str | None:
    if obj.get("object") == "charge":
        return str_id(obj.get("id"))
    return str_id(obj.get("charge"))  # invoices and disputes name their charge


def _account(obj: dict[str, Any], key: str) -> str | None:
    """The account, or the identity key that will lead to it: metadata, else the customer
    (its link learned from subscription events, else its own id), else the charge."""
    account = _metadata_account(obj, key)
    if account is not None:
        return account
    customer = str_id(obj.get("customer"))
    if customer is not None:
        return identity.stripe_customer(customer)
    charge = _charge_id(obj)
    return identity.stripe_charge(charge) if charge is not None else None


def links(payload: dict[str, Any], account_key: str = "account_id") -> list[tuple[str, str]]:
    """(identity key, what it leads to) pairs this Event teaches, whatever its type:
    customer -> account (metadata on the object), charge -> customer or account."""
    obj = get_in(payload, "data", "object")
    if not isinstance(obj, dict):
        return []
    out: list[tuple[str, str]] = []
    account = _metadata_account(obj, account_key)
    customer = str_id(obj.get("id")) if obj.get("object") == "customer" else str_id(
        obj.get("customer"))
    if customer is not None and account is not None:
        out.append((identity.stripe_customer(customer), account))
    charge = _charge_id(obj)
    if charge is not None and (account is not None or customer is not None):
        out.append((identity.stripe_charge(charge),
                    account if account is not None else identity.stripe_customer(customer or "")))
    return out


def snapshot_links(account: str, customer: str | None) -> list[tuple[str, str]]:
    """The link a subscription snapshot (``churnsignal import``/``sync stripe``) teaches: its
    Stripe customer -> its account, when the account is not the customer itself (that is the
    fallback already, and a link to it would override a metadata link learned elsewhere)."""
    if (customer is None or not customer or identity.is_identity(account)
            or account == customer):
        return []
    return [(identity.stripe_customer(customer), account)]


def _card_expiry(obj: dict[str, Any]) -> str | None:
    card = dict_at(obj, "card") or obj
    month, year = integer(card.get("exp_month"), 1, 12), integer(card.get("exp_year"), 1, 9999)
    if month is None or year is None:
        return None
    last_day = calendar.monthrange(year, month)[1]
    return datetime(year, month, last_day, 23, 59, 59, tzinfo=UTC).isoformat()


def _currency(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 3 else None


def to_canonical(payload: dict[str, Any], account_key: str = "account_id") -> dict[str, Any] | str:
    """A canonical event dict, or a skip reason string for valid events we do not use.

    Required fields that are unreadable raise ValueError (decode rejects the event as
    ``invalid`` with the message); optional ones become None (unknown) and the event is kept.
    """
    stripe_type = payload.get("type")
    canonical = TYPE_MAP.get(stripe_type) if isinstance(stripe_type, str) else None
    if canonical is None:
        return "stripe_unused"  # bounded: the type itself is input, not a metric label
    obj = dict_at(payload, "data", "object")
    occurred_at = epoch_to_iso(payload.get("created"))
    if occurred_at is None:
        raise ValueError(f"created {show(payload.get('created'))} is not a Unix time "
                         "within years 1-9999")
    account = _account(obj, account_key)
    if account is None:
        return "unattributed"
    data: dict[str, Any]
    if canonical.startswith("subscription_") or canonical == "trial_will_end":
        mrr, seats = monthly_cents(obj)
        previous = get_in(payload, "data", "previous_attributes")
        prev_mrr = None
        if isinstance(previous, dict) and "items" in previous:
            prev_mrr, _ = monthly_cents({**obj, **previous})
        status = obj.get("status")
        status = status if isinstance(status, str) and status in _STATUSES else None
        if canonical == "subscription_deleted":
            status = "canceled"
        data = {
            "subscription_id": str_id(obj.get("id")),
            "status": status,
            "plan": _plan_name(obj),
            "seats": seats,
            "mrr_cents": mrr,
            "previous_mrr_cents": prev_mrr,
            "currency": _currency(obj.get("currency")),
            "cancel_at_period_end": obj.get("cancel_at_period_end") is True
            or obj.get("cancel_at") is not None,
            "current_period_end": epoch_to_iso(_period_end(obj)),
            "pause_resumes_at": epoch_to_iso(get_in(obj, "pause_collection", "resumes_at")),
            "trial_end": epoch_to_iso(obj.get("trial_end")),
            "cancellation_reason": text(get_in(obj, "cancellation_details", "reason")),
        }
        if get_in(obj, "pause_collection", "behavior") and status == "active":
            data["status"] = "paused"
    elif canonical in ("card_expiring", "payment_method_updated"):
        data = {"expires_at": _card_expiry(obj)}
    else:
        data = {
            "invoice_id": str_id(obj.get("id")) if obj.get("object") == "invoice" else None,
            "amount_cents": integer(obj.get("amount_due", obj.get("amount")), 0, MAX_CENTS),
            "currency": _currency(obj.get("currency")),
            "attempt_count": integer(obj.get("attempt_count"), 0, 1000),
            "next_attempt_at": epoch_to_iso(obj.get("next_payment_attempt")),
        }
    return {
        "event_id": str_id(payload.get("id")),
        "account_id": account,
        "type": canonical,
        "occurred_at": occurred_at,
        "data": data,
    }
