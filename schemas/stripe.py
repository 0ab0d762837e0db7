"""Stripe webhook Event objects -> canonical billing events (pure)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Any

from churnsignal.schemas import identity
from churnsignal.schemas._util import epoch_to_iso, get_in, str_id

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


def looks_like_stripe(payload: dict[str, Any]) -> bool:
    return payload.get("object") == "event" and isinstance(get_in(payload, "data", "object"), dict)


def monthly_cents(subscription: dict[str, Any]) -> tuple[int | None, int | None]:
    """(MRR in minor units, seats) of a Stripe subscription, from its items' prices."""
    items = get_in(subscription, "items", "data")
    if not isinstance(items, list):
        return None, None
    total = 0.0
    seats = 0
    for item in items:
        price = item.get("price") or item.get("plan") or {}
        recurring = price.get("recurring") or price
        interval = recurring.get("interval")
        count = recurring.get("interval_count") or 1
        amount = price.get("unit_amount", price.get("amount"))
        quantity = item.get("quantity") or 1
        seats += int(quantity)
        if interval in _MONTHS and isinstance(amount, int | float) and count:
            total += amount * quantity / (_MONTHS[interval] * count)
    discount_pct = get_in(subscription, "discount", "coupon", "percent_off")
    if isinstance(discount_pct, int | float):
        total *= 1 - discount_pct / 100
    return round(total), seats


def _plan_name(subscription: dict[str, Any]) -> str | None:
    items = get_in(subscription, "items", "data")
    if isinstance(items, list) and items:
        price = items[0].get("price") or items[0].get("plan") or {}
        return str_id(price.get("lookup_key") or price.get("nickname") or price.get("id"))
    return str_id(get_in(subscription, "plan", "id"))


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
        value = get_in(obj, *path, key)
        if value not in (None, ""):
            return str_id(value)
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


def _card_expiry(obj: dict[str, Any]) -> str | None:
    card = obj.get("card") if isinstance(obj.get("card"), dict) else obj
    month, year = card.get("exp_month"), card.get("exp_year")
    if not isinstance(month, int) or not isinstance(year, int) or not 1 <= month <= 12:
        return None
    last_day = calendar.monthrange(year, month)[1]
    return datetime(year, month, last_day, 23, 59, 59, tzinfo=UTC).isoformat()


def to_canonical(payload: dict[str, Any], account_key: str = "account_id") -> dict[str, Any] | str:
    """A canonical event dict, or a skip reason string for valid events we do not use."""
    stripe_type = payload.get("type")
    canonical = TYPE_MAP.get(stripe_type) if isinstance(stripe_type, str) else None
    if canonical is None:
        return f"stripe_unused:{str(stripe_type)[:60]}"
    obj: dict[str, Any] = payload["data"]["object"]
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
        if canonical == "subscription_deleted":
            status = "canceled"
        data = {
            "subscription_id": str_id(obj.get("id")),
            "status": status,
            "plan": _plan_name(obj),
            "seats": seats,
            "mrr_cents": mrr,
            "previous_mrr_cents": prev_mrr,
            "currency": obj.get("currency"),
            "cancel_at_period_end": bool(obj.get("cancel_at_period_end"))
            or obj.get("cancel_at") is not None,
            "current_period_end": epoch_to_iso(_period_end(obj)),
            "pause_resumes_at": epoch_to_iso(get_in(obj, "pause_collection", "resumes_at")),
            "trial_end": epoch_to_iso(obj.get("trial_end")),
            "cancellation_reason": get_in(obj, "cancellation_details", "reason"),
        }
        if get_in(obj, "pause_collection", "behavior") and status == "active":
            data["status"] = "paused"
    elif canonical in ("card_expiring", "payment_method_updated"):
        data = {"expires_at": _card_expiry(obj)}
    else:
        amount = obj.get("amount_due", obj.get("amount"))
        data = {
            "invoice_id": str_id(obj.get("id")) if str(obj.get("object")) == "invoice" else None,
            "amount_cents": amount if isinstance(amount, int) and amount >= 0 else None,
            "currency": obj.get("currency"),
            "attempt_count": obj.get("attempt_count"),
            "next_attempt_at": epoch_to_iso(obj.get("next_payment_attempt")),
        }
    return {
        "event_id": payload.get("id"),
        "account_id": account,
        "type": canonical,
        "occurred_at": epoch_to_iso(payload.get("created")),
        "data": data,
    }
