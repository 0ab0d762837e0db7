"""What the gateway checks in an authentic webhook body, and the record key (pure).

The body written is always the exact bytes that were signed. A body that is not a JSON object
is refused (400); a JSON object the worker would reject (``schemas.decode`` with the
provider pinned) is dead-lettered and answered 200, since the provider's retries would only
send the same bytes again; everything else goes to the source topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from churnsignal.schemas import intercom, zendesk
from churnsignal.schemas._util import dict_at, get_in, str_id
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Rejected

Provider = Literal["stripe", "zendesk", "intercom"]

THIN_EVENT = ("Stripe thin events (object v2.core.event) are not accepted: they carry no "
              "object, only its id, and reading it needs a Stripe API key the gateway does "
              "not hold. Send snapshot events to this endpoint (a v1 webhook endpoint or an "
              "event destination with the snapshot payload style).")


@dataclass(frozen=True, slots=True)
class Verdict:
    key: bytes | None
    rejected: Rejected | None = None  # dead-letter instead of the source topic


def _key(value: str | None) -> bytes | None:
    return value.encode("utf-8", "replace")[:400] if value else None


def stripe_key(payload: dict[str, Any], account_key: str = "account_id") -> str | None:
    """The account in the object's metadata (or its subscription_details'), else its
    customer (the object itself, for a customer)."""
    obj = dict_at(payload, "data", "object")
    account = (str_id(get_in(obj, "metadata", account_key))
               or str_id(get_in(obj, "subscription_details", "metadata", account_key)))
    if account:
        return account
    if obj.get("object") == "customer":
        return str_id(obj.get("id"))
    return str_id(obj.get("customer"))


def zendesk_key(payload: dict[str, Any]) -> str | None:
    """The ticket's or user's organization, else its requester (the user, for a user event)."""
    ticket = payload.get("ticket")
    detail = ticket if isinstance(ticket, dict) else dict_at(payload, "detail")
    org = str_id(detail.get("organization_id"))
    if org not in (None, "0"):
        return org
    kind = payload.get("type")
    if isinstance(kind, str) and kind.startswith(zendesk.EVENT_PREFIX + "user."):
        return str_id(detail.get("id"))
    return str_id(detail.get("requester_id"))


def intercom_key(payload: dict[str, Any]) -> str | None:
    """The company the notification names (see schemas.intercom), else its contact."""
    item = dict_at(payload, "data", "item")
    account, contact = intercom._account(item)  # noqa: SLF001 - the worker's own rule
    if account is not None and not account.startswith("~"):
        return account
    for pair in intercom.links(payload):
        return pair[1]
    return contact or str_id(item.get("id"))


def thin_stripe_event(payload: dict[str, Any]) -> bool:
    return payload.get("object") == "v2.core.event"


def verdict(provider: Provider, payload: dict[str, Any], raw: bytes, opts: DecodeOptions,
            now: float) -> Verdict:
    """The record key, and whether the worker would reject the body."""
    if provider == "stripe":
        key = stripe_key(payload, opts.account_key)
    elif provider == "zendesk":
        key = zendesk_key(payload)
    else:
        key = intercom_key(payload)
    result = decode(raw, opts, now, provider)
    return Verdict(_key(key), result if isinstance(result, Rejected) else None)
