"""Features from state and scoring by a fitted model (stream.features, stream.model)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.stream.engine import apply_batch, rescore
from churnsignal.stream.features import catalogue, values
from churnsignal.stream.model import sigmoid
from churnsignal.stream.policy import Model, Policy
from churnsignal.stream.state import DAY, AccountState

NOW = 1_764_000_000.0


def track(n: int, age_days: float, name: str, user: str = "u1") -> Any:
    return EVENT_ADAPTER.validate_python({
        "event_id": f"e{n}", "account_id": "acme", "type": "feature_used", "user_id": user,
        "occurred_at": datetime.fromtimestamp(NOW - age_days * DAY, tz=UTC).isoformat(),
        "data": {"name": name}})


def model(features: list[str], coefficients: list[float], types: list[str] | None = None,
          intercept: float = -2.0) -> Model:
    feats = {f.name: f for f in catalogue([t.lower() for t in types or []])}
    return Model(event_types=types or [], features=features,
                 transforms=[feats[f].transform for f in features],  # type: ignore[misc]
                 means=[0.0] * len(features), scales=[1.0] * len(features),
                 coefficients=coefficients, intercept=intercept)


def history(names: list[str], days: int = 60) -> list[tuple[str, int, Any]]:
    items, n = [], 0
    for age in range(days, 0, -1):
        for name in names:
            n += 1
            items.append(("u/0", n, track(n, age + 0.5, name)))
    return items


def test_tracked_types_get_their_own_columns_and_survive_a_round_trip() -> None:
    policy = Policy(model=model(["events_28d"], [-1.0], types=["report exported", "error"]))
    state = apply_batch(None, "acme", history(["Report Exported", "Error", "Other"], 40),
                        NOW, policy).state
    assert state.types == ["report exported", "error"]
    feats = values(state, NOW, policy)
    per_type = feats["events_28d"] / 3  # three names a day
    assert per_type in (27, 28)  # the 28 days up to today, by day bucket
    assert feats["type:report exported:events_28d"] == feats["type:error:events_28d"] == per_type
    assert feats["type:error:days_since"] == 1  # its newest, a day and a half ago
    again = AccountState.from_bytes(state.to_bytes())
    assert again == state
    # a policy tracking other types keeps the counts of the types both track
    other = Policy(model=model(["events_28d"], [-1.0], types=["error", "login"]))
    state = apply_batch(state, "acme", [("u/0", 10_000, track(10_000, 0.1, "Login"))],
                        NOW, other).state
    feats = values(state, NOW, other)
    assert state.types == ["error", "login"]
    assert feats["type:error:events_28d"] == per_type and feats["type:login:events_28d"] == 1


def test_a_format_2_state_is_read_by_format_3() -> None:
    state = apply_batch(None, "acme", history(["A"], 10), NOW, Policy()).state
    data = orjson.loads(AccountState.json_of(state.to_bytes()))
    data["v"] = 2
    data.pop("types", None)  # format 3 leaves out what is a field's default (no types here)
    del data["policy"]
    old = AccountState.from_bytes(orjson.dumps(data))
    assert old.policy == "" and old.types == []  # format 2 knew neither
    old.policy = state.policy
    assert old == state


def test_young_accounts_are_scaled_to_the_window_not_mistaken_for_quiet() -> None:
    policy = Policy()
    young = apply_batch(None, "acme", history(["A"], 10), NOW, policy).state
    feats = values(young, NOW, policy)
    assert feats["tenure_days"] == pytest.approx(10.5)  # its first event, 10.5 days ago
    assert feats["events_28d"] == pytest.approx(10 * 28 / 10.5)
    assert feats["active_days_share_28d"] == pytest.approx(10 / 10.5)
    assert feats["trend_28d"] == 0.0  # no past of its own to compare with


def billing(n: int, age_days: float, kind: str, **data: Any) -> Any:
    return EVENT_ADAPTER.validate_python({
        "event_id": f"b{n}", "account_id": "acme", "type": kind,
        "occurred_at": datetime.fromtimestamp(NOW - age_days * DAY, tz=UTC).isoformat(),
        "data": {"invoice_id": f"in_{n}", "amount_cents": 4900, **data}})


def test_failed_payments_settled_since_stay_history_not_an_open_failure() -> None:
    """A failure a later payment settled no longer pages, but counts as payment trouble (84
    days, and how recent); a failure arriving after the payment that settled it is history
    too; failures older than the horizon are forgotten."""
    policy = Policy()
    items = [("b/0", 1, billing(1, 100, "payment_failed", next_attempt_at=None)),
             ("b/0", 2, billing(2, 40, "payment_failed",
                                next_attempt_at=datetime.fromtimestamp(NOW, tz=UTC).isoformat())),
             ("b/0", 3, billing(3, 37, "invoice_paid")),
             ("b/0", 4, billing(4, 38, "payment_failed", next_attempt_at=None)),  # late
             ("b/0", 5, billing(5, 6, "payment_failed",
                                next_attempt_at=datetime.fromtimestamp(NOW, tz=UTC).isoformat()))]
    state = apply_batch(None, "acme", items, NOW, policy).state
    assert len(state.failed_payments) == 3  # 100 days ago: beyond the 90-day horizon
    feats = values(state, NOW, policy)
    assert feats["failed_payments_30d"] == 1  # only the one after the payment
    assert feats["failed_payments_84d"] == 3
    assert feats["days_since_failed_payment"] == pytest.approx(6.0)
    codes = {r.code for r in rescore(state, NOW, policy).scored.reasons}  # type: ignore[union-attr]
    assert "payment_failed" in codes and "payment_failed_final" not in codes
    paid = apply_batch(state, "acme", [("b/0", 6, billing(6, 1, "invoice_paid"))], NOW,
                       policy).state
    feats = values(paid, NOW, policy)
    assert feats["failed_payments_30d"] == 0 and feats["failed_payments_84d"] == 3
    assert not {"payment_failed", "payment_failed_final"} & {
        r.code for r in rescore(paid, NOW, policy).scored.reasons}  # type: ignore[union-attr]
    assert values(AccountState("x"), NOW, policy)["days_since_failed_payment"] == 84


def test_the_model_score_is_its_probability_and_reasons_share_it() -> None:
    m = model(["events_28d", "days_since_usage", "open_tickets"], [-1.0, 0.8, 0.5],
              intercept=1.0)
    policy = Policy(model=m)
    state = apply_batch(None, "acme", history(["A"], 40)[:5], NOW, policy).state
    out = rescore(state, NOW, policy)
    raw = values(state, NOW, policy)
    logit = 1.0 - math.log1p(raw["events_28d"]) + 0.8 * math.log1p(raw["days_since_usage"])
    assert out.scored is not None
    assert out.scored.score == round(100 * sigmoid(logit), 1)
    reasons = {r.code: r for r in out.scored.reasons}
    assert set(reasons) == {"inactivity"}  # the only feature raising the risk
    assert reasons["inactivity"].contribution == pytest.approx(out.scored.score)
    assert reasons["inactivity"].detail == f"{raw['days_since_usage']:.0f} days since last activity"


def test_rules_that_must_act_at_once_still_do_under_a_model() -> None:
    policy = Policy(model=model(["events_28d"], [-1.0], intercept=-8.0))
    state = apply_batch(None, "acme", history(["A"], 40), NOW, policy).state
    state.cancel_at_period_end = True
    scored = rescore(state, NOW, policy).scored
    assert scored is not None and scored.score < 1
    assert [r.code for r in scored.reasons] == ["cancellation_scheduled"]
    state.sub_status = "canceled"
    scored = rescore(state, NOW, policy).scored
    assert scored is not None and scored.score == 100 and scored.reasons[0].code == "canceled"


def test_a_model_policy_round_trips_through_yaml() -> None:
    import yaml

    policy = Policy(model=model(["events_28d", "type:x:days_since"], [-1.0, 0.3], types=["X"]))
    again = Policy.model_validate(yaml.safe_load(yaml.safe_dump(policy.model_dump(mode="json"))))
    assert again == policy and again.tracked_types == ["x"]
    rules = Policy()
    assert rules.tracked_types == []  # cached now: a copy with a model must not inherit it
    assert rules.model_copy(update={"model": policy.model}).type_columns == {"x": 7}
    with pytest.raises(ValueError, match="same length"):
        Model(features=["events_28d"], transforms=["log1p"], means=[], scales=[1.0],
              coefficients=[1.0], intercept=0.0)


def test_switching_policies_rebaselines_bands_without_an_alert_storm() -> None:
    rules = Policy()
    state = apply_batch(None, "acme", history(["A"], 60), NOW, rules).state
    assert state.policy == rules.version and state.band == "low"
    # a model that finds this account risky: under the old policy it would page at once
    risky = Policy(version="calibrated-1", model=model(["events_28d"], [0.5], intercept=2.0))
    out = rescore(state, NOW + 60, risky)
    assert out.scored is not None and out.scored.band == "critical"
    assert out.alert is None and state.alert_band == "critical" and state.policy == "calibrated-1"
    # from then on, changes under the new policy page as usual
    state.cancel_at_period_end = False
    calm = rescore(state, NOW + 120, risky)
    assert calm.alert is None  # same band: nothing to say
    # an immediate reason pages even on the switch
    state.cancel_at_period_end = True
    state.alert_band = state.band = "low"
    out = rescore(state, NOW + 180, Policy(version="calibrated-2",
                                           model=model(["events_28d"], [0.0], intercept=-9)))
    assert out.alert is not None and out.alert.reasons[0].code == "cancellation_scheduled"


def test_a_shadow_policy_is_scored_beside_the_live_one_and_tracks_its_types() -> None:
    from churnsignal.stream import packs
    from churnsignal.stream.clock import PartitionClock
    from churnsignal.stream.fold import SCORES, fold_step
    from churnsignal.stream.store import MemoryStateStore

    shadow = Policy(version="shadow-1", model=model(["type:export:events_28d"], [-1.0],
                                                     types=["export"], intercept=3.0))
    live = Policy().tracking(shadow)
    assert live.tracked_types == ["export"] and live.model is None
    item = {"event_id": "x1", "account_id": "acme", "type": "feature_used", "user_id": "u1",
            "occurred_at": datetime.fromtimestamp(NOW - 3600, tz=UTC).isoformat(),
            "data": {"name": "Export"}, "schema_version": 1}
    store = MemoryStateStore(4)
    result = fold_step(store, packs.decode(packs.encode(NOW, [["u/0", 1, item]])), 0, 1, live,
                       PartitionClock(), shadow=shadow)
    [row] = result.rows[SCORES]
    state = store.get("acme")
    assert state is not None and state.types == ["export"]
    expected = round(100 * sigmoid(3.0 - math.log1p(28.0)), 1)  # one export, a day old: x28
    assert row[9:] == ("default-1", expected, Policy().band_of(expected), "shadow-1")
    assert result.alerts == [] or all(a.alert.policy_version == "default-1"
                                      for a in result.alerts)
