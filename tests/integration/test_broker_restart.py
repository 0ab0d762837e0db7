"""Apache Kafka restarts under a running worker: it reconnects and carries on by itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.helpers import (
    Worker,
    accepted_per_account,
    clickhouse_query,
    figures,
    new_env,
    produce,
)
from tests.integration.test_workers import _stream

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KAFKA_SH = Path(__file__).parents[2] / "deploy" / "kafka" / "kafka.sh"


@pytest.mark.restarts_broker
def test_worker_rides_out_a_broker_restart(broker: str, tmp_path: Path) -> None:
    kafka_dir = os.environ.get("CHURNSIGNAL_TEST_KAFKA_DIR")
    if not kafka_dir:
        pytest.skip("needs the Apache Kafka that `make test-kafka` starts (data kept on disk); "
                    "the embedded broker keeps nothing across a restart")
    env = new_env(broker, tmp_path)
    chunks = _stream(time.time())
    truth = accepted_per_account([m for chunk in chunks for m in chunk])
    total = sum(truth.values())
    worker = Worker(env)
    try:
        worker.wait_ready()
        for chunk in chunks[:3]:
            asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in chunk]))
        worker.wait_applied(sum(accepted_per_account(
            [m for chunk in chunks[:3] for m in chunk]).values()))
        started = time.monotonic()
        subprocess.run([str(KAFKA_SH), "restart", kafka_dir], check=True, timeout=180,
                       capture_output=True)
        figures(f"broker restarted in {time.monotonic() - started:.1f}s")
        for chunk in chunks[3:]:
            asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in chunk]))
        summary = worker.wait_applied(total, timeout=180)
        assert worker.proc.poll() is None
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert summary["events_in_clickhouse"] == total
    rows = clickhouse_query(worker.dsn(), "SELECT account_id, toInt64(sum(events)) "
                                          "FROM account_daily GROUP BY account_id")
    assert dict(rows) == truth
