"""Soak: a steady stream for a bounded time, the worker's memory sampled: it stays flat once
the accounts are known (state grows with accounts, not with events)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.helpers import Worker, figures, new_env
from tests.scenarios import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECONDS = float(os.environ.get("CHURNSIGNAL_SOAK_S", "60"))
RATE = 400  # events per second
ACCOUNTS = 300


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def _steady(broker: str, topic: str, worker: Worker,
                  samples: list[tuple[float, float]]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=20)
    await producer.start()
    s = Scenario(time.time())
    sent = 0
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < SECONDS:
            s.now = time.time()
            s.messages.clear()
            for _ in range(RATE // 4):
                account = f"soak-{sent % ACCOUNTS:03d}"
                s.usage(account, 0.0, feature_i=sent % 7, user=sent % 5)
                sent += 1
            for _, key, value in s.messages:
                await producer.send(topic, value, key=key)
            if int(elapsed * 4) % 8 == 0:
                samples.append((elapsed, _rss_mb(worker.proc.pid)))
            await asyncio.sleep(max(0.0, started + (sent / RATE) - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def test_memory_stays_flat_under_a_steady_stream(broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    worker = Worker(env)
    samples: list[tuple[float, float]] = []
    try:
        worker.wait_ready()
        sent = asyncio.run(_steady(broker, env.topics["usage"], worker, samples))
        summary = worker.wait_applied(sent, timeout=120)
        assert worker.proc.poll() is None
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    warm = [rss for t, rss in samples if SECONDS * 0.25 <= t < SECONDS * 0.5]
    late = [rss for t, rss in samples if t >= SECONDS * 0.75]
    figures(f"soak: {sent} events over {SECONDS:.0f}s to {ACCOUNTS} accounts; RSS after warm-up "
          f"{max(warm):.0f} MB, at the end {max(late):.0f} MB; "
          f"{summary['stats']['state_bytes_per_account']:.0f} B state per account")
    assert summary["events_in_clickhouse"] == sent
    assert max(late) <= max(warm) * 1.10 + 25, samples  # flat, within allocator noise
