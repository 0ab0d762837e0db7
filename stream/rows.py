"""ClickHouse rows derived from state and alerts, as column tuples (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from churnsignal.schemas.alerts import Alert
from churnsignal.stream.engine import Outcome
from churnsignal.stream.state import BILLING, EVENTS, SESSIONS, SUPPORT, USAGE, USERS, AccountState

DAILY_COLUMNS = ("account_id", "day", "events", "usage_events", "sessions", "active_users",
                 "billing_events", "support_events", "version")
SCORE_COLUMNS = ("account_id", "as_of", "score", "band", "reasons", "mrr_cents", "sub_status",
                 "plan", "version")
ALERT_COLUMNS = ("alert_id", "account_id", "kind", "band", "previous_band", "score",
                 "reasons", "plays", "mrr_at_risk_cents", "trigger_event_id", "triggered_at",
                 "emitted_at", "policy_version")

_EPOCH = date(1970, 1, 1).toordinal()


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def daily_rows(state: AccountState, days: set[int]) -> list[tuple[object, ...]]:
    """Whole-day totals (not deltas): rewriting a row with a newer version is idempotent."""
    rows = []
    for day in sorted(days):
        b = state.days.get(day)
        if b is None:  # pruned: out of the horizon
            continue
        rows.append((state.account_id, date.fromordinal(_EPOCH + day), b[EVENTS], b[USAGE],
                     b[SESSIONS], b[USERS], b[BILLING], b[SUPPORT], state.seq))
    return rows


def score_row(out: Outcome) -> tuple[object, ...]:
    s = out.state
    codes = [r.code for r in out.scored.reasons] if out.scored else []
    return (s.account_id, _ts(s.scored_at), float(s.score), s.band, codes, int(s.mrr_cents),
            s.sub_status or "", s.plan or "", s.seq)


def alert_row(alert: Alert) -> tuple[object, ...]:
    return (alert.alert_id, alert.account_id, alert.kind, alert.band, alert.previous_band,
            float(alert.score), [r.code for r in alert.reasons], [r.play for r in alert.reasons],
            alert.mrr_at_risk_cents, alert.trigger_event_id or "", _ts(alert.triggered_at),
            _ts(alert.emitted_at), alert.policy_version)
