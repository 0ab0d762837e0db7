"""Alert decisions: band changes with hysteresis, cooldown and immediate billing alerts (pure)."""

from __future__ import annotations

import hashlib

from churnsignal.schemas.alerts import Alert, AlertReason
from churnsignal.stream.attributes import mapped
from churnsignal.stream.policy import BANDS, Band, Policy
from churnsignal.stream.reasons import IMMEDIATE, Reason, Score
from churnsignal.stream.state import AccountState


def _rank(band: str) -> int:
    return BANDS.index(band)


def natural_band(scored: Score, policy: Policy) -> Band:
    """The score's band, lifted to the band that pages while an immediate reason is present:
    whether it pages hangs on the signal being there, not on its weight (which calibration
    may have set to 0)."""
    band: Band = scored.band  # type: ignore[assignment]
    floor = policy.alerting.min_band
    if _rank(band) < _rank(floor) and any(r.code in IMMEDIATE for r in scored.reasons):
        return floor
    return band


def alert_reasons(reasons: tuple[Reason, ...], top: int) -> list[Reason]:
    """The strongest ``top`` reasons, with room made for the immediate ones: a reason worth
    0 points that paged must be on the page."""
    chosen = [r.code for r in reasons if r.code in IMMEDIATE][:top]
    chosen += [r.code for r in reasons if r.code not in IMMEDIATE][: top - len(chosen)]
    return [r for r in reasons if r.code in chosen]  # strongest first, as scored


def held_band(current: str, scored: Score, policy: Policy) -> Band:
    """The band after hysteresis: escalate at once, de-escalate only below threshold - margin."""
    natural = natural_band(scored, policy)
    if _rank(natural) >= _rank(current):
        return natural
    band: Band = current  # type: ignore[assignment]
    while _rank(band) > _rank(natural) and scored.score < (
        policy.threshold_of(band) - policy.alerting.hysteresis
    ):
        band = BANDS[_rank(band) - 1]
    return band


ACK_ACTIONS = ("ack", "snooze")


def acknowledge(state: AccountState, action: str, until: float = 0.0) -> None:
    """Someone took an alert in hand (POST /api/accounts/ID/ack or /snooze): escalations to
    the account's current band or below stay quiet until it rises above that band, falls to
    low, or (a snooze) ``until`` passes. De-escalations still go out (they resolve incidents),
    except those of escalations that stayed quiet."""
    if action not in ACK_ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    state.ack_band = state.band
    state.ack_until = float(until) if action == "snooze" else 0.0


def quieted(state: AccountState, band: str, now: float) -> bool:
    """Whether an escalation to ``band`` is held back by an ack or a snooze (one that no
    longer applies is cleared)."""
    if not state.ack_band:
        return False
    if (state.ack_until and now >= state.ack_until) or _rank(band) > _rank(state.ack_band):
        state.ack_band, state.ack_until = "", 0.0
        return False
    return True


def decide(state: AccountState, scored: Score, now: float, trigger_event_id: str | None,
           triggered_at: float, policy: Policy, *, alerting: bool = True) -> Alert | None:
    """Update the band bookkeeping in ``state``; return the alert to emit, if any.

    With ``alerting`` off (back-fill), the band moves but ``alert_band`` does not, so the
    first live score compares against what was last alerted.
    """
    previous = state.band
    band = held_band(previous, scored, policy)
    state.score, state.band, state.scored_at = scored.score, band, now
    # A new policy scores on its own scale: its first band is the new baseline, not a
    # change to page about (hysteresis and cooldown carry over), or switching policies
    # would set off an alert storm. What must page at once still does.
    switched = bool(state.policy) and state.policy != policy.version
    state.policy = policy.version
    codes = {r.code for r in scored.reasons}
    if switched and not codes & IMMEDIATE:
        state.alert_band = band
        return None
    if state.ack_band and band == "low":  # recovered: an ack or snooze ends
        state.ack_band, state.ack_until = "", 0.0
    if not alerting:
        return None
    rules = policy.alerting
    alert_kind: str | None = None
    if _rank(band) > _rank(state.alert_band) and _rank(band) >= _rank(rules.min_band):
        cooled = now - state.last_alert_at >= rules.cooldown_hours * 3600
        if (cooled or codes & IMMEDIATE or state.alerts == 0) and not quieted(
                state, band, now):
            alert_kind = "escalated"
    elif _rank(band) < _rank(state.alert_band) and _rank(state.alert_band) >= _rank(
        rules.min_band
    ):
        alert_kind = "deescalated"
    if alert_kind is None:
        if _rank(band) < _rank(state.alert_band):
            state.alert_band = band
        return None
    alert_previous = state.alert_band
    state.alert_band = band
    state.last_alert_at = now
    state.alerts += 1
    identity = f"{state.account_id}|{state.seq}|{state.alerts}|{band}|{alert_kind}"
    alert_id = hashlib.sha256(identity.encode()).hexdigest()[:32]
    reasons = [AlertReason(**r.as_dict()) for r in alert_reasons(scored.reasons,
                                                                 rules.top_reasons)]
    return Alert(
        alert_id=alert_id,
        account_id=state.account_id,
        kind=alert_kind,
        score=scored.score,
        band=band,
        previous_band=alert_previous,
        reasons=reasons,
        mrr_at_risk_cents=max(0, state.mrr_cents) if alert_kind == "escalated" else 0,
        trigger_event_id=trigger_event_id,
        triggered_at=triggered_at,
        emitted_at=now,
        policy_version=policy.version,
        plan=state.plan,
        attributes=mapped(state.attributes, policy.accounts.traits),
    )
