"""`churnsignal import subscriptions` against a real worker: the backfill goes through Kafka,
the worker seeds the lifecycle, live events win over it, and importing twice doubles nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from tests.integration.helpers import Env, Worker, clickhouse_query, new_env, produce

pytestmark = [pytest.mark.integration]


def _import(env: Env, snapshots: str, path: Path) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env.env(), "KAFKA_BOOTSTRAP_SERVERS": env.broker,
               "CHURNSIGNAL_TOPICS__SNAPSHOTS": snapshots,
               "CHURNSIGNAL_STATE_DIR": str(env.state_dir / "cli")}
    return subprocess.run([sys.executable, "-m", "churnsignal", "import", "subscriptions",
                           str(path), "--as-of", "2026-11-01"], env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_backfill_seeds_the_lifecycle_and_live_events_win(broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    snapshots = f"{env.app_id}.snapshots"
    csv = tmp_path / "subscriptions.csv"
    # three customers from before the deployment: one still paying, one that left, one
    # paying whose live cancellation arrives later
    csv.write_text("account_id,start_date,end_date,mrr,plan\n"
                   "old-active,2024-03-01,,49,pro\n"
                   "old-gone,2024-05-01,2025-02-01,99,business\n"
                   "old-leaving,2025-01-10,,29,starter\n")
    worker = Worker(env, extra={"CHURNSIGNAL_TOPICS__SNAPSHOTS": snapshots})
    try:
        worker.wait_ready()
        for _ in range(2):  # twice: the same snapshots, the same ids
            done = _import(env, snapshots, csv)
            assert done.returncode == 0, done.stderr + done.stdout
        assert "3" in done.stdout  # the summary counts the subscriptions
        deadline = time.monotonic() + 60
        while worker.account("old-active")["events"] == 0:
            assert time.monotonic() < deadline, worker.log()[-2000:]
            time.sleep(0.5)
        cancel = datetime.now(UTC) - timedelta(hours=1)
        live = {"event_id": "evt_live_cancel", "account_id": "old-leaving",
                "type": "subscription_deleted", "occurred_at": cancel.isoformat(),
                "data": {"status": "canceled", "mrr_cents": 2900,
                         "cancellation_reason": "cancellation_requested"}}
        asyncio.run(produce(broker, [(env.topics["billing"], b"old-leaving",
                                      orjson.dumps(live))]))
        deadline = time.monotonic() + 60
        while worker.account("old-leaving").get("sub_status") != "canceled":
            assert time.monotonic() < deadline, worker.account("old-leaving")
            time.sleep(0.5)
        time.sleep(2)  # the next flush
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    dsn = worker.dsn()
    lifecycle = {row[0]: row[1:] for row in clickhouse_query(
        dsn, "SELECT account_id, toDate(started_at), last_status, "
             "if(isNull(ended_at), NULL, toDate(ended_at)) FROM account_lifecycle "
             "ORDER BY account_id")}
    assert lifecycle["old-active"][:2] == ["2024-03-01", "active"]
    assert lifecycle["old-gone"] == ["2024-05-01", "canceled", "2025-02-01"]
    assert lifecycle["old-leaving"][1] == "canceled"  # the live event won
    assert lifecycle["old-leaving"][2] == str(cancel.date())
    # imported twice, stored once
    [[rows, distinct]] = clickhouse_query(
        dsn, "SELECT toInt64(count()), toInt64(uniqExact(event_id)) FROM billing_events "
             "WHERE event_id LIKE 'snapshot:%'")
    assert rows == distinct and rows > 0
