"""calibrate's pure parts: the bands' alert estimate against the worker's own alert rules,
thresholds by precision and by alert budget, deterministic row thinning, what is known at
--until, and which rule signals a history cannot inform."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pytest

from churnsignal.offline.calibrate import (
    MIN_FLAGGED,
    _Alerts,
    _derived,
    _high,
    _known_by,
    _Rows,
    _screen,
    _uninformed,
)
from churnsignal.offline.history import DAY, Subscriptions
from churnsignal.offline.history_native import NativeHistory
from churnsignal.stream.alerts import decide
from churnsignal.stream.features import catalogue
from churnsignal.stream.policy import Policy
from churnsignal.stream.reasons import Reason, Score
from churnsignal.stream.state import AccountState

POLICY = Policy()
SPLIT = 20_000  # a day index


def _alerts(scores: list[float], accounts: list[int], days: list[int],
            rule: list[int] | None = None) -> _Alerts:
    return _Alerts(np.array(scores), np.array(accounts), np.array(days),
                   np.array(rule or [0] * len(scores), dtype=np.int8), SPLIT, 1, POLICY)


def test_the_alert_estimate_counts_what_the_worker_would_send() -> None:
    """Random score paths through stream.alerts.decide (hysteresis, immediate rules lifting
    to the paging band) escalate exactly as often as the estimate counts."""
    rng = random.Random(15)
    thresholds = (20.0, 40.0, 70.0)
    policy = POLICY.model_copy(update={"thresholds": POLICY.thresholds.model_copy(update={
        "medium": 20.0, "high": 40.0, "critical": 70.0})})
    scores, accounts, days, rule = [], [], [], []
    expected = 0
    for account in range(40):
        state = AccountState(account_id=f"a{account}")
        level = rng.uniform(0, 80)
        for day in range(SPLIT - 40, SPLIT + 60):
            level = min(100.0, max(0.0, level + rng.gauss(0, 8)))
            s = round(level, 1)
            immediate = rng.random() < 0.02
            reasons = (Reason("cancellation_scheduled", 1.0, 0.0, "voluntary", "offer", ""),) \
                if immediate else ()
            alert = decide(state, Score(s, policy.band_of(s), reasons), day * DAY, None,
                           day * DAY, policy)
            if alert is not None and alert.kind == "escalated" and day >= SPLIT:
                expected += 1
            scores.append(s)
            accounts.append(account)
            days.append(day)
            rule.append(1 if immediate else 0)
    estimate = _Alerts(np.array(scores), np.array(accounts), np.array(days),
                       np.array(rule, dtype=np.int8), SPLIT, 1, policy)
    assert expected > 20
    assert estimate.count(thresholds) == expected
    # per 100 accounts per week: 40 accounts a day over 60 validation days
    assert estimate.per_100_per_week(thresholds) == pytest.approx(
        expected / 0.4 / (60 / 7))


def test_high_by_precision_is_the_lowest_threshold_reaching_it() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(5000) < 0.1
    scores = np.round(np.clip(rng.normal(30, 15, 5000) + 25 * y, 0, 100), 1)
    high, rule, notes = _high(scores, scores, y, _alerts([1.0], [0], [SPLIT]), 0.03, 0.5, None)
    assert "precision 50%" in rule and not notes

    def precision(t: float) -> float:
        return float(y[scores >= t].mean())

    assert precision(high) >= 0.5 and (scores >= high).sum() >= MIN_FLAGGED
    lower = [t for t in np.unique(scores) if t < high and (scores >= t).sum() >= MIN_FLAGGED]
    assert all(precision(t) < 0.5 for t in lower)
    # the written model's scores on another scale: high flags as many account-days
    written = scores / 2 + 7
    again, _, _ = _high(written, scores, y, _alerts([1.0], [0], [SPLIT]), 0.03, 0.5, None)
    assert (written >= again).sum() == (scores >= high).sum()
    # out of reach: said, and set where precision is highest
    high, rule, notes = _high(scores, scores, y, _alerts([1.0], [0], [SPLIT]), 0.03, 0.99, None)
    assert "not reached" in rule and "no threshold reaches precision 99%" in notes[0]


def test_high_by_alert_budget_fits_the_budget_at_the_lowest_threshold() -> None:
    rng = np.random.default_rng(4)
    accounts = np.repeat(np.arange(200), 90)
    days = np.tile(np.arange(SPLIT - 30, SPLIT + 60), 200)
    drift = rng.normal(0, 4, accounts.size).reshape(200, 90).cumsum(axis=1).ravel()
    scores = np.round(np.clip(np.repeat(rng.uniform(0, 60, 200), 90) + drift, 0, 100), 1)
    alerts = _Alerts(scores, accounts, days, np.zeros(scores.size, dtype=np.int8), SPLIT, 1,
                     POLICY)
    valid = days >= SPLIT
    high, rule, _ = _high(scores[valid], scores[valid], np.zeros(valid.sum(), bool), alerts,
                          0.03, None, 2.0)
    assert rule == "alert budget 2 per 100 accounts per week"
    volume = alerts.per_100_per_week(_derived(high, scores[valid]))
    assert volume is not None and volume <= 2.0
    below = max(t for t in np.unique(scores[valid]) if t < high)
    assert (alerts.per_100_per_week(_derived(below, scores[valid])) or 0) > 2.0


def test_derived_bands_are_ordered_and_bracket_high() -> None:
    scores = np.linspace(0, 60, 1000)
    medium, high, critical = _derived(50.0, scores)
    assert 0 < medium < high == 50.0 < critical <= 100
    assert np.mean(scores >= critical) == pytest.approx(np.mean(scores >= high) / 3, abs=0.01)
    assert np.mean(scores >= medium) == pytest.approx(3 * np.mean(scores >= high), abs=0.01)
    assert _derived(0.0, np.zeros(10)) == (0.1, 0.2, 0.3)  # a flat score still validates


def test_rows_thin_deterministically_to_a_subset() -> None:
    def fill(max_rows: int) -> _Rows:
        rows = _Rows(2, 1, max_rows)
        for day in range(100):
            for account in ("a", "b", "c", "d"):
                code = rows.wanted(account, day)
                if code is not None:
                    rows.add(code, day, [float(day), 1.0], [0.5], day % 7 == 0, 0)
        return rows

    full, thin = fill(10_000), fill(150)
    assert len(full) == 400 and full.stride == 1
    assert thin.stride == 4 and len(thin) <= 150
    assert len(thin) == pytest.approx(100, abs=4)  # every 4th day of each account
    kept = set(zip(thin.account, thin.day, strict=True))
    assert kept <= set(zip(full.account, full.day, strict=True))
    assert kept == set(zip(fill(150).account, fill(150).day, strict=True))  # same every run
    assert list(np.frombuffer(thin.x, np.float32)[::2]) == list(thin.day)  # rows stay whole


def test_only_what_was_known_at_until() -> None:
    subs = Subscriptions()
    subs.periods["ended"] = [(0.0, 50.0, 100, None)]
    subs.periods["ends_later"] = [(0.0, 150.0, 100, None)]
    subs.periods["starts_later"] = [(120.0, None, 100, None)]
    _known_by(subs, 100.0)
    assert subs.periods == {"ended": [(0.0, 50.0, 100, None)],
                            "ends_later": [(0.0, None, 100, None)]}


def test_features_too_few_accounts_had_are_dropped_and_their_rules_kept() -> None:
    feats = catalogue(["export"])
    names = [f.name for f in feats]
    n = 300
    accounts = np.arange(n) % 30
    x = np.zeros((n, len(feats)))
    x[:, names.index("events_28d")] = np.arange(n)
    x[:, names.index("seats")] = 5.0  # the same everywhere
    x[accounts < 3, names.index("cancel_scheduled")] = 1.0  # three accounts only
    x[:, names.index("type:export:events_28d")] = accounts
    kept, dropped = _screen(x, accounts, feats)
    assert [names[j] for j in kept] == ["events_28d", "type:export:events_28d"]
    assert dropped["past_due"] == "no account in the training period had it"
    assert dropped["seats"] == "the same value at every training checkpoint"
    assert dropped["cancel_scheduled"] == (
        "only 3 account(s) in the training period had it (fitting needs 10)")
    kept_rules = _uninformed(feats, dropped)
    assert kept_rules["cancellation_scheduled"] == dropped["cancel_scheduled"]
    assert kept_rules["payment_failed"] == "no account in the training period had it"
    assert kept_rules["low_feature_breadth"] == "no feature of the model reads it"
    assert "key_event_decline" not in kept_rules  # its per-type counts were fitted
    assert "low_engagement" not in kept_rules  # a model reason, not a rule signal
    assert _uninformed(catalogue([]), {})["key_event_decline"] == "no event type is tracked"


def _track(n: int, name: str, day: int, count: int = 1) -> bytes:
    at = datetime(2025, 1, 1, tzinfo=UTC).timestamp() + day * DAY + 3600
    event: dict[str, Any] = {
        "event_id": f"e{n}", "account_id": "acme", "type": "track",
        "occurred_at": datetime.fromtimestamp(at, tz=UTC).isoformat(),
        "data": {"name": name, "count": count}}
    return orjson.dumps(event)


def test_native_history_counts_usage_names_before_until() -> None:
    native = NativeHistory()
    try:
        native.add(_track(1, "Report Exported", 0, count=5))
        native.add(_track(2, "report exported", 1))
        native.add(_track(3, "Viewed", 2, count=3))
        native.add(_track(4, "Viewed", 10, count=9))  # after --until
        until = datetime(2025, 1, 10, tzinfo=UTC).timestamp()
        assert native.top_usage_names(until, 5) == ["report exported", "viewed"]
        assert native.top_usage_names(until + 2 * DAY, 1) == ["viewed"]
    finally:
        native.close()


def test_band_figures_count_the_written_scores_and_judge_the_honest_ranking() -> None:
    from churnsignal.offline.calibrate import _band_figures

    written = np.array([90.0, 80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0, 5.0])
    honest = np.array([1.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 0.0])  # another order
    y = np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    policy = POLICY.model_copy(update={"thresholds": POLICY.thresholds.model_copy(update={
        "medium": 45.0, "high": 65.0, "critical": 85.0})})
    alerts = _alerts(list(written), list(range(10)), [SPLIT] * 10)
    medium, high, critical = _band_figures(policy, written, honest, y, alerts)
    assert (high.share, high.threshold, high.pages) == (0.3, 65.0, True)
    # the written model flags 3 account-days; precision: the honest fit's riskiest 3
    assert high.precision == pytest.approx(2 / 3)
    assert critical.share == 0.1 and critical.precision == 1.0 and not critical.pages
    assert medium.share == 0.5 and medium.precision == pytest.approx(2 / 5)
    # one checkpoint per account, each starting low: every account at or above a band pages
    assert high.alerts_per_100_per_week == pytest.approx(3 / 10 * 100 / (1 / 7))
