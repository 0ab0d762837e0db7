"""Named churn signals -> an explainable 0-100 risk score with reasons and plays (pure)."""

from __future__ import annotations

from churnsignal.stream.model import model_score
from churnsignal.stream.policy import Policy
from churnsignal.stream.reasons import IMMEDIATE, REASONS, Reason, Score
from churnsignal.stream.state import (
    DAY,
    KEY,
    USAGE,
    USERS,
    AccountState,
    day_of,
    generic_activation,
    open_failures,
)


def strength(start: float, full: float, value: float) -> float:
    """How fully a signal counts (0-1) at this raw value, by the policy's start and full."""
    if full == start:
        return 1.0 if value >= full else 0.0
    return min(1.0, max(0.0, (value - start) / (full - start)))


def decline(recent: float, baseline: float, min_baseline: float) -> float | None:
    """1 - recent / baseline daily rate; None while the baseline is too thin to judge."""
    return None if baseline < min_baseline else max(0.0, 1 - recent / baseline)


# A signal's raw value and a detail template with its arguments: formatted only for the
# reasons that count (most accounts most of the time have several signals at zero points).
Raw = tuple[float, str, tuple[object, ...]]


def usage_windows(state: AccountState, short_first: int, base_first: int,
                  today: int) -> tuple[int, int, int, int, int]:
    """Usage and key-event totals in the recent and baseline windows, and the most distinct
    users of a recent day: one pass over the newest days, those the windows cover."""
    recent = base = recent_key = base_key = users = 0
    for d, b in reversed(state.days.items()):  # days are in order: newest last
        if d > today:
            continue  # ahead of the scoring time (a producer's clock running fast)
        if d >= short_first:
            recent += b[USAGE]
            recent_key += b[KEY]
            if b[USERS] > users:
                users = b[USERS]
        elif d >= base_first:
            base += b[USAGE]
            base_key += b[KEY]
        else:
            break
    return recent, base, recent_key, base_key, users


def signals(state: AccountState, now: float, policy: Policy) -> dict[str, Raw]:
    """Raw signal values with a short human detail; only signals that apply are present."""
    out: dict[str, Raw] = {}
    w, lim = policy.windows, policy.limits
    today = day_of(now)
    status = state.sub_status
    if status == "canceled":
        why = "after failed payments" if state.involuntary_end else "customer cancelled"
        out["canceled"] = (1.0, "subscription canceled ({})", (why,))
        return out
    paused = status == "paused"
    short_first = today - w.short_days + 1
    base_first = short_first - w.baseline_days
    recent_total, base_total, recent_key, base_key, recent_users = usage_windows(
        state, short_first, base_first, today)
    if not paused:
        declines = [("usage_decline", recent_total, base_total, "")]
        if policy.usage.key_events:
            declines.append(("key_event_decline", recent_key, base_key, "key events "))
        for code, recent_sum, base_sum, what in declines:
            recent, baseline = recent_sum / w.short_days, base_sum / w.baseline_days
            value = decline(recent, baseline, lim.min_baseline_per_day)
            if value is not None:
                out[code] = (value, "{}{:.1f}/day in {}d vs {:.1f}/day in the prior {}d",
                             (what, recent, w.short_days, baseline, w.baseline_days))
    if not paused and state.last_active:
        idle = max(0.0, (now - state.last_active) / DAY)
        out["inactivity"] = (idle, "{:.0f} days since last activity", (idle,))
    if state.seats and state.seats >= 3 and not paused:
        out["seat_underuse"] = (1 - min(1.0, recent_users / state.seats),
                                "{} of {} seats active", (recent_users, state.seats))
    if state.last_active and not paused:
        if state.features or recent_total + base_total >= lim.min_features * 5:
            since = today - w.baseline_days
            used = sum(1 for d in state.features.values() if d >= since)
            out["low_feature_breadth"] = (1 - min(1.0, used / lim.min_features),
                                          "{} features used in {}d", (used, w.baseline_days))
    age_days = (now - state.first_seen) / DAY if state.first_seen else 0.0
    ob = policy.onboarding
    if ob.stalled_after_days <= age_days <= ob.watch_until_days and not _activated(state, policy):
        out["onboarding_stalled"] = (1.0, "not activated after {:.0f} days", (age_days,))
    failures = len(open_failures(state, now))
    if failures or status in ("past_due", "unpaid"):
        if status == "unpaid" or (failures and not state.retry_pending):
            out["payment_failed_final"] = (float(failures), "{} failed payment(s), retries "
                                                            "exhausted", (failures,))
        else:
            out["payment_failed"] = (float(failures), "{} failed payment(s), provider still "
                                                      "retrying", (failures,))
    if state.card_expires_at is not None:
        renew = state.period_end or now + 30 * DAY
        if state.card_expires_at < max(renew, now + 30 * DAY) and not failures:
            days = (state.card_expires_at - now) / DAY
            out["card_expiring"] = (1.0, "card expires in {:.0f} days, before renewal", (days,))
    if state.mrr_peak:
        peak = max(p[1] for p in state.mrr_peak)
        if peak > 0 and state.mrr_cents < peak:
            drop = 1 - state.mrr_cents / peak
            out["contraction"] = (drop, "MRR down {:.0%} from its {}-day peak",
                                  (drop, w.horizon_days))
    if state.cancel_at_period_end:
        out["cancellation_scheduled"] = (1.0, "cancels at the end of the billing period", ())
    if paused:
        if state.pause_resumes_at:
            out["paused"] = (1.0, "subscription paused, resumes in {:.0f} days",
                             ((state.pause_resumes_at - now) / DAY,))
        else:
            out["paused"] = (1.0, "subscription paused", ())
    if state.open_tickets or state.reopened or state.slow_resolutions:
        high = sum(state.open_tickets.values())
        burden = len(state.open_tickets) + high + len(state.reopened) + len(
            state.slow_resolutions)
        out["support_burden"] = (float(burden), "{} open ({} high), {} reopened in 30d",
                                 (len(state.open_tickets), high, len(state.reopened)))
    month_ago = now - 30 * DAY
    if state.bad_csat_at and state.bad_csat_at >= month_ago:
        out["negative_feedback"] = (1.0, "bad CSAT in the last 30 days", ())
    elif state.nps is not None and state.nps <= 6 and (state.nps_at or 0) >= now - 90 * DAY:
        out["negative_feedback"] = (1.0, "NPS detractor ({})", (state.nps,))
    return out


def _activated(state: AccountState, policy: Policy) -> bool:
    # prune() records the generic activation once it is reached (see generic_activation)
    return state.activated_at is not None or (
        not policy.onboarding.activation_events and generic_activation(state, policy))


def score(state: AccountState, now: float, policy: Policy) -> Score:
    """The score, its natural band and its reasons, strongest first: by the policy's fitted
    model where it has one, else by its rules."""
    if policy.model is not None:
        return model_score(state, now, policy, signals(state, now, policy))
    reasons = []
    table = policy.signal_table
    for code, (value, template, args) in signals(state, now, policy).items():
        weight, start, full = table[code]
        counts = strength(start, full, value)
        points = weight * counts
        if points > 0 or (counts > 0 and code in IMMEDIATE):
            kind, play = REASONS[code]
            reasons.append(Reason(code, value, points, kind, play, template.format(*args)))
    reasons.sort(key=lambda r: (-r.contribution, r.code))
    # 0.0, not 0, without reasons: a compiled build stores the float the annotation says, and
    # both builds then write the same state and CSV text.
    total = min(100.0, round(sum((r.contribution for r in reasons), 0.0), 1))
    return Score(total, policy.band_of(total), tuple(reasons))
