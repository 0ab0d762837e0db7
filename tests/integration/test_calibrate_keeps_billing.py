"""Calibrating on a usage-only history must not switch off billing alerts (issue #15): the
billing signals it never saw keep their shipped weights, the report says so, and a scheduled
cancellation scored with the written policy still alerts at once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from churnsignal.offline.backtest import Inputs
from churnsignal.offline.calibrate import calibrate, write_policy
from churnsignal.offline.synthetic_history import EVENT_NAMES, generate
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.stream.engine import Item, apply_batch
from churnsignal.stream.policy import Policy, load_policy
from churnsignal.stream.state import DAY

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.offline]

SHIPPED = load_policy()
BILLING = ("cancellation_scheduled", "payment_failed_final", "payment_failed", "card_expiring")
NOW = datetime(2025, 9, 1, tzinfo=UTC).timestamp()


def _event(n: int, kind: str, ts: float, data: dict[str, Any], user: str = "u1") -> Any:
    return EVENT_ADAPTER.validate_python({
        "event_id": f"e{n}", "account_id": "acme", "type": kind, "user_id": user,
        "occurred_at": datetime.fromtimestamp(ts, tz=UTC).isoformat(), "data": data})


def _scheduled_cancellation(policy: Policy) -> Any:
    """A healthy subscribed account that schedules its cancellation, through the engine
    (healthy by the product's own measure: busy, several users, its usual actions)."""
    items: list[Item] = [("billing/0", 0, _event(0, "subscription_created", NOW - 40 * DAY,
                                                 {"status": "active", "mrr_cents": 9900}))]
    for age in range(40, 0, -1):
        for i in range(12):
            n = len(items)
            name = EVENT_NAMES[i % len(EVENT_NAMES)]
            items.append(("usage/0", n, _event(n, "feature_used", NOW - age * DAY + i * 600,
                                               {"name": name, "feature": name}, f"u{i % 4}")))
    state = apply_batch(None, "acme", items, NOW - DAY, policy).state
    assert state.band in ("low", "medium"), state.score  # nothing to page about yet
    cancel = ("billing/0", len(items), _event(len(items), "subscription_updated", NOW - 60, {
        "status": "active", "cancel_at_period_end": True}))
    return apply_batch(state, "acme", [cancel], NOW, policy)


def test_usage_only_calibration_keeps_billing_weights_and_immediate_alerts(
        tmp_path: Path) -> None:
    # warehouse usage and subscription periods only: no billing event ever (churn by level
    # of use: enough churners early on for a model fitted on the months before validation)
    generate(tmp_path, accounts=120, days=240, seed=5, churn_share=0.45,
             mechanisms={"level": 1}, native=False)
    inputs = Inputs(tmp_path / "events.csv", tmp_path / "subscriptions.csv", SHIPPED, None)
    result = calibrate(inputs, datetime(2025, 8, 1, tzinfo=UTC).timestamp())

    # usage is fitted; what the history never showed keeps the shipped weight, with a why
    assert "usage_decline" not in result.kept_shipped
    for name in BILLING:
        assert result.kept_shipped[name] == "no account in the training period had it", name
        assert result.weights[name] == getattr(SHIPPED.signals, name).weight > 0
    out = tmp_path / "policy.yaml"
    write_policy(result.policy, out, result.kept_shipped)
    header = out.read_text().split("\nversion:")[0]
    assert "# cancellation_scheduled: kept weight 80 from the starting policy" in header

    # (a) the written policy, as the worker loads it
    written = load_policy(out)
    assert written.version.startswith("calibrated-")
    for name in BILLING:
        assert getattr(written.signals, name).weight == getattr(SHIPPED.signals, name).weight

    # (b) a scheduled cancellation scored with it (by its fitted model, which never saw one)
    # alerts at once, the reason on the page
    assert written.model is not None and "cancel_scheduled" not in written.model.features
    alerted = _scheduled_cancellation(written)
    assert alerted.alert is not None and alerted.alert.kind == "escalated"
    assert "cancellation_scheduled" in [r.code for r in alerted.alert.reasons]

    # and would have even at the weight 0 the unfixed calibration wrote
    zeroed = written.model_copy(update={"signals": written.signals.model_copy(update={
        name: getattr(written.signals, name).model_copy(update={"weight": 0.0})
        for name in BILLING})})
    still = _scheduled_cancellation(zeroed)
    assert still.alert is not None and still.alert.kind == "escalated"
    assert "cancellation_scheduled" in [r.code for r in still.alert.reasons]
