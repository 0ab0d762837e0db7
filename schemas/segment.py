"""Segment spec messages (track, page, screen, identify, group) -> canonical usage events (pure)."""

from __future__ import annotations

from typing import Any

from churnsignal.schemas import identity
from churnsignal.schemas._util import get_in, str_id

SEGMENT_CALLS = frozenset({"track", "page", "screen", "identify", "group", "alias"})

# Words in a track event's name that tell its kind; anything else is a generic usage event.
_SESSION_WORDS = ("login", "logged in", "signed in", "sign in", "session")
_EXPORT_WORDS = ("export", "download")
_INTEGRATION_WORDS = ("integration", "connected", "api key")


def looks_like_segment(payload: dict[str, Any]) -> bool:
    return payload.get("type") in SEGMENT_CALLS and (
        "messageId" in payload or "userId" in payload or "anonymousId" in payload
    )


def _kind(name: str, properties: dict[str, Any], activation: frozenset[str]) -> str:
    lowered = name.lower()
    if lowered in activation:
        return "activation"
    if any(w in lowered for w in _SESSION_WORDS):
        return "session"
    if any(w in lowered for w in _EXPORT_WORDS):
        return "export"
    if any(w in lowered for w in _INTEGRATION_WORDS):
        return "integration"
    if properties.get("feature"):
        return "feature_used"
    return "track"


def _account(payload: dict[str, Any]) -> str | None:
    """The account a call names: context.groupId, properties or context traits."""
    properties = payload.get("properties") if isinstance(payload.get("properties"), dict) else {}
    return (
        str_id(get_in(payload, "context", "groupId"))
        or str_id(properties.get("account_id"))
        or str_id(properties.get("groupId"))
        or str_id(get_in(payload, "context", "traits", "account_id"))
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
    call = payload.get("type")
    user = str_id(payload.get("userId"))
    anonymous = str_id(payload.get("anonymousId"))
    if call == "group":
        account = str_id(payload.get("groupId"))
    elif call == "identify":
        account = (str_id(get_in(payload, "traits", "groupId"))
                   or str_id(get_in(payload, "traits", "account_id"))
                   or str_id(get_in(payload, "traits", "company", "id")))
    else:
        return []
    out: list[tuple[str, str]] = []
    if account is not None and user is not None:
        out.append((identity.segment_user(user), account))
    if anonymous is not None and (account is not None or user is not None):
        out.append((identity.segment_anonymous(anonymous),
                    account if account is not None else identity.segment_user(user or "")))
    return out


def to_canonical(
    payload: dict[str, Any], activation: frozenset[str] = frozenset()
) -> dict[str, Any] | str:
    """A canonical usage event dict, or a skip reason for calls that carry no usage."""
    call = payload["type"]
    if call in ("identify", "group", "alias"):
        return f"segment_unused:{call}"
    properties = payload.get("properties") if isinstance(payload.get("properties"), dict) else {}
    account = _account(payload) or _person(payload)
    if account is None:
        return "unattributed"
    if call == "track":
        name = str(payload.get("event") or "")
    else:
        name = f"{call}:{payload.get('name') or properties.get('path') or ''}"
    kind = "session" if call in ("page", "screen") else _kind(name, properties, activation)
    feature = properties.get("feature") or (name if kind == "feature_used" else None)
    timestamp = (payload.get("timestamp") or payload.get("originalTimestamp")
                 or payload.get("receivedAt") or payload.get("sentAt"))
    return {
        "event_id": payload.get("messageId"),
        "account_id": account,
        "user_id": str_id(payload.get("userId")) or str_id(payload.get("anonymousId")),
        "type": kind,
        "occurred_at": timestamp,
        "data": {"name": name[:200] or None, "feature": str(feature)[:200] if feature else None},
    }
