"""Acknowledge and snooze an account's alerts: the request side (pure).

``POST /api/accounts/ID/ack`` and ``POST /api/accounts/ID/snooze?until=ISO`` (on any worker's
web port) do not touch the state themselves: the state lives in the worker that owns the
account's partition. Like ``churnsignal forget``, the view produces an ACK control item
(``stream.packs``) to that partition of the ingested topic, which the owner folds in order
with the account's events (``stream.fold._acknowledge`` calls ``stream.alerts.acknowledge``)
and records as a row of ``alert_actions_data`` (beside the alert, in the ``alert_outcomes``
view). This module checks the parameters and builds the item's body.
"""

from __future__ import annotations

import math
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Any, Final

ACTIONS: Final = ("ack", "snooze")
SNOOZE_MAX_S: Final = 366 * 86_400.0  # a snooze longer than a year is a mistake
TEXT_MAX: Final = 500  # by, note
ALERT_ID_MAX: Final = 64


class BadRequest(ValueError):
    """A parameter is invalid (answered as a 400 naming it)."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(reason)
        self.parameter = parameter


def parse_until(raw: str | None, now: float) -> float:
    """``until``: an ISO 8601 time with its offset (``2026-01-05T10:00:00Z``), in the future,
    at most a year ahead, as Unix seconds."""
    if raw is None or not raw.strip():
        raise BadRequest("until", "snooze needs until=<ISO 8601 time>, e.g. "
                                  "until=2026-01-05T10:00:00Z")
    text = raw.strip()
    if len(text) > 64:
        raise BadRequest("until", "until is too long for a time")
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest("until", f"until is not an ISO 8601 time: {text[:40]!r}") from None
    if at.tzinfo is None:
        raise BadRequest("until", "until needs a time zone offset (Z or +HH:MM)")
    ts = at.timestamp()
    if not math.isfinite(ts) or ts <= now:
        raise BadRequest("until", "until must be in the future")
    if ts - now > SNOOZE_MAX_S:
        raise BadRequest("until", "until must be within a year")
    return ts


def _text(name: str, raw: str | None, limit: int) -> str:
    text = (raw or "").strip()
    if len(text) > limit:
        raise BadRequest(name, f"{name} has at most {limit} characters")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise BadRequest(name, f"{name} has no control characters")
    return text


def request_body(account_id: str, action: str, now: float, *, until: float | None = None,
                 alert_id: str | None = None, by: str | None = None,
                 note: str | None = None, action_id: str | None = None) -> dict[str, Any]:
    """The ACK item's body (checked); ``action_id`` names the request (a row per id)."""
    if action not in ACTIONS:
        raise BadRequest("action", f"unknown action {action!r}")
    if action == "snooze" and until is None:
        raise BadRequest("until", "snooze needs until")
    if action == "ack" and until is not None:
        raise BadRequest("until", "until is for snooze; an ack lasts until the band changes")
    return {"action_id": action_id or uuid.uuid4().hex, "account_id": account_id,
            "action": action, "until": until,
            "alert_id": _text("alert_id", alert_id, ALERT_ID_MAX),
            "by": _text("by", by, TEXT_MAX), "note": _text("note", note, TEXT_MAX),
            "at": now}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")
