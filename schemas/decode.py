"""Bytes from any source topic -> Accepted canonical event, Skipped, or Rejected (pure, bulk-friendly)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from churnsignal.schemas import segment, stripe, zendesk
from churnsignal.schemas.events import EVENT_ADAPTER, EVENT_TYPES
from churnsignal.schemas.results import Accepted, Decoded, Rejected, Skipped

Source = Literal["auto", "canonical", "stripe", "segment", "zendesk"]
_MAX_DETAIL = 300


class DecodeOptions:
    """What decoding needs to know beyond the bytes: limits, source pinning, account mapping."""

    __slots__ = ("account_key", "activation_events", "max_age_s", "max_bytes", "max_future_s")

    def __init__(
        self,
        *,
        max_bytes: int = 256_000,
        max_future_s: float = 86_400.0,
        max_age_s: float = 90 * 86_400.0,
        account_key: str = "account_id",
        activation_events: Iterable[str] = (),
    ) -> None:
        self.max_bytes = max_bytes
        self.max_future_s = max_future_s
        self.max_age_s = max_age_s
        self.account_key = account_key
        self.activation_events = frozenset(e.lower() for e in activation_events)


def detect(payload: dict[str, Any]) -> str | None:
    """Which producer shape this is; None when none matches."""
    if "event_id" in payload and "account_id" in payload:
        return "canonical"
    if stripe.looks_like_stripe(payload):
        return "stripe"
    if segment.looks_like_segment(payload):
        return "segment"
    if zendesk.looks_like_zendesk(payload):
        return "zendesk"
    return None


def _short(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{exc.error_count()} error(s); {loc}: {first['msg']}"[:_MAX_DETAIL]


def decode(raw: bytes | None, opts: DecodeOptions, now: float, source: Source = "auto") -> Decoded:
    """Decode one message. Never raises for bad data: every problem is a Rejected with a reason."""
    if raw is None:
        return Rejected("empty", "message has no value (tombstone)")
    if len(raw) > opts.max_bytes:
        return Rejected("too_large", f"{len(raw)} bytes > limit {opts.max_bytes}")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected("not_json", str(exc)[:_MAX_DETAIL])
    if not isinstance(payload, dict):
        return Rejected("not_object", f"top-level JSON is {type(payload).__name__}, not an object")
    kind: str | None = source
    links: tuple[tuple[str, str], ...] = ()
    try:
        if source == "auto":
            kind = detect(payload)
        elif detect(payload) != source:
            return Rejected("source_mismatch", f"topic is pinned to {source} payloads; this "
                            f"one looks like {detect(payload) or 'none of the known sources'}")
        if kind == "canonical":
            event_type = payload.get("type")
            if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
                return Rejected("unknown_type", f"type {str(payload.get('type'))[:80]!r}")
            candidate: dict[str, Any] | str = payload
        elif kind == "stripe":
            candidate = stripe.to_canonical(payload, opts.account_key)
            links = tuple(stripe.links(payload, opts.account_key))
        elif kind == "segment":
            candidate = segment.to_canonical(payload, opts.activation_events)
            links = tuple(segment.links(payload))
        elif kind == "zendesk":
            candidate = zendesk.to_canonical(payload)
        else:
            return Rejected("unknown_source", "not a canonical, Stripe, Segment or Zendesk payload")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        return Rejected("invalid", f"{kind} payload: {type(exc).__name__}: {exc}"[:_MAX_DETAIL])
    if isinstance(candidate, str):
        return Skipped(candidate, links)
    try:
        event = EVENT_ADAPTER.validate_python(candidate)
    except ValidationError as exc:
        return Rejected("invalid", f"{kind}: {_short(exc)}")
    ts = event.occurred_at.timestamp()
    if ts > now + opts.max_future_s:
        when = datetime.fromtimestamp(ts, tz=UTC).isoformat()
        return Rejected("future_timestamp", f"occurred_at {when} is beyond the allowed skew")
    if ts < now - opts.max_age_s:
        when = datetime.fromtimestamp(ts, tz=UTC).isoformat()
        return Rejected("too_old", f"occurred_at {when} is older than the state horizon")
    return Accepted(event, links)
