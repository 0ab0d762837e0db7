"""Immediate alerts (scheduled cancellation, retries exhausted) fire on the signal being
present, whatever its weight: a calibrated policy may weigh billing signals 0 (issue #15)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.stream.alerts import alert_reasons
from churnsignal.stream.engine import Item, apply_batch, rescore
from churnsignal.stream.policy import Policy
from churnsignal.stream.scoring import score
from churnsignal.stream.state import DAY

POLICY = Policy()
NOW = 1_764_000_000.0


def weighted(policy: Policy, **weights: float) -> Policy:
    return policy.model_copy(update={"signals": policy.signals.model_copy(update={
        name: getattr(policy.signals, name).model_copy(update={"weight": w})
        for name, w in weights.items()})})


ZERO_BILLING = weighted(POLICY, cancellation_scheduled=0, payment_failed_final=0,
                        payment_failed=0)


def event(n: int, kind: str, ts: float, data: dict[str, Any]) -> Any:
    return EVENT_ADAPTER.validate_python({
        "event_id": f"e{n}", "account_id": "acme", "type": kind, "user_id": "u1",
        "occurred_at": datetime.fromtimestamp(ts, tz=UTC).isoformat(), "data": data})


def steady(days: int = 35, per_day: int = 5) -> list[Item]:
    """A healthy, subscribed account: the same use every day, several features."""
    items: list[Item] = [("billing/0", 0, event(0, "subscription_created", NOW - days * DAY,
                                                {"status": "active", "mrr_cents": 9900}))]
    n = 0
    for age in range(days, 0, -1):
        for i in range(per_day):
            n += 1
            items.append(("usage/0", n, event(n, "feature_used", NOW - age * DAY + i * 60,
                                              {"feature": f"f{i % 4}"})))
    return items


def cancel_scheduled(n: int, ts: float, scheduled: bool = True) -> Item:
    return ("billing/0", n, event(n, "subscription_updated", ts, {
        "status": "active", "cancel_at_period_end": scheduled}))


def test_scheduled_cancellation_alerts_at_once_at_weight_zero() -> None:
    healthy = apply_batch(None, "acme", steady(), NOW - DAY, ZERO_BILLING)
    assert healthy.alert is None and healthy.state.band == "low"

    out = apply_batch(healthy.state, "acme", [cancel_scheduled(1, NOW - 60)], NOW, ZERO_BILLING)
    assert out.scored is not None
    # worth no points, but present: still a reason, so the alert rules see it
    reason = {r.code: r for r in out.scored.reasons}["cancellation_scheduled"]
    assert reason.contribution == 0 and reason.play == "offer_pause_or_plan_change"
    assert out.scored.score < ZERO_BILLING.thresholds.medium
    assert out.alert is not None and out.alert.kind == "escalated"
    assert out.alert.band == ZERO_BILLING.alerting.min_band
    assert "cancellation_scheduled" in [r.code for r in out.alert.reasons]

    # no second page while it stays scheduled; revoked, the account goes back to low
    assert rescore(out.state, NOW + 3600, ZERO_BILLING).alert is None
    revoked = apply_batch(out.state, "acme", [cancel_scheduled(2, NOW + 7200, False)],
                          NOW + 7300, ZERO_BILLING)
    assert revoked.alert is not None and revoked.alert.kind == "deescalated"
    assert revoked.state.band == "low"


def test_exhausted_retries_alert_at_once_at_weight_zero() -> None:
    healthy = apply_batch(None, "acme", steady(), NOW - DAY, ZERO_BILLING).state
    final = ("billing/0", 1, event(1, "payment_failed", NOW - 60, {"attempt_count": 4}))
    out = apply_batch(healthy, "acme", [final], NOW, ZERO_BILLING)
    assert out.alert is not None and out.alert.kind == "escalated"
    assert [r.code for r in out.alert.reasons] == ["payment_failed_final"]
    assert out.alert.reasons[0].kind == "involuntary"


def test_immediate_alert_ignores_the_cooldown_at_weight_zero() -> None:
    # alerted (for something else) an hour ago and back to low since: a scheduled
    # cancellation still pages now, not after the 24-hour cooldown
    state = apply_batch(None, "acme", steady(), NOW - DAY, ZERO_BILLING).state
    state.alerts, state.last_alert_at = 1, NOW - 3600
    out = apply_batch(state, "acme", [cancel_scheduled(1, NOW - 60)], NOW, ZERO_BILLING)
    assert out.alert is not None and out.alert.kind == "escalated"


def test_an_immediate_reason_is_on_the_alert_whatever_its_rank() -> None:
    # a week of silence after steady use: inactivity and usage decline outrank a 0-point
    # cancellation; with one reason per alert, the cancellation is the one
    policy = ZERO_BILLING.model_copy(update={
        "alerting": ZERO_BILLING.alerting.model_copy(update={"top_reasons": 1})})
    quiet = NOW - 10 * DAY
    state = apply_batch(None, "acme", [i for i in steady() if i[2].occurred_at.timestamp()
                                       < quiet], quiet, policy).state
    out = apply_batch(state, "acme", [cancel_scheduled(1, NOW - 60)], NOW, policy)
    assert out.scored is not None and out.scored.reasons[0].code != "cancellation_scheduled"
    assert out.alert is not None
    assert [r.code for r in out.alert.reasons] == ["cancellation_scheduled"]
    # otherwise the strongest first, as scored
    codes = [r.code for r in alert_reasons(out.scored.reasons, 3)]
    assert "cancellation_scheduled" in codes
    assert codes == [r.code for r in out.scored.reasons if r.code in codes]


def test_zero_weight_reasons_that_are_not_immediate_stay_out() -> None:
    policy = weighted(POLICY, inactivity=0)
    state = apply_batch(None, "acme", steady(), NOW, policy).state
    later = NOW + 20 * DAY  # silent since: inactivity is present, worth 0 points here
    assert "inactivity" not in [r.code for r in score(state, later, policy).reasons]
    assert "inactivity" in [r.code for r in score(state, later, POLICY).reasons]


def test_shipped_weights_alert_as_before() -> None:
    healthy = apply_batch(None, "acme", steady(), NOW - DAY, POLICY).state
    out = apply_batch(healthy, "acme", [cancel_scheduled(1, NOW - 60)], NOW, POLICY)
    assert out.alert is not None and out.alert.band == "critical"
    assert out.alert.reasons[0].code == "cancellation_scheduled"
    assert out.alert.reasons[0].contribution == 80
