"""One account's batch through the core: dedup, fold, prune, score, decide (pure, no I/O).

The worker, the backtest and the demo all call these two functions, so live and replayed
histories give the same scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from churnsignal.schemas.alerts import Alert
from churnsignal.schemas.events import USAGE_TYPE_SET
from churnsignal.schemas.usage_lite import UsageLite
from churnsignal.stream.alerts import decide
from churnsignal.stream.clock import is_live, scoring_time
from churnsignal.stream.policy import Policy
from churnsignal.stream.reasons import Score
from churnsignal.stream.scoring import score
from churnsignal.stream.state import (
    AccountState,
    DayUsage,
    apply_event_at,
    day_of,
    event_ts,
    fold_day,
    fold_params,
    prune,
)

# One item of a batch: (source "topic/partition" or None, offset, canonical event).
Item = tuple[str | None, int, Any]


@dataclass(slots=True)
class Outcome:
    state: AccountState
    applied: int = 0  # events folded in (not duplicates)
    duplicates: int = 0
    late: int = 0  # applied although older than the account's newest event (out of order)
    days: set[int] = field(default_factory=set)  # daily buckets that changed
    scored: Score | None = None
    score_changed: bool = False
    alert: Alert | None = None
    # Billing and support events applied, for their own tables:
    # (event, MRR before it, involuntary end after it, state seq after it).
    facts: list[tuple[Any, int, bool, int]] = field(default_factory=list)
    newest: Any = None  # the newest event applied: what an alert names as its trigger

    # Written out: mypyc compiles an __init__ in the source (see stream.reasons.Reason).
    def __init__(self, state: AccountState, applied: int = 0, duplicates: int = 0,
                 late: int = 0, days: set[int] | None = None, scored: Score | None = None,
                 score_changed: bool = False, alert: Alert | None = None,
                 facts: list[tuple[Any, int, bool, int]] | None = None,
                 newest: Any = None) -> None:
        self.state = state
        self.applied = applied
        self.duplicates = duplicates
        self.late = late
        self.days = set() if days is None else days
        self.scored = scored
        self.score_changed = score_changed
        self.alert = alert
        self.facts = [] if facts is None else facts
        self.newest = newest


def _finish(out: Outcome, now: float, trigger: str | None, triggered_at: float,
            policy: Policy, live: bool) -> Outcome:
    state = out.state
    before = (state.score, state.band)
    scored = score(state, now, policy)
    out.scored = scored
    out.alert = decide(state, scored, now, trigger, triggered_at, policy, alerting=live)
    out.score_changed = (round(state.score), state.band) != (round(before[0]), before[1])
    return out


def fold(state: AccountState | None, account_id: str, items: Iterable[Item], wall: float,
         policy: Policy) -> Outcome:
    """Fold a batch of one account's events (in arrival order) into its state, unscored.

    An item's event may also be a ``DayUsage``: a day of warehouse usage, counted.
    """
    out = Outcome(state or AccountState(account_id))
    params = fold_params(policy)
    newest_ts = 0.0
    for source, offset, event in items:
        if type(event) is DayUsage:
            out.applied += event.events
            out.days.add(fold_day(out.state, event, wall, policy))
            continue
        ts = event_ts(event)
        mrr_before = out.state.mrr_cents
        newest_before = out.state.last_event
        day = apply_event_at(out.state, event, ts, source, offset, policy, params, wall)
        if day is None:
            out.duplicates += 1
            out.days.add(day_of(ts))  # rows re-derived on redelivery
            continue
        out.applied += 1
        out.days.add(day)
        if ts < newest_before:
            out.late += 1  # still applied to its own day: windows are by event time
        if not isinstance(event, UsageLite) and event.type not in USAGE_TYPE_SET:
            out.facts.append((event, mrr_before, out.state.involuntary_end, out.state.seq))
        if out.newest is None or ts >= newest_ts:  # (the same order as the datetimes')
            out.newest, newest_ts = event, ts
    return out


def apply_batch(state: AccountState | None, account_id: str, items: Iterable[Item], wall: float,
                policy: Policy) -> Outcome:
    """Fold a batch of one account's events (in arrival order), then score once.

    The account is scored at its newest event time (capped by ``wall``); it alerts only when
    that is recent, so a back-fill of history updates state without paging anyone.
    """
    out = fold(state, account_id, items, wall, policy)
    now = scoring_time(wall, out.state.last_event)
    prune(out.state, now, policy)
    if not out.applied:
        if out.duplicates and out.state.scored_at:
            # A redelivered batch writes its score row again: with the reasons it had (the
            # same state at the same time), not none over the row it repeats.
            out.scored = score(out.state, out.state.scored_at, policy)
        return out
    trigger = out.newest
    return _finish(out, now, trigger.event_id if trigger else None,
                   trigger.occurred_at.timestamp() if trigger else now, policy,
                   live=is_live(wall, now, policy.alerting.catch_up_lag_hours * 3600))


def rescore(state: AccountState, now: float, policy: Policy) -> Outcome:
    """Re-score without a new event: silence raises risk as time passes."""
    out = Outcome(state)
    prune(state, now, policy)
    return _finish(out, now, None, now, policy, live=True)
