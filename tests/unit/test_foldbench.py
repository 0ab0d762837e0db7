"""`churnsignal bench --fold-only`: the state side alone, on the bench's data set, with the
real fold and the real ClickHouse engine (chdb, in process)."""

from __future__ import annotations

import gc
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from churnsignal.app import cli
from churnsignal.app.settings import load_settings
from churnsignal.stream.fold import BILLING, DAILY, SCORES, SUPPORT
from churnsignal.stream.policy import load_policy
from churnsignal.tools.foldbench import STAGES, run

pytest.importorskip("chdb")


def test_every_event_is_folded_once_and_every_stage_is_timed(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    thresholds = gc.get_threshold()
    # Over 2,000 items a partition: more than one pack each, so more than one step.
    bench = run(settings, load_policy(settings.policy_file), events=12_000, accounts=600,
                step_events=4000, flush_every=1)
    # The bench's events are all valid, distinct and within the horizon; none was seen
    # twice (a pack folded again would count its events as duplicates).
    assert bench.applied == bench.events == 12_000 and bench.duplicates == 0
    # Its Stripe events also link their customer to the account (identity items).
    assert bench.items > bench.events and bench.packs > 4
    assert bench.flushes >= 2 and bench.steps > bench.flushes
    assert all(bench.seconds[stage] > 0 for stage in STAGES), bench.seconds
    # Every state kept (accounts and the customers' identities) was written; an account
    # batch writes at most one score row, and more events than batches: steps fold many at
    # once.
    assert 0 < bench.stored_keys <= bench.states_written
    assert 600 <= bench.rows[SCORES] <= bench.batches < bench.events
    # Billing and support events (a tenth of the mix) become one fact row each.
    assert 0 < bench.rows[BILLING] + bench.rows[SUPPORT] < bench.events
    # Every daily row the flushes built reached ClickHouse.
    assert bench.clickhouse_daily_rows == bench.rows[DAILY] > 0
    summary = bench.summary()
    assert summary["total_us_per_event"] == pytest.approx(
        sum(summary["us_per_event"].values()))
    # The worker's collector settings were for the run only.
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0


def test_the_live_phase_folds_the_latency_load_pack_by_pack_on_the_states_left(
        tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    bench = run(settings, load_policy(settings.policy_file), events=12_000, accounts=600,
                step_events=4000, flush_every=1, live_events=3000, live_pack=100,
                live_flush_every=2)
    live = bench.live
    assert live is not None and bench.applied == 12_000
    # Its offsets follow the data set's and its ids are new: all applied, none a duplicate.
    assert live.applied == live.events == live.items == 3000 and live.duplicates == 0
    # One pack per step, as a live worker folds each as it comes; a flush every 2 rounds
    # over the 4 partitions.
    assert live.steps == live.packs >= 30
    assert live.flushes >= live.steps // (2 * 4)
    # Live, an account is rarely twice in a pack: about an account batch per event, where
    # catching up batched several events an account.
    assert live.batches >= 0.95 * live.events
    assert bench.batches < 0.5 * bench.events
    # A score row only where the snapshot changes: most live batches move no whole point.
    assert 0 < live.rows[SCORES] < 0.5 * live.batches
    assert live.states_written > 0.5 * live.events
    assert set(bench.summary()["live"]["us_per_event"]) == set(STAGES)


def test_the_command_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(state_dir=tmp_path)
    monkeypatch.setattr(cli, "load_settings", lambda: settings)
    result = CliRunner().invoke(cli.cli, ["bench", "--fold-only", "--events", "2000",
                                          "--accounts", "200", "--live-events", "1000",
                                          "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "state side alone (no Kafka): 2,000 events" in result.output
    assert "then live: 1,000 events of the latency load" in result.output
    assert "live / catch-up per event: " in result.output
    figures = orjson.loads((tmp_path / "b" / "fold.json").read_bytes())
    assert figures["applied"] == 2000 and figures["live"]["applied"] == 1000
    assert set(figures["us_per_event"]) == set(STAGES)
