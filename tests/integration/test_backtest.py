"""Backtest and calibration on histories with a known ground truth, and live = replay."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from churnsignal.offline.backtest import Inputs, load_native, merge_by_time, run_backtest
from churnsignal.offline.calibrate import TooLittleData, calibrate
from churnsignal.offline.history import DAY
from churnsignal.offline.history_native import NativeHistory, native_events
from churnsignal.offline.synthetic_history import generate
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.policy import Policy, load_policy
from churnsignal.stream.scoring import score
from churnsignal.stream.state import AccountState
from tests.integration.helpers import Worker, figures, new_env, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = Policy()


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _day(n: int) -> str:
    return datetime.fromtimestamp(datetime(2025, 1, 1, tzinfo=UTC).timestamp() + n * DAY,
                                  tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


@pytest.mark.offline
def test_small_case_figures_match_a_hand_computation(tmp_path: Path) -> None:
    # Four accounts over 120 days. "fade" uses the product 8 times a day, then fades from
    # day 60 and cancels on day 90; "stop" cancels on day 95 without warning; "steady" and
    # "busy" stay. Horizon 30 days.
    events = []
    for day in range(120):
        for i in range(8):
            events.append(["steady", _day(day)[:11] + f"{9 + i:02d}:00:00", "Viewed", "u1"])
            if day < 95:
                events.append(["stop", _day(day)[:11] + f"{9 + i:02d}:10:00", "Viewed", "u2"])
            if day < 60 or (day < 90 and i < max(0, 8 - (day - 60) // 3)):
                events.append(["fade", _day(day)[:11] + f"{9 + i:02d}:20:00", "Viewed", "u3"])
            if i < 4:
                events.append(["busy", _day(day)[:11] + f"{9 + i:02d}:30:00", "Exported", "u4"])
    events.sort(key=lambda r: r[1])
    ev = _write(tmp_path / "events.csv", ["account_id", "event_time", "event_type", "user_id"],
                events)
    subs = _write(tmp_path / "subs.csv", ["account_id", "start_date", "end_date", "mrr"], [
        ["steady", "2025-01-01", "", 100], ["busy", "2025-01-01", "", 50],
        ["fade", "2025-01-01", _day(90)[:10], 80], ["stop", "2025-01-01", _day(95)[:10], 60]])
    scores_csv = tmp_path / "scores.csv"
    report = run_backtest(Inputs(ev, subs, POLICY, None, horizon_days=30), scores_csv)

    # By hand, from the scores file and the two churn dates.
    churn = {"fade": datetime(2025, 1, 1, tzinfo=UTC).timestamp() + 90 * DAY,
             "stop": datetime(2025, 1, 1, tzinfo=UTC).timestamp() + 95 * DAY}
    end = datetime(2025, 1, 1, tzinfo=UTC).timestamp() + 120 * DAY  # the last event's day
    rows = []
    for r in csv.DictReader(scores_csv.open()):
        as_of = datetime.fromisoformat(r["as_of"]).replace(tzinfo=UTC).timestamp()
        if as_of + 30 * DAY <= end:
            label = r["account_id"] in churn and as_of < churn[r["account_id"]] <= as_of + 30 * DAY
            rows.append((float(r["score"]), label, r["band"]))
    positives = [s for s, lab, _ in rows if lab]
    negatives = [s for s, lab, _ in rows if not lab]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    auc = pairs / (len(positives) * len(negatives))
    assert report.evaluated == len(rows)
    assert report.base_rate == pytest.approx(len(positives) / len(rows))
    # the CSV rounds scores to 0.1: ties may differ by rounding, nothing more
    assert report.roc_auc == pytest.approx(auc, abs=0.01)
    for band in report.bands:
        rank = ["low", "medium", "high", "critical"].index(band.band)
        flagged = [lab for _, lab, b in rows if ["low", "medium", "high", "critical"].index(b)
                   >= rank]
        assert band.flagged == len(flagged)
        if flagged:
            assert band.precision == pytest.approx(sum(flagged) / len(flagged))
            assert band.recall == pytest.approx(sum(flagged) / len(positives))
    assert report.churners == 2
    # the fading account is caught by its decline, weeks ahead; the abrupt one is not caught
    assert report.churn_caught_by_reason == {"usage_decline": 0.5}
    # lead time by hand: the first checkpoint that put "fade" at high risk or above
    first_high = min(datetime.fromisoformat(r["as_of"]).replace(tzinfo=UTC).timestamp()
                     for r in csv.DictReader(scores_csv.open())
                     if r["account_id"] == "fade" and r["band"] in ("high", "critical"))
    lead = (churn["fade"] - first_high) / DAY
    assert report.lead_time_median_days == pytest.approx(lead)
    assert report.share_alerted_14d_ahead == pytest.approx((lead >= 14) / 2)
    assert report.roc_auc > 0.5

    # the same history as Parquet (what warehouses export) gives the same figures
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    for name in ("events", "subs"):
        pq.write_table(pacsv.read_csv(tmp_path / f"{name}.csv"), tmp_path / f"{name}.parquet")
    again = run_backtest(Inputs(tmp_path / "events.parquet", tmp_path / "subs.parquet", POLICY,
                                None, horizon_days=30))
    assert again.as_dict() == report.as_dict()


@pytest.mark.offline
def test_calibration_lifts_auc_out_of_time_and_refuses_tiny_data(tmp_path: Path) -> None:
    generate(tmp_path, accounts=160, days=330, seed=11)
    inputs = Inputs(tmp_path / "events.csv", tmp_path / "subscriptions.csv", POLICY, None)
    until = datetime(2025, 10, 1, tzinfo=UTC).timestamp()
    result = calibrate(inputs, until)
    figures(f"validation AUC {result.auc_before:.3f} -> {result.auc_after:.3f}, "
          f"PR AUC {result.pr_auc_before:.3f} -> {result.pr_auc_after:.3f}; {result.weights}")
    figures(f"tracked types {result.event_types}; strongest coefficients "
            f"{[(c.feature, c.coefficient) for c in result.coefficients[:4]]}")
    assert result.auc_after > result.auc_before
    # the core action that key-event droppers stop is learnt, per event type: days since
    # the last export is the model's strongest risk
    assert "report exported" in result.event_types
    assert result.coefficients[0].feature == "type:report exported:days_since"
    assert result.coefficients[0].coefficient > 0
    # the written policy loads in the worker unchanged
    out = tmp_path / "policy.yaml"
    done = subprocess.run([sys.executable, "-m", "churnsignal", "calibrate", "--events",
                           str(inputs.events), "--subscriptions", str(inputs.subscriptions),
                           "--until", "2025-10-01", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = load_policy(out)
    assert written.signals.low_feature_breadth.weight == pytest.approx(
        result.weights["low_feature_breadth"])
    assert written.model is not None and "report exported" in written.model.event_types
    assert "event types tracked" in done.stdout
    # honest about small data: five accounts are not a basis for weights
    small = tmp_path / "small"
    generate(small, accounts=5, days=200, seed=3)
    with pytest.raises(TooLittleData):
        calibrate(Inputs(small / "events.csv", small / "subscriptions.csv", POLICY, None),
                  datetime(2025, 7, 1, tzinfo=UTC).timestamp())


@pytest.mark.offline
def test_counted_days_replay_exactly_like_their_events(tmp_path: Path) -> None:
    """The backtest reads warehouse exports counted per account and day; folding those counts
    must give what folding every row as its own event gives: the same checkpoints, scores,
    bands and states (key and activation events named, so every path of the fold is used)."""
    from churnsignal.offline import history
    from churnsignal.offline.backtest import replay

    generate(tmp_path, accounts=40, days=150, seed=11)
    events, subs_file = tmp_path / "events.csv", tmp_path / "subscriptions.csv"
    with events.open("a") as fh:  # a row without user, a blank type, a long name,
        # and a row out of the file's time order
        fh.write("acct-0001,2025-03-01 10:00:00,,\n")
        fh.write(f"acct-0002,2025-02-27 23:59:59.999,{'x' * 250},u9\n")
        fh.write("acct-0002,2025-01-03 00:00:00,Report Exported,u1\n")
    policy = POLICY.model_copy(update={
        "usage": POLICY.usage.model_copy(update={"key_events": ["report exported"]}),
        "onboarding": POLICY.onboarding.model_copy(
            update={"activation_events": ["alert created"]}),
        "limits": POLICY.limits.model_copy(update={"day_users": 2, "features": 3})})
    engine = history.Engine()
    try:
        subs = history.read_subscriptions(engine, subs_file)

        def run(rows: object) -> list[tuple[str, float, float, str, dict[str, object]]]:
            stream = merge_by_time(rows, history.subscription_events(subs))  # type: ignore[arg-type]
            out = []
            for cp in replay(stream, subs, policy):
                state = orjson.loads(AccountState.json_of(cp.state.to_bytes()))
                state["ids"] = []  # warehouse rows carry no identity to dedup by
                # which users a capped day keeps may differ; how many it counts may not
                state["day_users"] = [len(users) - 1 for users in state["day_users"]]
                out.append((cp.account_id, cp.as_of, cp.score, cp.band, state))
            return out

        by_event = run(history.warehouse_events(engine, events))
        by_day = run(history.warehouse_days(engine, events, policy))
    finally:
        engine.close()
    assert len(by_day) > 3000
    assert {band for _, _, _, band, _ in by_day} >= {"low", "medium", "high"}
    for day, event in zip(by_day, by_event, strict=True):
        assert day[:4] == event[:4]
        assert day[4].keys() == event[4].keys(), event[:2]  # (fields at defaults are left out)
        assert {k: v for k, v in day[4].items() if v != event[4][k]} == {}, event[:2]


def test_worker_and_replay_give_the_same_scores(broker: str, tmp_path: Path) -> None:
    """The same Stripe and Segment payloads, through a real worker and through the backtest's
    reader and engine: the same state, so the same score and reasons at any time."""
    from tests.scenarios import Scenario

    now = time.time()
    s = Scenario(now)
    s.subscription("same-1", 40, seats=6)
    s.steady("same-1", days=35, per_day=6, until_days_ago=5)
    s.payment_failed("same-1", 1.0, attempt=2, final=False)
    s.usage("same-1", 0.5)
    jsonl = tmp_path / "history.jsonl"
    jsonl.write_bytes(b"\n".join(v for _, _, v in s.messages) + b"\n")
    env = new_env(broker, tmp_path)
    worker = Worker(env)
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in s.messages]))
        worker.wait_applied(len(s.messages))
        times = [now - 20 * DAY, now - 3 * DAY, now, now + 10 * DAY]
        live = [worker.account(f"same-1?at={t}") for t in times]
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    replayed = native_events(jsonl)
    # The same history read back from the topics themselves (a Kafka topic range).
    topics = ",".join(env.topics[k] for k in ("usage", "billing", "support"))
    from_kafka = load_native(Inputs(f"kafka:{topics}", None, POLICY, None,
                                    settings=env.settings()))
    try:
        assert [e.model_dump() for e in from_kafka.events()] == \
            [e.model_dump() for e in replayed]
        from_file = NativeHistory().add_jsonl(jsonl)
        assert from_kafka.subscriptions().periods == from_file.subscriptions().periods
        assert set(from_kafka.subscriptions().periods) == {"same-1"}
        from_file.close()
    finally:
        from_kafka.close()
    hour_later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # "+00:00" kept as is
    later = load_native(Inputs(f"kafka:{topics}?from={hour_later}", None, POLICY, None,
                               settings=env.settings()))
    assert later.spool.count == 0  # records are selected by their Kafka timestamp
    later.close()
    # What cannot be replayed is reported, not silently left out.
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_bytes(jsonl.read_bytes() + b"not json\n" + orjson.dumps(
        {"type": "track", "event": "Report Exported", "userId": "nobody-links-me",
         "messageId": "m-1", "timestamp": "2026-01-01T00:00:00Z"}) + b"\n")
    report = run_backtest(Inputs(noisy, None, POLICY, None))
    assert report.payloads_skipped == {"not_json": 1, "unattributed": 1}
    out = apply_batch(None, "same-1", [(None, 0, e) for e in merge_by_time(replayed)], now,
                      POLICY)
    assert out.state.seq == live[0]["events"] == len(s.messages)
    for t, answer in zip(times, live, strict=True):
        expected = score(out.state, t, POLICY)
        assert answer["score_at"] == expected.score, (t, answer)
        assert [r["code"] for r in answer["reasons_at"]] == [r.code for r in expected.reasons]
    # ten days of silence later the score is explained by it, in both
    assert "inactivity" in [r["code"] for r in live[-1]["reasons_at"]]


@pytest.mark.offline
def test_backtest_reports_the_score_beside_three_baselines(tmp_path: Path) -> None:
    """Same run, same checkpoints: the score and the baselines (30-day events, active days,
    the default policy), with intervals and deciles, in the printed table, the JSON and the
    HTML; a policy under test that is not the default gets the default's own figures beside
    it."""
    generate(tmp_path, accounts=160, days=330, seed=11)
    events, subs = tmp_path / "events.csv", tmp_path / "subscriptions.csv"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "churnsignal", "backtest", "--events",
                           str(events), "--subscriptions", str(subs), "--since", "2025-06-01",
                           "--json", str(tmp_path / "b.json"), "--html", str(tmp_path / "b.html"),
                           "--scores-out", str(tmp_path / "scores.csv")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "160"})
    assert done.returncode == 0, done.stderr
    figures(f"backtest CLI with baselines, 160 accounts: {time.perf_counter() - started:.1f} s")
    out = " ".join(done.stdout.split())
    for text in ("Score against baselines", "events (30 d)", "active days (30 d)",
                 "default policy", "top-decile lift", "Churn rate / cumulative recall"):
        assert text in out, out
    report = orjson.loads((tmp_path / "b.json").read_bytes())
    score_figures, comparison = report["score_figures"], report["comparison"]
    assert set(report["baselines"]) == {"events_30d", "active_days_30d", "default_policy"}
    assert score_figures["roc_auc"] == pytest.approx(report["roc_auc"])  # sklearn's figure
    assert score_figures["pr_auc"] == pytest.approx(report["pr_auc"])
    for f in (score_figures, *report["baselines"].values()):
        for key in ("roc_auc", "pr_auc", "top_decile_lift"):
            lo, hi = f[f"{key}_ci"]
            assert lo <= f[key] <= hi, (key, f)
        assert [d["decile"] for d in f["deciles"]] == list(range(1, 11))
        assert f["deciles"][-1]["cumulative_recall"] == pytest.approx(1.0)
        assert sum(d["checkpoints"] for d in f["deciles"]) == pytest.approx(report["evaluated"])
    # the shipped policy under test: its baseline is itself, and the verdict compares the
    # score with the best of the other two, by how much
    assert comparison["identical"] == ["default_policy"]
    assert comparison["best_baseline"] in ("events_30d", "active_days_30d")
    assert comparison["resamples"] == 200 and comparison["accounts"] == report["accounts"]
    assert comparison["verdict"] in out and "Best by ROC AUC" in comparison["verdict"]
    best = report["baselines"][comparison["best_baseline"]]["roc_auc"]
    assert comparison["margin"] == pytest.approx(score_figures["roc_auc"] - best)
    figures(comparison["verdict"])
    # --scores-out keeps its columns
    assert (tmp_path / "scores.csv").read_text().splitlines()[0] == "account_id,as_of,score,band"
    page = (tmp_path / "b.html").read_text()
    assert 'data-section="baselines"' in page and 'data-section="deciles"' in page
    assert "Best by ROC AUC" in page

    # Another policy on the same history (only a weight differs, so the states are the same):
    # the default-policy baseline gives exactly the figures the default policy got above.
    signals = POLICY.signals
    reweighted = POLICY.model_copy(update={"signals": signals.model_copy(update={
        "usage_decline": signals.usage_decline.model_copy(update={"weight": 20})})})
    started = time.perf_counter()
    other = run_backtest(Inputs(events, subs, reweighted, datetime(
        2025, 6, 1, tzinfo=UTC).timestamp()))
    figures(f"backtest with a second policy scoring each checkpoint: "
            f"{time.perf_counter() - started:.1f} s for {other.evaluated} checkpoints")
    again = orjson.loads(orjson.dumps(other.as_dict()))
    assert again["baselines"]["default_policy"] == score_figures
    for name in ("events_30d", "active_days_30d"):
        assert again["baselines"][name] == report["baselines"][name]
    assert again["score_figures"] != score_figures and again["comparison"]["identical"] == []
