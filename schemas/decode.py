"""Bytes from any source topic -> Accepted canonical event, Skipped, or Rejected (pure, bulk-friendly)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from churnsignal.schemas import intercom, segment, stripe, zendesk
from churnsignal.schemas._util import show
from churnsignal.schemas.events import EVENT_ADAPTER, EVENT_TYPES, SNAPSHOT_TYPES, family_of
from churnsignal.schemas.results import Accepted, Decoded, Rejected, Skipped
from churnsignal.schemas.usage_lite import usage_event

SourceName = Literal["auto", "canonical", "stripe", "segment", "zendesk", "intercom"]
# A topic is pinned to one source, or to several (Zendesk and Intercom on support.events).
Source = SourceName | tuple[SourceName, ...]
_MAX_DETAIL = 300

# Every reason a Rejected (dead-lettered) and a Skipped (counted) can carry: bounded sets, never
# built from the input, so they are safe as metric labels and DLQ headers.
REJECT_REASONS = frozenset({
    "empty",             # no value (a tombstone)
    "too_large",         # more bytes than DecodeOptions.max_bytes
    "not_json",          # not JSON (also: nested deeper than 1024, numbers beyond a double)
    "not_object",        # JSON, but not an object
    "source_mismatch",   # the topic is pinned to another source
    "unknown_source",    # none of canonical, Stripe, Segment, Zendesk, Intercom
    "unknown_type",      # a canonical event of a type churnsignal does not know
    "invalid",           # a known source whose payload cannot be read or validated
    "future_timestamp",  # occurred_at beyond DecodeOptions.max_future_s from now
})
SKIP_REASONS = frozenset({
    "too_old",          # older than DecodeOptions.max_age_s: billing/support facts kept as history
    "unattributed",     # names neither an account nor an identity that could lead to one
    "stripe_unused",    # a Stripe Event type churnsignal does not score
    "segment_unused",   # identify, alias, group (without mapped traits): they teach links
    "zendesk_unused",   # a Zendesk event that is not support activity (user, organization, ...)
    "zendesk_unrated",  # a Zendesk CSAT event without a good/bad score
    "intercom_unused",  # an Intercom topic that is not support activity (contacts, companies)
    "intercom_unrated",  # an Intercom conversation rating of 3 stars (neither good nor bad)
})


class DecodeOptions:
    """What decoding needs to know beyond the bytes: limits, source pinning, account mapping."""

    __slots__ = ("account_key", "activation_events", "max_age_s", "max_bytes", "max_future_s",
                 "trait_keys")

    def __init__(
        self,
        *,
        max_bytes: int = 256_000,
        max_future_s: float = 86_400.0,
        max_age_s: float = 90 * 86_400.0,
        account_key: str = "account_id",
        activation_events: Iterable[str] = (),
        trait_keys: Iterable[str] = (),
    ) -> None:
        self.max_bytes = max_bytes
        self.max_future_s = max_future_s
        self.max_age_s = max_age_s
        self.account_key = account_key
        self.activation_events = frozenset(e.lower() for e in activation_events)
        # Segment group traits kept as account_traits events (the policy's accounts.traits);
        # none: group calls only teach links (segment_unused)
        self.trait_keys = frozenset(trait_keys)


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
    if intercom.looks_like_intercom(payload):
        return "intercom"
    return None


def _short(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{exc.error_count()} error(s); {loc}: {first['msg']}"[:_MAX_DETAIL]


def _crash(kind: str | None, exc: Exception) -> Rejected:
    """An exception raised while reading one payload, as the value decode promises instead."""
    try:
        message = str(exc)
    except Exception:  # an exception whose own message fails: still a value
        message = "(no message)"
    return Rejected("invalid", f"{kind} payload: {type(exc).__name__}: {message}"[:_MAX_DETAIL])


def decode(raw: bytes | None, opts: DecodeOptions, now: float, source: Source = "auto") -> Decoded:
    """Decode one message. Never raises for bad data: every problem is a Rejected with a reason
    from REJECT_REASONS, and valid input that is not used a Skipped from SKIP_REASONS."""
    if raw is None:
        return Rejected("empty", "message has no value (tombstone)")
    if len(raw) > opts.max_bytes:
        return Rejected("too_large", f"{len(raw)} bytes > limit {opts.max_bytes}")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected("not_json", str(exc)[:_MAX_DETAIL])
    return decode_object(payload, opts, now, source)


def decode_object(payload: Any, opts: DecodeOptions, now: float,
                  source: Source = "auto") -> Decoded:
    """``decode`` of what ``orjson.loads`` made of the bytes (the gateway, which parsed them
    already, checks each message with it)."""
    if not isinstance(payload, dict):
        return Rejected("not_object", f"top-level JSON is {type(payload).__name__}, not an object")
    try:
        return _decode_object(payload, opts, now, source)
    except Exception as exc:  # any class at all (OverflowError, OSError, RecursionError, ...)
        return _crash(source if isinstance(source, str) else "/".join(source), exc)


def _decode_object(payload: dict[str, Any], opts: DecodeOptions, now: float,
                   source: Source) -> Decoded:
    kind: str | None = source if isinstance(source, str) else None
    links: tuple[tuple[str, str], ...] = ()
    try:
        detected = detect(payload)
        allowed = (source,) if isinstance(source, str) else source
        if "auto" in allowed:
            kind = detected
        elif detected not in allowed:
            pinned = " or ".join(allowed)
            return Rejected("source_mismatch", f"topic is pinned to {pinned} payloads; this "
                            f"one looks like {detected or 'none of the known sources'}")
        else:
            kind = detected
        if kind == "canonical":
            event_type = payload.get("type")
            if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
                return Rejected("unknown_type", f"type {show(payload.get('type'), 80)}")
            candidate: dict[str, Any] | str = payload
        elif kind == "stripe":
            candidate = stripe.to_canonical(payload, opts.account_key)
            links = tuple(stripe.links(payload, opts.account_key))
        elif kind == "segment":
            candidate = segment.to_canonical(payload, opts.activation_events,
                                             opts.trait_keys)
            links = tuple(segment.links(payload))
        elif kind == "zendesk":
            candidate = zendesk.to_canonical(payload)
            links = tuple(zendesk.links(payload))
        elif kind == "intercom":
            candidate = intercom.to_canonical(payload)
            links = tuple(intercom.links(payload))
        else:
            return Rejected("unknown_source",
                            "not a canonical, Stripe, Segment, Zendesk or Intercom payload")
    except Exception as exc:  # an adapter meeting input it cannot read: a value, never a crash
        return _crash(kind, exc)
    if isinstance(candidate, str):
        return Skipped(candidate, links)
    # Most events are plain usage: checked without pydantic when that is certain to agree.
    event: Any = usage_event(candidate)
    if event is None:
        try:
            event = EVENT_ADAPTER.validate_python(candidate)
        except ValidationError as exc:
            return Rejected("invalid", f"{kind}: {_short(exc)}")
    if event.type in SNAPSHOT_TYPES and kind == "canonical":
        # A snapshot of a Stripe subscription whose account is another id teaches the link
        # customer -> account, as a Stripe object with the metadata does (stripe.links).
        links = tuple(stripe.snapshot_links(event.account_id, event.data.stripe_customer_id))
    ts = event.occurred_at.timestamp()
    if ts > now + opts.max_future_s:
        return Rejected("future_timestamp",
                        f"occurred_at {event.occurred_at.isoformat()} is beyond the allowed skew")
    if ts < now - opts.max_age_s and event.type not in SNAPSHOT_TYPES:
        # A backfill snapshot is history by nature (a subscription that started years ago):
        # it always reaches the state, which keeps the newest subscription facts by time.
        # History, not garbage: a billing or support event still carries facts worth writing
        # (status, MRR, invoice, ticket); a usage event older than the horizon carries none.
        return Skipped("too_old", links, event=None if family_of(event.type) in (
            "usage", "account") else event)
    return Accepted(event, links)
