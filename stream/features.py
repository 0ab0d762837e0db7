"""Behavioural and account features of one account at one moment, from its state (pure).

The same function serves the worker, the backtest and calibrate, so a model fitted on a
replay scores the same live. Everything comes from the state's day buckets (windows never
exceed the policy horizon) and its billing and support fields.

Exact and estimated figures: event counts, active days and per-type counts are exact.
Distinct users per day are exact (counted per day, up to ``limits.day_users``); over a
window, ``users_28d`` is the mean of the daily distinct counts on active days and
``users_per_seat`` the largest daily count over seats — estimates of distinct users over
the window (the state keeps user hashes only for the grace days).

Counts over a window longer than the account's tenure are scaled up to the window (an
account 10 days old with 20 events has the rate of 56 events in 28 days), so young
accounts are not mistaken for quiet ones.

Cost: the base features need no state beyond what rules already keep; each tracked event
type adds one count per active day (``policy.model.event_types``, at most 32): about
2-4 bytes per active day in the stored state.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from churnsignal.stream.policy import BASE_COLUMNS, Policy
from churnsignal.stream.state import (
    DAY,
    SUPPORT,
    USAGE,
    USERS,
    AccountState,
    day_of,
    open_failures,
)

WINDOWS = (7, 28, 84)
TENURE_CAP_DAYS = 3650.0


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    transform: str  # log1p | identity
    code: str  # the reason code its contribution counts toward
    detail: str  # a template for the raw value
    absent: float = 0.0  # its raw value for an account that never had it


# The base features, in order; per-type features follow (``names``).
BASE: tuple[Feature, ...] = (
    Feature("events_7d", "log1p", "low_engagement", "{:.0f} events in the last 7 days"),
    Feature("events_28d", "log1p", "low_engagement", "{:.0f} events in the last 28 days"),
    Feature("events_84d", "log1p", "low_engagement", "{:.0f} events in the last 84 days"),
    Feature("active_days_share_28d", "identity", "low_engagement",
            "active on {:.0%} of the last 28 days"),
    Feature("active_days_share_84d", "identity", "low_engagement",
            "active on {:.0%} of the last 84 days"),
    Feature("users_28d", "log1p", "low_engagement", "{:.1f} active users a day (28 days)"),
    Feature("events_per_user_28d", "log1p", "low_engagement",
            "{:.1f} events per active user (28 days)"),
    Feature("trend_28d", "identity", "usage_decline",
            "usage trend {:+.2f} (the last 28 days against the 56 before, log ratio)"),
    Feature("days_since_usage", "log1p", "inactivity", "{:.0f} days since last activity"),
    Feature("tenure_days", "log1p", "low_engagement", "customer for {:.0f} days"),
    Feature("users_per_seat", "identity", "seat_underuse", "{:.0%} of seats active"),
    Feature("seats", "log1p", "seat_underuse", "{:.0f} seats"),
    Feature("mrr", "log1p", "contraction", "MRR {:,.0f}"),
    Feature("mrr_drop", "identity", "contraction", "MRR {:.0%} below its peak"),
    Feature("onboarding_open", "identity", "onboarding_stalled", "not activated yet"),
    Feature("failed_payments_30d", "log1p", "payment_failed",
            "{:.0f} failed payments in 30 days, not paid since"),
    Feature("failed_payments_84d", "log1p", "payment_failed",
            "{:.0f} failed payment attempts in 84 days (paid since or not)"),
    Feature("days_since_failed_payment", "log1p", "payment_failed",
            "{:.0f} days since the last failed payment", absent=float(WINDOWS[-1])),
    Feature("retry_pending", "identity", "payment_failed", "payment retries pending"),
    Feature("past_due", "identity", "payment_failed_final", "subscription past due or unpaid"),
    Feature("card_expiring", "identity", "card_expiring", "card expires before renewal"),
    Feature("cancel_scheduled", "identity", "cancellation_scheduled",
            "cancels at the end of the billing period"),
    Feature("paused", "identity", "paused", "subscription paused"),
    Feature("support_events_28d", "log1p", "support_burden",
            "{:.0f} support events (tickets, ratings) in 28 days"),
    Feature("support_events_84d", "log1p", "support_burden",
            "{:.0f} support events (tickets, ratings) in 84 days"),
    Feature("open_tickets", "log1p", "support_burden", "{:.0f} open tickets"),
    Feature("urgent_tickets", "log1p", "support_burden", "{:.0f} high-priority tickets open"),
    Feature("reopened_30d", "log1p", "support_burden", "{:.0f} tickets reopened in 30 days"),
    Feature("slow_resolutions_30d", "log1p", "support_burden",
            "{:.0f} slow resolutions in 30 days"),
    Feature("bad_csat_30d", "identity", "negative_feedback", "bad CSAT in the last 30 days"),
    Feature("nps_detractor_90d", "identity", "negative_feedback", "NPS detractor"),
)
TYPE_FEATURES = (("events_28d", "log1p", "{:.0f} {} in the last 28 days"),
                 ("days_since", "log1p", "{:.0f} days since the last {}"))


def type_feature(event_type: str, kind: str) -> str:
    return f"type:{event_type}:{kind}"


def catalogue(event_types: list[str]) -> list[Feature]:
    """Every feature for these tracked event types, in order."""
    out = list(BASE)
    for name in event_types:
        for kind, transform, detail in TYPE_FEATURES:
            out.append(Feature(type_feature(name, kind), transform, "key_event_decline",
                               detail.replace("{}", name.replace("{", "(").replace("}", ")")),
                               absent=float(WINDOWS[-1]) if kind == "days_since" else 0.0))
    return out


def _scaled(count: float, window: int, tenure_days: float) -> float:
    """A count over ``window`` days, as a full window's worth for a younger account."""
    covered = min(float(window), max(1.0, tenure_days))
    return count * window / covered


def values(state: AccountState, now: float, policy: Policy) -> dict[str, float]:
    """Raw feature values (before transforms) by name."""
    horizon = policy.windows.horizon_days
    w7, w28, w84 = (min(w, horizon) for w in WINDOWS)
    today = day_of(now)
    tenure = max(0.0, (now - state.first_seen) / DAY) if state.first_seen else 0.0
    types = state.types
    n_types = len(types)
    # The days of the 84-day window as columns (C-level slicing and sums; this runs for
    # every account a flush scores): days are in order, so windows are index ranges.
    days = state.days
    keys = list(days)
    hi = bisect_right(keys, today)  # days ahead of the scoring time (a fast clock) count not
    lo = bisect_left(keys, today - w84 + 1, 0, hi)
    i28 = bisect_left(keys, today - w28 + 1, lo, hi) - lo
    i7 = bisect_left(keys, today - w7 + 1, lo, hi) - lo
    cols: list[tuple[int, ...]] = list(zip(*list(days.values())[lo:hi], strict=True)) if hi > lo else []
    usage = cols[USAGE] if cols else ()
    sup = cols[SUPPORT] if cols else ()
    used28 = usage[i28:]
    counts = {7: sum(usage[i7:]), 28: sum(used28), 84: sum(usage)}
    active = {28: len(used28) - used28.count(0), 84: len(usage) - usage.count(0)}
    prior = counts[84] - counts[28]  # days 29-84
    support = {28: sum(sup[i28:]), 84: sum(sup)}  # how much help the account needed
    daily_users = [u for u, x in zip(cols[USERS][i28:], used28, strict=True) if x and u] if cols else []
    users_sum, users_days = sum(daily_users), len(daily_users)
    users_max = max(daily_users, default=0)
    type_counts = [0] * n_types
    type_last = [-1] * n_types
    for i in range(n_types):
        if BASE_COLUMNS + i >= len(cols):
            break
        col = cols[BASE_COLUMNS + i]
        type_counts[i] = sum(col[i28:])
        for k in range(len(col) - 1, -1, -1):  # newest first: one step for a type used today
            if col[k] and usage[k]:
                type_last[i] = today - keys[lo + k]
                break
    events_28 = _scaled(counts[28], w28, tenure)
    users = users_sum / users_days if users_days else 0.0
    prior_days = w84 - w28
    prior_rate = prior / max(1.0, min(float(prior_days), tenure - w28)) if tenure > w28 else None
    recent_rate = counts[28] / max(1.0, min(float(w28), tenure))
    trend = math.log((recent_rate + 0.1) / (prior_rate + 0.1)) if prior_rate is not None else 0.0
    idle = (now - state.last_active) / DAY if state.last_active else float(horizon)
    seats = float(state.seats or 0)
    peak = max((p[1] for p in state.mrr_peak), default=0.0)
    month_ago, quarter_ago = now - 30 * DAY, now - 90 * DAY
    ob = policy.onboarding
    out = {
        "events_7d": _scaled(counts[7], w7, tenure),
        "events_28d": events_28,
        "events_84d": _scaled(counts[84], w84, tenure),
        "active_days_share_28d": active[28] / min(float(w28), max(1.0, tenure)),
        "active_days_share_84d": active[84] / min(float(w84), max(1.0, tenure)),
        "users_28d": users,
        "events_per_user_28d": counts[28] / users if users else 0.0,
        "trend_28d": trend,
        "days_since_usage": min(max(0.0, idle), float(horizon)),
        "tenure_days": min(tenure, TENURE_CAP_DAYS),
        "users_per_seat": min(1.0, users_max / seats) if seats else 0.0,
        "seats": seats,
        "mrr": state.mrr_cents / 100.0,
        "mrr_drop": 1 - state.mrr_cents / peak if peak > 0 and state.mrr_cents < peak else 0.0,
        "onboarding_open": 1.0 if (state.activated_at is None and tenure <= ob.watch_until_days
                                   and state.first_seen) else 0.0,
        "failed_payments_30d": float(len(open_failures(state, now))),
        "failed_payments_84d": float(sum(1 for t in state.failed_payments
                                         if now - w84 * DAY <= t <= now)),
        "days_since_failed_payment": min(
            (max(0.0, (now - t) / DAY) for t in state.failed_payments if t <= now),
            default=float(w84)),
        "retry_pending": 1.0 if state.retry_pending else 0.0,
        "past_due": 1.0 if state.sub_status in ("past_due", "unpaid") else 0.0,
        "card_expiring": 1.0 if (state.card_expires_at is not None and state.card_expires_at
                                 < max(state.period_end or 0.0, now + 30 * DAY)) else 0.0,
        "cancel_scheduled": 1.0 if state.cancel_at_period_end else 0.0,
        "paused": 1.0 if state.sub_status == "paused" else 0.0,
        "support_events_28d": _scaled(support[28], w28, tenure),
        "support_events_84d": _scaled(support[84], w84, tenure),
        "open_tickets": float(len(state.open_tickets)),
        "urgent_tickets": float(sum(state.open_tickets.values())),
        "reopened_30d": float(sum(1 for t in state.reopened if t >= month_ago)),
        "slow_resolutions_30d": float(sum(1 for t in state.slow_resolutions if t >= month_ago)),
        "bad_csat_30d": 1.0 if (state.bad_csat_at or 0.0) >= month_ago else 0.0,
        "nps_detractor_90d": 1.0 if (state.nps is not None and state.nps <= 6
                                     and (state.nps_at or 0.0) >= quarter_ago) else 0.0,
    }
    if n_types:
        scale28 = w28 / min(float(w28), max(1.0, tenure))  # _scaled's, once for every type
        for (count_name, since_name), count, last in zip(_type_names(tuple(types)),
                                                          type_counts, type_last, strict=True):
            out[count_name] = count * scale28
            out[since_name] = float(last if last >= 0 else w84)
    return out


@lru_cache(maxsize=64)
def _type_names(types: tuple[str, ...]) -> list[tuple[str, str]]:
    """Per tracked type, the names of its two features (built once per set of types)."""
    return [(type_feature(t, "events_28d"), type_feature(t, "days_since")) for t in types]


TRANSFORMS: dict[str, Callable[[float], float]] = {
    "log1p": lambda x: math.log1p(max(0.0, x)),
    "identity": lambda x: x,
}


def vector(state: AccountState, now: float, policy: Policy, names: list[str],
           transforms: list[str]) -> list[float]:
    """Transformed values of ``names`` (a feature the state cannot give, e.g. an event type
    it does not track, is 0)."""
    raw = values(state, now, policy)
    return [TRANSFORMS[t](raw.get(n, 0.0)) for n, t in zip(names, transforms, strict=True)]
