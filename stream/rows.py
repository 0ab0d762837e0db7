"""ClickHouse rows derived from state and alerts, as column tuples (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from churnsignal.schemas.alerts import Alert
from churnsignal.schemas.events import ACCOUNT_TYPES
from churnsignal.stream.engine import Outcome
from churnsignal.stream.reasons import Score
from churnsignal.stream.state import BILLING, EVENTS, SESSIONS, SUPPORT, USAGE, USERS, AccountState

DAILY_COLUMNS = ("account_id", "day", "events", "usage_events", "sessions", "active_users",
                 "billing_events", "support_events", "version")
SCORE_COLUMNS = ("account_id", "as_of", "score", "band", "reasons", "mrr_cents", "sub_status",
                 "plan", "version", "policy", "shadow_score", "shadow_band", "shadow_policy")
ALERT_COLUMNS = ("alert_id", "account_id", "kind", "band", "previous_band", "score",
                 "reasons", "plays", "mrr_at_risk_cents", "trigger_event_id", "triggered_at",
                 "emitted_at", "policy_version", "plan", "attributes")

ACTION_COLUMNS = ("account_id", "action_id", "alert_id", "action", "band", "until", "at", "by",
                  "note")

BILLING_COLUMNS = ("account_id", "event_id", "occurred_at", "type", "status", "plan", "mrr_cents",
                   "mrr_before_cents", "cancel_at_period_end", "invoice_id", "amount_cents",
                   "attempt_count", "final_attempt", "involuntary", "version", "currency")
SUPPORT_COLUMNS = ("account_id", "event_id", "occurred_at", "type", "ticket_id", "status",
                   "priority", "channel", "first_response_s", "resolution_s", "csat", "nps",
                   "version")

_EPOCH = date(1970, 1, 1).toordinal()
# Subscription events that do not carry a status still say what it became.
_IMPLIED_STATUS = {"subscription_paused": "paused", "subscription_resumed": "active",
                   "subscription_deleted": "canceled"}


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def daily_rows(state: AccountState, days: set[int]) -> list[tuple[object, ...]]:
    """Whole-day totals (not deltas): rewriting a row with a newer version is idempotent."""
    rows: list[tuple[object, ...]] = []
    for day in sorted(days):
        b = state.days.get(day)
        if b is None:  # pruned: out of the horizon
            continue
        rows.append((state.account_id, date.fromordinal(_EPOCH + day), b[EVENTS], b[USAGE],
                     b[SESSIONS], b[USERS], b[BILLING], b[SUPPORT], state.seq))
    return rows


def snapshot_of(out: Outcome, shadow: Score | None = None) -> tuple[object, ...]:
    """What a score row says but its time, version and exact scores: a new row is written
    when this changes (``stream.fold``)."""
    s = out.state
    codes = tuple(r.code for r in out.scored.reasons) if out.scored else ()
    shadowed = (round(shadow.score), shadow.band) if shadow is not None else None
    return round(s.score), s.band, codes, s.mrr_cents, s.sub_status, s.plan, s.policy, shadowed


def score_row(out: Outcome, shadow: Score | None = None,
              shadow_policy: str = "") -> tuple[object, ...]:
    """The account's score snapshot; ``shadow``: a shadow policy's score of the same state
    at the same moment (written beside it, never alerted on)."""
    s = out.state
    codes = [r.code for r in out.scored.reasons] if out.scored else []
    return (s.account_id, _ts(s.scored_at), float(s.score), s.band, codes, int(s.mrr_cents),
            s.sub_status or "", s.plan or "", s.seq, s.policy,
            float(shadow.score) if shadow is not None else None,
            shadow.band if shadow is not None else "", shadow_policy)


def alert_row(alert: Alert) -> tuple[object, ...]:
    return (alert.alert_id, alert.account_id, alert.kind, alert.band, alert.previous_band,
            float(alert.score), [r.code for r in alert.reasons], [r.play for r in alert.reasons],
            alert.mrr_at_risk_cents, alert.trigger_event_id or "", _ts(alert.triggered_at),
            _ts(alert.emitted_at), alert.policy_version, alert.plan or "",
            dict(alert.attributes or {}))


def action_row(request: dict[str, Any], band: str) -> tuple[object, ...]:
    """An ack or snooze (``churnsignal.notify.ack.request_body``), with the account's band
    when it was folded."""
    until = request.get("until")
    return (str(request["account_id"]), str(request["action_id"]),
            str(request.get("alert_id") or ""), str(request["action"]), band,
            _ts(float(until)) if until else None, _ts(float(request["at"])),
            str(request.get("by") or ""), str(request.get("note") or ""))


BILLING_TABLE = "billing_events_data"
SUPPORT_TABLE = "support_events_data"
_INVOLUNTARY_REASONS = ("payment_failed", "payment_disputed")


def _field(data: Any, name: str, default: Any) -> Any:
    """A field of an event's data, ``default`` where its model has none. Through the
    instance's ``__dict__`` when it has one (pydantic models, extra fields ignored, keep
    every field there): ``getattr`` with a default goes through pydantic's ``__getattr__``
    and an AttributeError for each field the model lacks, ~2 us apiece."""
    fields = getattr(data, "__dict__", None)
    if fields is None:
        return getattr(data, name, default)
    return fields.get(name, default)


def fact_row(account: str, event: Any, mrr_before: int, involuntary: bool,
             seq: int) -> tuple[str, tuple[object, ...]]:
    """(table, row) of one billing or support event, keyed by its event id."""
    t, d, at = event.type, event.data, event.occurred_at
    if t.startswith(("ticket_", "satisfaction", "nps")):
        return SUPPORT_TABLE, (
            account, event.event_id, at, t, _field(d, "ticket_id", "") or "",
            _field(d, "status", "") or "", _field(d, "priority", "") or "",
            _field(d, "channel", "") or "", _field(d, "first_response_s", None),
            _field(d, "resolution_s", None), _field(d, "csat", "") or "",
            _field(d, "score", None), seq)
    if t == "subscription_snapshot":
        raise ValueError("a snapshot makes several rows: snapshot_rows")
    status = _field(d, "status", None) or _IMPLIED_STATUS.get(t, "")
    subscription = t.startswith("subscription_") or t == "trial_will_end"
    mrr = mrr_before
    if subscription:
        mrr = 0 if status == "canceled" else (d.mrr_cents if d.mrr_cents is not None
                                              else mrr_before)
    return BILLING_TABLE, (
        account, event.event_id, at, t, status if subscription else "",
        (_field(d, "plan", None) or "") if subscription else "", mrr, mrr_before,
        bool(_field(d, "cancel_at_period_end", False)), _field(d, "invoice_id", "") or "",
        _field(d, "amount_cents", None), _field(d, "attempt_count", None),
        t == "payment_failed" and d.next_attempt_at is None,
        involuntary and status == "canceled", seq, _currency(d))


def _currency(data: Any) -> str:
    return str(_field(data, "currency", None) or "").lower()


def snapshot_rows(account: str, event: Any, seq: int) -> list[tuple[object, ...]]:
    """The billing rows of a backfill snapshot: its start (active, or trialing), its end
    (canceled, when it ended by the snapshot's time) and, for a past-due, unpaid or paused
    subscription, that status at the snapshot's time. Keyed by the subscription id (and
    the time), so importing the same subscription again rewrites the same rows."""
    d, at = event.data, event.occurred_at
    key = f"snapshot:{d.subscription_id}"
    currency = _currency(d)
    plan = d.plan or ""
    ended = d.ended_at is not None and d.ended_at <= at
    status = "canceled" if ended else d.status
    if status in ("incomplete", "incomplete_expired"):
        return []  # never paid: not a customer at any time
    start = "trialing" if status == "trialing" else "active"

    def row(suffix: str, when: Any, row_status: str, mrr: int, mrr_before: int,
            involuntary: bool) -> tuple[object, ...]:
        return (account, f"{key}:{suffix}", when, "subscription_snapshot", row_status, plan,
                mrr, mrr_before, bool(d.cancel_at_period_end) and not ended, "", None, None,
                False, involuntary, seq, currency)

    rows = [row("start", d.started_at, start, d.mrr_cents, 0, False)]
    if ended:
        rows.append(row("end", max(d.ended_at, d.started_at), "canceled", 0, d.mrr_cents,
                        d.cancellation_reason in _INVOLUNTARY_REASONS))
    elif status in ("past_due", "unpaid", "paused"):
        rows.append(row(f"{status}:{at.isoformat()}", at, status, d.mrr_cents, d.mrr_cents,
                        False))
    return rows


def fact_rows(out: Outcome) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """One row per applied billing event and per applied support event (keyed by event id)."""
    billing: list[tuple[object, ...]] = []
    support: list[tuple[object, ...]] = []
    account = out.state.account_id
    for event, mrr_before, involuntary, seq in out.facts:
        if event.type in ACCOUNT_TYPES:  # the account's attributes: no row of their own
            continue
        if event.type == "subscription_snapshot":
            billing.extend(snapshot_rows(account, event, seq))
            continue
        table, row = fact_row(account, event, mrr_before, involuntary, seq)
        (support if table == SUPPORT_TABLE else billing).append(row)
    return billing, support


def history_row(account: str, event: Any) -> tuple[str, tuple[object, ...]]:
    """The row of a billing or support event older than the horizon, from what the event
    itself carries: it never reaches an account's state, so what only state knows is left
    at its empty value (MRR before: the event's own ``previous_mrr_cents``, else 0; the
    version: 0, below any row a live event writes)."""
    d = event.data
    mrr_before = _field(d, "previous_mrr_cents", None) or 0
    involuntary = _field(d, "cancellation_reason", None) in _INVOLUNTARY_REASONS
    return fact_row(account, event, mrr_before, involuntary, 0)
