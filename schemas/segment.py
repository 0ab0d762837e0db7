"""Segment spec messages (track, page, screen, identify, group) -> canonical usage events (pure)."""

from __future__ import annotations

from typing import Any

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


def to_canonical(
    payload: dict[str, Any], activation: frozenset[str] = frozenset()
) -> dict[str, Any] | str:
    """A canonical usage event dict, or a skip reason for calls that carry no usage."""
    call = payload["type"]
    if call in ("identify", "group", "alias"):
        return f"segment_unused:{call}"
    properties = payload.get("properties") if isinstance(payload.get("properties"), dict) else {}
    account = (
        str_id(get_in(payload, "context", "groupId"))
        or str_id(properties.get("account_id"))
        or str_id(properties.get("groupId"))
        or str_id(get_in(payload, "context", "traits", "account_id"))
    )
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
