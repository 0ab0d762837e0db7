"""Segment's HTTP Tracking API, as its SDKs speak it: one request -> records (pure).

``/v1/batch`` carries ``{"batch": [...], "sentAt"?, "context"?, "integrations"?,
"writeKey"?}``; ``/v1/track`` (``identify``, ``group``, ``page``, ``screen``, ``alias``) carry
one message, whose ``type`` the route sets. Each message is checked on its own: in a batch a
bad one is dead-lettered and the others accepted; a single call answers 400 (413 over the
size limit) instead.

What is changed in a message, as Segment's servers do: ``receivedAt`` is set; ``sentAt`` is
kept; ``timestamp`` is corrected for the client's clock skew, ``timestamp = receivedAt -
(sentAt - originalTimestamp)``, with ``originalTimestamp`` the time the client gave (its
``timestamp``, else its ``originalTimestamp``); a message without a time gets ``receivedAt``.
A message without ``messageId`` first gets the id the worker would derive from its content
(``schemas.segment.event_id``), so a retried send, whose ``sentAt`` and so corrected
``timestamp`` differ, stays one event.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from churnsignal.schemas import identity, segment
from churnsignal.schemas._util import str_id
from churnsignal.schemas.decode import DecodeOptions, decode_object
from churnsignal.schemas.results import Rejected

ROUTES = {"track": "track", "identify": "identify", "group": "group", "page": "page",
          "screen": "screen", "alias": "alias"}
MAX_BATCH_MESSAGES = 10_000  # 500 KB holds far fewer real messages; a bound on tiny ones


# Not frozen: one or more of these is made per message, and a frozen init costs 3x.
@dataclass(slots=True)
class Record:
    """One message for usage.events."""

    key: bytes | None
    value: bytes


@dataclass(slots=True)
class Invalid:
    """One message refused: ``reason`` from decode's REJECT_REASONS."""

    reason: str
    detail: str
    value: bytes


def iso(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC to the millisecond (``2026-12-06T07:00:00.123Z``): what
    ``datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")`` gives, with
    Z, in a third of its time (every message's corrected timestamp is one)."""
    frac, whole = math.modf(seconds)  # as fromtimestamp splits and rounds (half even)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1
    elif micros < 0:
        micros += 1_000_000
        whole -= 1
    return f"{_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).isoformat()[:19]


def parse_time(value: Any) -> float | None:
    """Unix seconds of an ISO 8601 time with a zone; None otherwise."""
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


# Every message of a request shares its receivedAt and (mostly) its batch's sentAt: formatted
# and parsed once per request, not once per message.
_received_iso = functools.lru_cache(maxsize=16)(iso)
_sent_time = functools.lru_cache(maxsize=64)(parse_time)


def normalise(message: dict[str, Any], received: float, sent_at: Any) -> dict[str, Any]:
    """The message as Segment's servers pass it on (see the module doc)."""
    out = dict(message)
    if str_id(out.get("messageId")) is None:
        out["messageId"] = segment.event_id(message)
    sent = out.get("sentAt", sent_at)
    original = out.get("timestamp") or out.get("originalTimestamp")
    out["receivedAt"] = _received_iso(received)
    if sent is not None:
        out["sentAt"] = sent
    original_s = parse_time(original)
    sent_s = _sent_time(sent) if isinstance(sent, str) else None
    if original_s is not None:
        out["originalTimestamp"] = original
        if sent_s is not None:
            out["timestamp"] = iso(received - (sent_s - original_s))
    elif original is None:
        out["timestamp"] = out["receivedAt"]
    return out


def record_key(message: dict[str, Any]) -> bytes | None:
    """The account where the message names one (context.groupId, properties, traits; the
    groupId of a group call, the traits of an identify call), else the user, else the
    anonymous id."""
    account = segment._account(message)  # noqa: SLF001 - the worker's own rules
    call = segment.call_of(message)
    if account is None and call == "group":
        account = str_id(message.get("groupId"))
    if account is None and call == "identify":
        account = segment._traits_account(message.get("traits"))  # noqa: SLF001
    if account is None:
        account = str_id(message.get("userId")) or str_id(message.get("anonymousId"))
    return account.encode("utf-8", "replace")[:400] if account is not None else None


def _problem(message: dict[str, Any]) -> str | None:
    """What Segment itself requires of a call, beyond what the worker's decode checks."""
    call = segment.call_of(message)
    if call is None:
        return f"type must be one of {', '.join(sorted(segment.SEGMENT_CALLS))}"
    if str_id(message.get("userId")) is None and str_id(message.get("anonymousId")) is None:
        return "a userId or an anonymousId is required"
    if call == "track" and not isinstance(message.get("event"), str):
        return "a track call needs an event name"
    if call == "group" and str_id(message.get("groupId")) is None:
        return "a group call needs a groupId"
    if call == "alias" and str_id(message.get("previousId")) is None:
        return "an alias call needs a previousId"
    return None


def check(message: Any, max_bytes: int, received: float, sent_at: Any, opts: DecodeOptions,
          call: str | None = None) -> Record | Invalid:
    """One message -> the record to write, or why it is refused. What is written is exactly
    what the worker will decode without a rejection."""
    if not isinstance(message, dict):
        raw = _dumps(message)
        return Invalid("not_object", f"message is JSON {type(message).__name__}, not an object",
                       raw)
    # The write key is a credential: it never reaches a topic, the dead-letter one included.
    # (Copied only when changed here: normalise copies it anyway.)
    if "writeKey" in message or call is not None:
        message = {k: v for k, v in message.items() if k != "writeKey"}
        if call is not None:
            message["type"] = call
    raw = _dumps(message)
    if len(raw) > max_bytes:
        return Invalid("too_large", f"message is {len(raw)} bytes; limit {max_bytes}", raw)
    problem = _problem(message)
    if problem is not None:
        return Invalid("invalid", problem, raw)
    try:
        out = normalise(message, received, sent_at)
        # Not _dumps: orjson writes at most 254 levels of nesting (it reads 1024), and a
        # message it cannot write must be refused, not written as null
        value = orjson.dumps(out)
    except (ValueError, TypeError, OverflowError) as exc:  # JSONEncodeError is a TypeError
        return Invalid("invalid", f"{type(exc).__name__}: {exc}"[:300], raw)
    if len(value) > opts.max_bytes:  # as the worker's decode would refuse it
        return Invalid("too_large", f"message is {len(value)} bytes; the worker's limit is "
                       f"{opts.max_bytes}", raw)
    # ``out`` is what the worker will read back from ``value`` (orjson both ways): decoded
    # as it is, without a second parse
    result = decode_object(out, opts, received, "segment")
    if isinstance(result, Rejected):
        return Invalid(result.reason, result.detail, raw)
    # A usage event the decoder attributed to an account names the account record_key would
    # find first (segment._account of the same message): no need to look again.
    event = getattr(result, "event", None)
    account = getattr(event, "account_id", None)
    if (isinstance(account, str) and getattr(event, "type", None) != "account_traits"
            and not identity.is_identity(account)):
        return Record(account.encode("utf-8", "replace")[:400], value)
    return Record(record_key(out), value)


def messages_of(payload: dict[str, Any], call: str | None) -> tuple[list[Any], Any]:
    """(messages, sentAt) of a request body: the batch's items, with the batch-level
    ``context`` and ``integrations`` as defaults, or the one message of a single call.
    Raises ValueError (a 400) when a batch has no list."""
    if call is not None:
        return [payload], payload.get("sentAt")
    batch = payload.get("batch")
    if not isinstance(batch, list):
        raise ValueError("a /v1/batch body needs a \"batch\" list")
    if len(batch) > MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch holds at most {MAX_BATCH_MESSAGES} messages")
    shared = {k: payload[k] for k in ("context", "integrations") if isinstance(payload.get(k),
                                                                              dict)}
    if shared:
        batch = [_with_defaults(m, shared) if isinstance(m, dict) else m for m in batch]
    return batch, payload.get("sentAt")


def _with_defaults(message: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    for name, value in shared.items():
        own = out.get(name)
        out[name] = {**value, **own} if isinstance(own, dict) else (own if own is not None
                                                                   else value)
    return out


def _dumps(value: Any) -> bytes:
    """The message's JSON, for its size and the dead letter: orjson, else (deeper than the
    254 levels orjson writes) the standard library's, else null."""
    try:
        return orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        except (ValueError, TypeError, RecursionError):
            return b"null"

