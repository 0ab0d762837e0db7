"""`churnsignal calibrate` fits a model on a company's own history (issue #15), judged out of
time: calibrate on the first two thirds of a history, then backtest the written policy on the
rest, against the trailing-30-day event count and the other baselines.

Histories come from the synthetic generator's churn mechanisms: churn driven by the level of
engagement, by event types, at random; billing and support beside usage in native JSONL; and
a hand-made history whose churn reverses between training and validation, which calibrate
must refuse to write unless forced. Last, the worker and the backtest score an account alike
under a written model policy."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from churnsignal.offline.backtest import Inputs, Report, run_backtest
from churnsignal.offline.calibrate import (
    Calibration,
    TooLittleData,
    calibrate,
    summary,
    write_policy,
)
from churnsignal.offline.history_native import NativeHistory, native_events
from churnsignal.offline.synthetic_history import generate
from churnsignal.schemas.events import family_of
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.policy import Policy, load_policy
from churnsignal.stream.scoring import score
from tests.integration.helpers import Worker, figures, new_env, produce
from tests.scenarios import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = Policy()
START = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 330
UNTIL = START + timedelta(days=DAYS * 2 // 3)  # calibrate on two thirds, backtest the rest
DAY = 86_400.0


@dataclass
class OutOfTime:
    calibration: Calibration
    report: Report
    policy: Policy


def _out_of_time(directory: Path, mechanisms: Mapping[str, float] | None, noise: float,
                 **bands: float) -> OutOfTime:
    generate(directory, accounts=240, days=DAYS, seed=1, churn_share=0.45,
             mechanisms=mechanisms, noise=noise, native=False)
    events, subs = directory / "events.csv", directory / "subscriptions.csv"
    until = UNTIL.timestamp()
    started = time.perf_counter()
    result = calibrate(Inputs(events, subs, POLICY, None), until, force=True, **bands)
    path = directory / "policy.yaml"
    write_policy(result.policy, path, result.kept_shipped, summary(result))
    policy = load_policy(path)  # as the worker would load it
    assert policy == result.policy
    report = run_backtest(Inputs(events, subs, policy, until), directory / "scores.csv")
    name = "+".join(mechanisms or {"random": 1})
    valid = result.comparison.systems
    figures(f"calibrate {name}: validation ROC AUC model {result.auc_after:.3f}, events (30 d) "
            f"{valid['events_30d'].roc_auc:.3f}; out of time (backtest --since "
            f"{UNTIL.date()}) model {report.roc_auc:.3f} "
            f"[{report.score_figures.roc_auc_ci[0]:.3f}-{report.score_figures.roc_auc_ci[1]:.3f}]"  # type: ignore[index,union-attr]
            + "".join(f", {k} {f.roc_auc:.3f}" for k, f in report.baselines.items())
            + f"; C={result.c:g}, {time.perf_counter() - started:.1f} s")
    return OutOfTime(result, report, policy)


def _mean_score(path: Path, until: float, horizon_end: float) -> float:
    """Mean score/100 over the evaluated checkpoints of a --scores-out file."""
    scores = [float(r["score"]) for r in csv.DictReader(path.open())
              if until <= datetime.fromisoformat(r["as_of"]).replace(tzinfo=UTC).timestamp()
              <= horizon_end]
    return sum(scores) / len(scores) / 100


@pytest.mark.offline
def test_level_of_engagement_beats_the_trailing_event_count_out_of_time(
        tmp_path: Path) -> None:
    """Steadily light users leave, with no decline first: the rules never see it, the count
    of last month's events does, and the model must do better than that count."""
    run = _out_of_time(tmp_path, {"level": 1.0}, 0.0, target_precision=0.3)
    result, report = run.calibration, run.report
    assert result.refusal is None and result.comparison.best == "score"
    events = report.baselines["events_30d"].roc_auc
    assert report.roc_auc is not None and events is not None
    assert report.roc_auc > events
    assert report.roc_auc > report.baselines["default_policy"].roc_auc + 0.1  # type: ignore[operator]
    # explained by engagement: the strongest coefficients lower the risk of busy accounts
    assert all(c.coefficient < 0 and c.code == "low_engagement"
               for c in result.coefficients[:3]), result.coefficients[:3]
    # high is the lowest threshold with 30 % precision on validation; both figures printed
    high = next(b for b in result.bands if b.band == "high")
    assert result.band_rule == "target precision 30%"
    assert high.precision is not None and high.precision >= 0.3
    assert high.alerts_per_100_per_week is not None and high.pages
    # a calibrated probability: out of time, the mean score is near the churn rate
    mean = _mean_score(tmp_path / "scores.csv", UNTIL.timestamp(),
                       (START + timedelta(days=DAYS - 30)).timestamp())
    figures(f"level: mean score out of time {mean:.3f}, churn rate {report.base_rate:.3f}")
    assert report.base_rate is not None and 0.5 < mean / report.base_rate < 2


@pytest.mark.offline
def test_event_types_beat_every_baseline_out_of_time(tmp_path: Path) -> None:
    """Churn driven by the mix of event types (errors hurt, exports help), not by volume:
    no baseline ranks it; the model's per-type features do, well clear of the interval."""
    run = _out_of_time(tmp_path, {"types": 1.0}, 0.0, alert_budget=2.0)
    result, report = run.calibration, run.report
    assert result.refusal is None
    assert {"report exported", "error shown", "support article viewed"} <= set(
        result.event_types)
    top = {c.feature: c.coefficient for c in result.coefficients[:6]}
    assert any(f.startswith("type:error shown:") for f in top), top
    assert report.comparison["best"] == "score"
    assert report.comparison["margin_ci"][0] > 0.05, report.comparison
    # the bands were set for about two escalations per 100 accounts a week on validation;
    # the backtest counts the alerts the worker would really have sent out of time
    high = next(b for b in result.bands if b.band == "high")
    assert result.band_rule == "alert budget 2 per 100 accounts per week"
    assert high.alerts_per_100_per_week is not None and high.alerts_per_100_per_week <= 2.0
    measured = report.alerts_per_100_accounts_per_week
    figures(f"types: alert budget 2 -> {high.alerts_per_100_per_week:.2f} estimated on "
            f"validation, {measured:.2f} measured out of time")
    assert measured is not None and 0.5 < measured < 4


@pytest.mark.offline
def test_random_churn_is_no_worse_than_the_trailing_event_count(tmp_path: Path) -> None:
    """Churn unrelated to anything recorded: nothing can rank it, and the model must not do
    worse than the baseline beyond the bootstrap interval."""
    run = _out_of_time(tmp_path, None, 1.0)
    report = run.report
    events = report.baselines["events_30d"]
    assert report.roc_auc is not None and events.roc_auc_ci is not None
    assert report.roc_auc >= events.roc_auc_ci[0]
    assert report.score_figures is not None and report.score_figures.roc_auc_ci is not None
    assert report.score_figures.roc_auc_ci[0] < 0.5 < report.score_figures.roc_auc_ci[1]
    figures(f"random: calibrate would have refused: {run.calibration.refusal is not None}")


@pytest.mark.offline
def test_support_burden_beats_every_baseline_out_of_time(tmp_path: Path) -> None:
    """Churn after heavy support load (native JSONL: tickets and ratings, no subscriptions
    file): usage and the rules say little; the support features do."""
    generate(tmp_path, accounts=240, days=DAYS, seed=1, churn_share=0.45,
             mechanisms={"support": 1.0}, noise=0.0, native=True)
    events = tmp_path / "events.jsonl"
    result = calibrate(Inputs(events, None, POLICY, None), UNTIL.timestamp(), force=True)
    report = run_backtest(Inputs(events, None, result.policy, UNTIL.timestamp()))
    best = max(f.roc_auc or 0.0 for f in report.baselines.values())
    figures(f"calibrate support: out of time model {report.roc_auc:.3f}, best baseline "
            f"{best:.3f}")
    assert report.roc_auc is not None and report.roc_auc > best + 0.1


def _native_out_of_time(directory: Path, mechanisms: Mapping[str, float], noise: float = 0.0,
                        accounts: int = 240, seed: int = 1) -> tuple[Report, float]:
    """Calibrate and backtest on the native JSONL (usage, billing, support; no subscriptions
    file): the out-of-time report and the best baseline's ROC AUC."""
    generate(directory, accounts=accounts, days=DAYS, seed=seed, churn_share=0.45,
             mechanisms=mechanisms, noise=noise, native=True)
    events = directory / "events.jsonl"
    result = calibrate(Inputs(events, None, POLICY, None), UNTIL.timestamp(), force=True)
    report = run_backtest(Inputs(events, None, result.policy, UNTIL.timestamp()))
    best = max(f.roc_auc or 0.0 for f in report.baselines.values())
    ci = report.score_figures.roc_auc_ci if report.score_figures else None
    figures(f"calibrate {'+'.join(mechanisms)} (noise {noise}, {accounts} accounts): out of "
            f"time model {report.roc_auc:.3f} {ci}, "
            + ", ".join(f"{k} {f.roc_auc:.3f}" for k, f in report.baselines.items())
            + f"; C={result.c:g}")
    return report, best


@pytest.mark.offline
def test_tenure_beats_every_baseline_out_of_time(tmp_path: Path) -> None:
    """Young accounts leave, old ones stay (a warehouse export: usage and subscriptions):
    the rules and last month's activity do not know an account's age; the model does."""
    run = _out_of_time(tmp_path, {"tenure": 1.0}, 0.0)
    report = run.report
    best = max(f.roc_auc or 0.0 for f in report.baselines.values())
    assert report.roc_auc is not None and report.roc_auc > best + 0.1
    assert "tenure_days" in run.policy.model.features  # type: ignore[union-attr]


@pytest.mark.offline
def test_price_beats_every_baseline_out_of_time(tmp_path: Path) -> None:
    """Accounts paying more per seat leave more: MRR and seats come from the subscription
    events; no usage baseline sees price."""
    report, best = _native_out_of_time(tmp_path, {"price": 1.0})
    assert report.roc_auc is not None and report.roc_auc > best + 0.1


@pytest.mark.offline
def test_billing_failures_beat_every_baseline_out_of_time(tmp_path: Path) -> None:
    """Churn in the days after failed payments. The rules already page on an open failure
    (the default policy is the best baseline); the model also weighs failures settled since
    and how recent the last one was, and must rank above the rules."""
    report, best = _native_out_of_time(tmp_path, {"billing": 1.0})
    assert report.roc_auc is not None and report.roc_auc > best + 0.03
    assert report.baselines["default_policy"].roc_auc == best


@pytest.mark.offline
def test_a_mixture_of_causes_beats_every_baseline_out_of_time(tmp_path: Path) -> None:
    """Six causes at once and 30 % random churn, over 500 accounts: each cause alone is weak
    (a sixth of the explained churn), together the model must still rank above every
    baseline, and the lower end of its interval above the baselines' figures."""
    report, best = _native_out_of_time(
        tmp_path, {m: 1.0 for m in ("level", "types", "tenure", "price", "billing", "support")},
        noise=0.3, accounts=500, seed=3)
    ci = report.score_figures.roc_auc_ci if report.score_figures else None
    assert report.roc_auc is not None and ci is not None
    assert report.roc_auc > best + 0.03 and ci[0] > best, (report.roc_auc, ci, best)


def _calibrate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "churnsignal", "calibrate", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def native_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy calibrated by the CLI on native JSONL (usage, Stripe-like billing and support
    events) without a subscriptions file, its bands set by an alert budget."""
    directory = tmp_path_factory.mktemp("native")
    generate(directory, accounts=200, days=DAYS, seed=4, churn_share=0.4,
             mechanisms={"level": 1.0, "billing": 1.0, "support": 1.0}, noise=0.0)
    out = directory / "policy.yaml"
    started = time.perf_counter()
    done = _calibrate_cli("--events", str(directory / "events.jsonl"), "--until",
                          UNTIL.date().isoformat(), "--out", str(out), "--alert-budget", "2")
    assert done.returncode == 0, done.stderr + done.stdout
    figures(f"calibrate CLI on native JSONL, 200 accounts: {time.perf_counter() - started:.1f} s")
    (directory / "stdout.txt").write_text(done.stdout)
    return out


def test_native_history_without_subscriptions(native_policy: Path) -> None:
    text = " ".join((native_policy.parent / "stdout.txt").read_text().split())
    for shown in ("Validation: calibrated model against baselines", "events (30 d)",
                  "default policy", "top-decile lift", "Strongest coefficients",
                  "alert budget 2 per 100 accounts per week", "alerts / 100 accts / wk",
                  "precision", "C (L2), by validation ROC AUC", "Best by ROC AUC"):
        assert shown in text, shown
    policy = load_policy(native_policy)
    assert policy.model is not None and policy.version == f"calibrated-{UNTIL.date()}"
    # billing and support come in beside usage, and are fitted, not kept as shipped
    for feature in ("failed_payments_30d", "past_due", "retry_pending", "open_tickets",
                    "events_28d", "type:report exported:events_28d"):
        assert feature in policy.model.features, feature
    header = native_policy.read_text().split("\nversion:")[0]
    assert "payment_failed: kept weight" not in header
    assert "support_burden: kept weight" not in header
    assert "# model: " in header and "alerts per 100 accounts per week" in header


def _reversing_history(directory: Path) -> tuple[Path, Path]:
    """Busy accounts churn early, quiet ones late, steady ones stay: what the training period
    teaches (busy means risk) is wrong in the validation period."""
    directory.mkdir(parents=True, exist_ok=True)
    events, subs = [], []
    groups = [("busy", 14, 6, lambda i: 40 + 7 * i), ("quiet", 14, 1, lambda i: 160 + 5 * i),
              ("steady", 30, 3, lambda i: None)]
    for group, n, per_day, churn in groups:
        for i in range(n):
            account = f"{group}-{i:02d}"
            end = churn(i)
            subs.append([account, START.date().isoformat(),
                         "" if end is None else (START + timedelta(days=end)).date().isoformat(),
                         100])
            for day in range(end if end is not None else 240):
                for k in range(per_day):
                    at = START + timedelta(days=day, hours=9 + k, minutes=i)
                    events.append([account, at.strftime("%Y-%m-%d %H:%M:%S"), "Viewed", "u1"])
    for name, header, rows in (("events.csv", ["account_id", "event_time", "event_type",
                                               "user_id"], events),
                               ("subscriptions.csv", ["account_id", "start_date", "end_date",
                                                      "mrr"], subs)):
        with (directory / name).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
    return directory / "events.csv", directory / "subscriptions.csv"


@pytest.mark.offline
def test_refuses_a_model_that_does_not_beat_the_baseline_unless_forced(tmp_path: Path) -> None:
    events, subs = _reversing_history(tmp_path)
    out = tmp_path / "policy.yaml"
    args = ("--events", str(events), "--subscriptions", str(subs), "--until", "2025-08-29",
            "--out", str(out))
    refused = _calibrate_cli(*args)
    assert refused.returncode == 3, refused.stderr
    message = " ".join(refused.stderr.split())
    figures(f"refusal: {message[:400]}")
    assert "does not beat the best baseline, events (30 d)" in message
    assert "did not hold in the later period" in message and "--force" in message
    assert not out.exists()
    assert "Validation: calibrated model against baselines" in refused.stdout  # the why, shown
    forced = _calibrate_cli(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "--force: written although" in " ".join(forced.stderr.split())
    assert load_policy(out).model is not None


def test_worker_and_backtest_score_alike_under_a_model_policy(
        broker: str, tmp_path: Path, native_policy: Path) -> None:
    """The written model policy (its tracked event types renamed to this scenario's, so the
    per-type columns are exercised) through a real worker and through the backtest's reader,
    fold and replay: the same scores and reasons at any time."""
    written = load_policy(native_policy)
    assert written.model is not None
    now = time.time()
    s = Scenario(now)
    s.subscription("model-1", 40, seats=6)
    s.steady("model-1", days=35, per_day=6, until_days_ago=5)
    s.payment_failed("model-1", 1.0, attempt=2, final=False)
    s.ticket("model-1", 2.0, 7001)
    s.usage("model-1", 0.5)
    names = sorted({e.data.name.lower() for e in _events(s)
                    if family_of(e.type) == "usage" and e.data.name})
    renamed = dict(zip(written.model.event_types, names, strict=False))

    def rename(feature: str) -> str:  # type:NAME:KIND -> the scenario's name
        if not feature.startswith("type:"):
            return feature
        name, kind = feature[5:].rsplit(":", 1)
        return f"type:{renamed.get(name, name)}:{kind}"

    model = written.model.model_copy(update={
        "event_types": [renamed.get(n, n) for n in written.model.event_types],
        "features": [rename(f) for f in written.model.features]})
    path = tmp_path / "model-policy.yaml"
    write_policy(written.model_copy(update={"model": model}), path)
    policy = load_policy(path)
    assert policy.model is not None and any(
        f.startswith(f"type:{names[0]}:") for f in policy.model.features)

    jsonl = tmp_path / "history.jsonl"
    jsonl.write_bytes(b"\n".join(v for _, _, v in s.messages) + b"\n")
    env = new_env(broker, tmp_path)
    worker = Worker(env, extra={"CHURNSIGNAL_POLICY_FILE": str(path)})
    times = [now - 20 * DAY, now - 3 * DAY, now, now + 5 * DAY, now + 12 * DAY]
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in s.messages]))
        worker.wait_applied(len(s.messages))
        live = [worker.account(f"model-1?at={t}") for t in times]
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    # calibrate reads the topics too (one account is too little to fit on, and it says so)
    topics = ",".join(env.topics[k] for k in ("usage", "billing", "support"))
    with pytest.raises(TooLittleData):
        calibrate(Inputs(f"kafka:{topics}", None, POLICY, None, settings=env.settings()),
                  now + 40 * DAY)

    replayed = native_events(jsonl)
    out = apply_batch(None, "model-1", [(None, 0, e) for e in replayed], now, policy)
    assert out.state.seq == live[0]["events"] == len(s.messages)
    assert out.state.types == policy.model.event_types
    for t, answer in zip(times, live, strict=True):
        expected = score(out.state, t, policy)
        assert answer["score_at"] == expected.score, (t, answer)
        assert [r["code"] for r in answer["reasons_at"]] == [r.code for r in expected.reasons]
    figures(f"worker = backtest under a model policy: scores {[a['score_at'] for a in live]}")
    assert len({a["score_at"] for a in live}) > 1  # the model's score moves with time


def _events(s: Scenario) -> list[Any]:
    """The scenario's payloads decoded as the backtest decodes them."""
    native = NativeHistory()
    try:
        for _, _, value in s.messages:
            native.add(value)
        return list(native.events())
    finally:
        native.close()
