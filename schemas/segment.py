"""Segment spec messages (track, page, screen, identify, group, alias) -> canonical usage
events, and group traits the policy maps -> ``account_traits`` events (pure).

What Segment's spec pages print, old and new, is accepted: ``messageId`` is *implicit* (set
by Segment's libraries, absent from raw producers), so its absence is not an error; the
account may be ``context.groupId`` or the user's traits in ``context.traits`` (the same traits
an identify call carries: ``groupId``, ``account_id``, ``company.id``, whose id may be a string
or a number); ``timestamp`` may be missing (then ``originalTimestamp``, ``receivedAt``,
``sentAt``); ``properties`` may be missing; ``version`` may be ``"1.1"`` or ``2``; and a body
posted to the HTTP Tracking API's ``/v1/track`` endpoint has no ``type`` at all.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any

import orjson

from churnsignal.schemas import identity
from churnsignal.schemas._util import dict_at, get_in, str_id, text

# A group trait kept as an account attribute: its value cut to this many characters.
TRAIT_VALUE_MAX = 64

SEGMENT_CALLS = frozenset({"track", "page", "screen", "identify", "group", "alias"})

# Words in a track event's name that tell its kind; anything else is a generic usage event.
_SESSION_WORDS = ("login", "logged in", "signed in", "sign in", "session")
_EXPORT_WORDS = ("export", "download")
_INTEGRATION_WORDS = ("integration", "connected", "api key")

# Top-level fields that say how a message travelled, not what happened: Segment's servers set
# receivedAt, version, channel and projectId, clients set sentAt at each (re)send, and
# writeKey / _metadata are credentials and routing. They are left out of a derived event id
# so that the same message resent, or relayed with or without them, keeps one id.
_TRANSPORT_FIELDS = frozenset({"messageId", "receivedAt", "sentAt", "version", "channel",
                               "projectId", "writeKey", "_metadata"})


def call_of(payload: dict[str, Any]) -> str | None:
    """The call type: ``type``, or ``track`` for an HTTP-API track body (``event``, no type)."""
    call = payload.get("type")
    if isinstance(call, str):
        return call if call in SEGMENT_CALLS else None
    if call is None and isinstance(payload.get("event"), str):
        return "track"
    return None


def looks_like_segment(payload: dict[str, Any]) -> bool:
    return call_of(payload) is not None and (
        "messageId" in payload or "userId" in payload or "anonymousId" in payload
    )


def event_id(payload: dict[str, Any]) -> str:
    """``messageId``, else an id derived from the message's content: the SHA-256 of its
    canonical JSON (keys sorted, orjson's compact form) without the transport fields above.
    The same message decodes to the same id every time, so redelivery and replay stay
    idempotent; two messages identical in every other field (same user, event, properties
    and timestamp to the millisecond) are taken as one.

    Raises ValueError when the message is nested too deeply to serialise (decode rejects it as
    ``invalid``): no real Segment message is, and a random id would break idempotency."""
    given = str_id(payload.get("messageId"))
    if given is not None:
        return given
    content = {k: v for k, v in payload.items() if k not in _TRANSPORT_FIELDS}
    try:
        canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"no messageId, and the message cannot be hashed for one: {exc}") from None
    return "segment-" + hashlib.sha256(canonical).hexdigest()[:40]


def _kind(name: str, properties: dict[str, Any], activation: frozenset[str]) -> str:
    return _kind_of(name, bool(properties.get("feature")), activation)


@functools.lru_cache(maxsize=8192)  # a product sends a few hundred distinct event names
def _kind_of(name: str, has_feature: bool, activation: frozenset[str]) -> str:
    lowered = name.lower()
    if lowered in activation:
        return "activation"
    if any(w in lowered for w in _SESSION_WORDS):
        return "session"
    if any(w in lowered for w in _EXPORT_WORDS):
        return "export"
    if any(w in lowered for w in _INTEGRATION_WORDS):
        return "integration"
    if has_feature:
        return "feature_used"
    return "track"


def _traits_account(traits: Any) -> str | None:
    """The account a user's traits name (identify traits, or the same in context.traits)."""
    return (str_id(get_in(traits, "groupId"))
            or str_id(get_in(traits, "account_id"))
            or str_id(get_in(traits, "company", "id")))


def _account(payload: dict[str, Any], properties: dict[str, Any] | None = None) -> str | None:
    """The account a call names: context.groupId, properties (``dict_at(payload,
    "properties")``, when the caller has it already) or context traits."""
    if properties is None:
        properties = dict_at(payload, "properties")
    context = dict_at(payload, "context")
    return (
        str_id(context.get("groupId"))
        or str_id(properties.get("account_id"))
        or str_id(properties.get("groupId"))
        or _traits_account(context.get("traits"))
    )


def _person(payload: dict[str, Any]) -> str | None:
    """The identity key of the call's user (or anonymous visitor), to find the account by."""
    user = str_id(payload.get("userId"))
    if user is not None:
        return identity.segment_user(user)
    anonymous = str_id(payload.get("anonymousId"))
    return identity.segment_anonymous(anonymous) if anonymous is not None else None


def links(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(identity key, what it leads to) pairs a call teaches: a Group call (user -> account),
    an Identify call (anonymous -> user, and user -> account from traits.groupId /
    account_id / company.id). Track and page calls teach nothing: most name their account
    anyway, and a link per user would cost a state per user for little."""
    call = call_of(payload)
    if call != "group" and call != "identify":
        return []
    user = str_id(payload.get("userId"))
    anonymous = str_id(payload.get("anonymousId"))
    if call == "group":
        account = str_id(payload.get("groupId"))
    else:
        account = _traits_account(payload.get("traits"))
    out: list[tuple[str, str]] = []
    if account is not None and user is not None:
        out.append((identity.segment_user(user), account))
    if anonymous is not None and (account is not None or user is not None):
        out.append((identity.segment_anonymous(anonymous),
                    account if account is not None else identity.segment_user(user or "")))
    return out


def trait_value(value: Any) -> str | None:
    """A trait's value as an attribute value: text (cut to TRAIT_VALUE_MAX), a number or a
    boolean as text; None for null, an empty text or anything else (objects, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)[:TRAIT_VALUE_MAX]
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return (str(int(value)) if value.is_integer() and abs(value) < 1e15
                else repr(value))[:TRAIT_VALUE_MAX]
    if isinstance(value, str):
        value = value.strip()
        return value[:TRAIT_VALUE_MAX] or None
    return None


def pick_traits(traits: Any, keys: frozenset[str]) -> dict[str, str | None]:
    """The wanted trait keys a group call's ``traits`` carries (a null, empty or unusable
    value as None: it clears the attribute). Empty when it carries none of them."""
    if not keys or not isinstance(traits, dict):
        return {}
    return {key: trait_value(traits[key]) for key in sorted(keys) if key in traits}


def _timestamp(payload: dict[str, Any]) -> Any:
    return (payload.get("timestamp") or payload.get("originalTimestamp")
            or payload.get("receivedAt") or payload.get("sentAt"))


def account_traits(payload: dict[str, Any], trait_keys: frozenset[str]) -> dict[str, Any] | None:
    """A group call's traits among ``trait_keys`` (the policy's accounts.traits) as a canonical
    ``account_traits`` event of its ``groupId``; None when it names no account or time, or
    carries none of them (the call then only teaches its links)."""
    account = str_id(payload.get("groupId"))
    timestamp = _timestamp(payload)
    traits = pick_traits(payload.get("traits"), trait_keys)
    if account is None or not timestamp or not traits:
        return None
    return {
        "event_id": event_id(payload),
        "account_id": account,
        "user_id": str_id(payload.get("userId")) or str_id(payload.get("anonymousId")),
        "type": "account_traits",
        "occurred_at": timestamp,
        "data": {"traits": traits},
    }


def to_canonical(
    payload: dict[str, Any], activation: frozenset[str] = frozenset(),
    trait_keys: frozenset[str] = frozenset(),
) -> dict[str, Any] | str:
    """A canonical usage event dict (or, for a group call with traits among ``trait_keys``,
    an ``account_traits`` event), or a skip reason for calls that carry neither."""
    call = call_of(payload)
    if call is None:
        raise ValueError("not a Segment call: no type and no event name")
    if call == "group" and trait_keys:
        return account_traits(payload, trait_keys) or "segment_unused"
    if call in ("identify", "group", "alias"):
        return "segment_unused"
    properties = dict_at(payload, "properties")
    account = _account(payload, properties) or _person(payload)
    if account is None:
        return "unattributed"
    if call == "track":
        name = text(payload.get("event")) or ""
    else:
        name = f"{call}:{text(payload.get('name')) or text(properties.get('path')) or ''}"
    kind = "session" if call in ("page", "screen") else _kind(name, properties, activation)
    feature = text(properties.get("feature")) or (name if kind == "feature_used" else None)
    timestamp = _timestamp(payload)
    return {
        "event_id": event_id(payload),
        "account_id": account,
        "user_id": str_id(payload.get("userId")) or str_id(payload.get("anonymousId")),
        "type": kind,
        "occurred_at": timestamp,
        "data": {"name": name[:200] or None, "feature": feature[:200] if feature else None},
    }
