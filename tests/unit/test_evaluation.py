"""The backtest's and calibrate's evaluation (churnsignal/offline/evaluation.py): figures checked
by hand on small cases, against scikit-learn on larger ones, and bootstrap intervals that resample
accounts, reproducibly."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from churnsignal.offline.evaluation import (
    BASELINES,
    SCORE,
    Baselines,
    Collector,
    Scored,
    active_days,
    compare,
    trailing_events,
)
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.policy import Policy
from churnsignal.stream.scoring import score
from churnsignal.stream.state import DAY

MIDNIGHT = 1_764_028_800.0  # 2025-11-25 00:00 UTC


def scored(scores: dict[str, list[float]], labels: list[int],
           accounts: list[int] | None = None) -> Scored:
    return Scored.of(accounts if accounts is not None else list(range(len(labels))), labels,
                     scores)


def test_a_hand_computed_case() -> None:
    # risk 3 (churned), 2 (stayed), 2 (churned), 1 (stayed)
    c = compare(scored({SCORE: [3, 2, 2, 1]}, [1, 0, 1, 0]), resamples=0)
    f = c.systems[SCORE]
    # pairs: 3 beats both stayers (2); the churned 2 ties one and beats one (1.5): 3.5 / 4
    assert f.roc_auc == pytest.approx(0.875)
    # precision at 3: 1/1, at 2: 2/3; each threshold adds half the recall
    assert f.pr_auc == pytest.approx((1 + 2 / 3) / 2)
    # the riskiest 10 % (0.4 of a checkpoint) all lie at 3, a churner: rate 1 / base rate 0.5
    assert f.top_decile_lift == pytest.approx(2.0)
    assert f.roc_auc_ci is None  # no resamples, no intervals


def test_a_perfect_score_a_reversed_one_and_a_constant_one() -> None:
    labels = [1] * 10 + [0] * 90
    perfect = [100.0 - i for i in range(100)]
    c = compare(scored({SCORE: perfect, "reversed": perfect[::-1], "flat": [5.0] * 100},
                       labels), resamples=0)
    p, r, flat = c.systems[SCORE], c.systems["reversed"], c.systems["flat"]
    assert (p.roc_auc, p.pr_auc, p.top_decile_lift) == (1.0, 1.0, pytest.approx(10.0))
    assert [d.churn_rate for d in p.deciles] == [1.0] + [0.0] * 9
    assert [d.cumulative_recall for d in p.deciles] == [1.0] * 10
    assert [d.checkpoints for d in p.deciles] == [10.0] * 10
    assert r.roc_auc == 0.0 and r.top_decile_lift == 0.0
    assert r.pr_auc == pytest.approx(np.mean([k / (90 + k) for k in range(1, 11)]))
    # all tied: no order at all, so chance, the base rate, no lift, every decile alike
    assert (flat.roc_auc, flat.pr_auc, flat.top_decile_lift) == (0.5, 0.1, pytest.approx(1.0))
    assert [d.churn_rate for d in flat.deciles] == pytest.approx([0.1] * 10)
    assert [d.cumulative_recall for d in flat.deciles] == pytest.approx(
        [k / 10 for k in range(1, 11)])
    assert c.best == SCORE and c.best_baseline == "flat" and c.margin == pytest.approx(0.5)
    assert "Best by ROC AUC: the score, 1.000 against 0.500" in c.verdict


def test_deciles_share_tied_scores_pro_rata() -> None:
    # 20 checkpoints: four at risk 9 (two churned), sixteen at 1 (two churned)
    labels = [1, 1, 0, 0] + [1, 1] + [0] * 14
    c = compare(scored({SCORE: [9.0] * 4 + [1.0] * 16}, labels), resamples=0)
    d = c.systems[SCORE].deciles
    assert [x.checkpoints for x in d] == [2.0] * 10
    # deciles 1-2 hold the four 9s: half churned; the rest share 2 churners in 16
    assert [x.churners for x in d] == pytest.approx([1, 1] + [0.25] * 8)
    assert d[0].churn_rate == 0.5 and d[5].churn_rate == pytest.approx(0.125)
    assert d[1].cumulative_recall == 0.5 and d[-1].cumulative_recall == pytest.approx(1.0)
    assert (d[0].score_range, d[2].score_range) == ((9.0, 9.0), (1.0, 1.0))
    assert c.systems[SCORE].top_decile_lift == pytest.approx(0.5 / 0.2)


def test_figures_match_scikit_learn_with_ties() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.08
    risk = rng.integers(0, 30, 5000) + 6 * labels  # coarse: many ties
    noise = rng.random(5000)
    c = compare(scored({SCORE: risk.tolist(), "noise": noise.tolist()}, labels.tolist()),
                resamples=0)
    for name, s in ((SCORE, risk), ("noise", noise)):
        assert c.systems[name].roc_auc == pytest.approx(metrics.roc_auc_score(labels, s))
        assert c.systems[name].pr_auc == pytest.approx(
            metrics.average_precision_score(labels, s))
    assert c.systems["noise"].roc_auc == pytest.approx(0.5, abs=0.04)  # a random score
    assert c.systems["noise"].top_decile_lift == pytest.approx(1.0, abs=0.35)


def _history(accounts: int = 60, per: int = 30, seed: int = 1) -> Scored:
    """Accounts with ``per`` checkpoints each, as in a backtest: an account's checkpoints share
    its label, and its informative score moves little from one day to the next."""
    rng = np.random.default_rng(seed)
    churns = rng.random(accounts) < 0.3
    acc = np.repeat(np.arange(accounts), per)
    labels = np.repeat(churns, per)
    good = labels + np.repeat(rng.normal(0, 0.8, accounts), per) + \
        rng.normal(0, 0.2, accounts * per)
    return Scored.of(acc.tolist(), labels.tolist(),
                     {SCORE: good.tolist(), "noise": rng.random(accounts * per).tolist()})


def test_bootstrap_intervals_contain_the_estimate_and_are_reproducible() -> None:
    data = _history()
    c = compare(data, resamples=200, seed=5)
    for f in c.systems.values():
        for value, ci in ((f.roc_auc, f.roc_auc_ci), (f.pr_auc, f.pr_auc_ci),
                          (f.top_decile_lift, f.top_decile_lift_ci)):
            assert ci is not None and value is not None
            assert ci[0] <= value <= ci[1]
            assert ci[0] < ci[1]
    assert compare(data, resamples=200, seed=5).as_dict() == c.as_dict()
    assert compare(data, resamples=200, seed=6).systems[SCORE].roc_auc_ci != \
        c.systems[SCORE].roc_auc_ci
    assert c.best_baseline == "noise" and c.margin is not None and c.margin_ci is not None
    assert c.margin_ci[0] <= c.margin <= c.margin_ci[1]
    assert c.resamples_ahead is not None and c.resamples_ahead[0] >= 190
    assert c.share_resamples_better == c.resamples_ahead[0] / 200
    assert f"ahead in {c.resamples_ahead[0]} of 200 resamples of accounts" in c.verdict
    assert c.stride == 1 and c.accounts == 60


def test_the_bootstrap_resamples_accounts_not_checkpoints() -> None:
    # Thirty copies of each account's one checkpoint carry no more evidence than one: resampled
    # by account, the intervals are the same (checkpoint resampling would shrink them ~5x).
    one = _history(per=1, seed=2)
    copies = Scored(np.repeat(one.accounts, 30), np.repeat(one.labels, 30),
                    {k: np.repeat(v, 30) for k, v in one.scores.items()})
    a, b = compare(one, seed=9), compare(copies, seed=9)
    assert b.systems[SCORE].roc_auc_ci == pytest.approx(a.systems[SCORE].roc_auc_ci)
    assert b.systems[SCORE].pr_auc_ci == pytest.approx(a.systems[SCORE].pr_auc_ci)


def test_large_histories_bootstrap_a_subsample_of_each_account() -> None:
    data = _history(accounts=80, per=50)
    full, sub = compare(data, seed=4), compare(data, seed=4, max_bootstrap_points=1000)
    assert (full.stride, sub.stride) == (1, 4)
    # point figures always use every checkpoint; intervals stay about the same
    assert sub.systems[SCORE].roc_auc == full.systems[SCORE].roc_auc
    point, ci, full_ci = (sub.systems[SCORE].roc_auc, sub.systems[SCORE].roc_auc_ci,
                          full.systems[SCORE].roc_auc_ci)
    assert point is not None and ci is not None and full_ci is not None
    assert ci[0] <= point <= ci[1]
    assert ci[1] - ci[0] == pytest.approx(full_ci[1] - full_ci[0], rel=0.25)


def test_a_better_baseline_is_named_and_identical_scores_are_no_alternative() -> None:
    data = _history(seed=7)
    swapped = Scored(data.accounts, data.labels, {SCORE: data.scores["noise"],
                                                  "events_30d": data.scores[SCORE],
                                                  "default_policy": data.scores["noise"]})
    c = compare(swapped)
    assert c.identical == ["default_policy"] and c.best_baseline == "events_30d"
    assert c.best == "events_30d" and c.margin is not None and c.margin < 0
    assert c.verdict.startswith("Best by ROC AUC: events (30 d), a baseline")
    assert f"the score is {-c.margin:.3f} behind" in c.verdict
    assert "default policy baseline gives exactly the same scores" in c.verdict
    assert c.share_resamples_better == 0.0


def test_one_outcome_only_gives_no_figures() -> None:
    c = compare(scored({SCORE: [1.0, 2.0, 3.0]}, [0, 0, 0]))
    assert c.systems[SCORE].roc_auc is None and c.systems[SCORE].roc_auc_ci is None
    assert c.best is None and "both churners and stayers" in c.verdict
    empty = compare(scored({SCORE: []}, []))
    assert empty.systems[SCORE].deciles == [] and empty.checkpoints == 0


def test_the_collector_keeps_checkpoints_compactly() -> None:
    col = Collector((SCORE, "b"))
    for account, label, s in (("x", True, (1.5, -3)), ("y", False, (0.25, -7)),
                              ("x", True, (2.0, -1))):
        col.add(account, label, s)
    data = col.scored()
    assert len(col) == 3 and col.accounts.itemsize == 4 and col.scores[SCORE].itemsize == 4
    assert data.accounts.tolist() == [0, 1, 0] and data.labels.tolist() == [True, False, True]
    assert data.scores["b"].tolist() == [-3.0, -7.0, -1.0]
    with pytest.raises(ValueError, match="one value per checkpoint"):
        Scored.of([1, 2], [0, 1], {SCORE: [0.5]})
    with pytest.raises(ValueError, match="NaN"):  # it would sort as the riskiest
        Scored.of([1, 2], [0, 1], {SCORE: [0.5, float("nan")]})


def _usage(n: int, ts: float) -> object:
    return EVENT_ADAPTER.validate_python({
        "event_id": f"e{n}", "account_id": "acme", "type": "feature_used", "user_id": "u1",
        "occurred_at": datetime.fromtimestamp(ts, tz=UTC).isoformat(),
        "data": {"feature": "api"}})


def test_baselines_count_the_30_whole_days_before_the_checkpoint() -> None:
    # events by day relative to the checkpoint's midnight: the day before (3), 10 days
    # before (1), the 30th day before (2), the 31st (5: outside), the day after (4: future)
    days = {-1: 3, -10: 1, -30: 2, -31: 5, 0: 4}
    items, n = [], 0
    for offset, count in sorted(days.items()):
        for i in range(count):
            n += 1
            items.append((None, 0, _usage(n, MIDNIGHT + offset * DAY + 3600 * (i + 1))))
    state = apply_batch(None, "acme", items, MIDNIGHT + DAY, Policy()).state
    assert trailing_events(state, MIDNIGHT) == 6 and active_days(state, MIDNIGHT) == 3
    # mid-day, the window is the 30 days that began after as_of - 30 days: day 0 counts,
    # the 30th day before does not
    assert trailing_events(state, MIDNIGHT + DAY / 2) == 3 + 1 + 4
    assert active_days(state, MIDNIGHT + DAY / 2) == 3

    shipped = score(state, MIDNIGHT, Policy()).score
    assert Baselines()(state, MIDNIGHT) == (-6.0, -3.0, shipped)
    # when the policy under test is the default, its own score is reused, not recomputed
    assert Baselines(Policy())(state, MIDNIGHT, 42.0) == (-6.0, -3.0, 42.0)
    other = Policy().model_copy(update={"windows": Policy().windows.model_copy(
        update={"short_days": 5})})
    assert Baselines(other)(state, MIDNIGHT, 42.0)[2] == shipped
    assert Baselines.names == tuple(BASELINES)
