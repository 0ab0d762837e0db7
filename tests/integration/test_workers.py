"""Several workers, and workers that die: state and ClickHouse totals stay exactly those of one
worker that processed everything, checked against a ground truth computed apart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.integration.helpers import (
    Worker,
    accepted_per_account,
    clickhouse_query,
    consume_all,
    figures,
    merge_clickhouse,
    new_env,
    produce,
)
from tests.scenarios import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ACCOUNTS = 60


def _stream(now: float) -> list[list[tuple[str, bytes | None, bytes]]]:
    """Six chunks of a realistic stream: subscriptions, steady and declining use, a few
    scheduled cancellations and failed payments, in event-time order per account."""
    chunks = []
    for c in range(6):
        s = Scenario(now)
        s.n = c * 100_000  # unique ids across chunks
        for a in range(ACCOUNTS):
            account = f"acct-{a:03d}"
            if c == 0:
                s.subscription(account, 40)
            # chunk c covers days 36-6c .. 31-6c ago; decliners stop early
            if not (a % 7 == 0 and c >= 4):
                s.steady(account, days=6, per_day=3, until_days_ago=36 - 6 * (c + 1) + 1)
            if c == 5 and a % 10 == 0:
                s.subscription(account, 0.001, cancel=True, kind="customer.subscription.updated")
            if c == 5 and a % 10 == 5:
                s.payment_failed(account, 0.002, attempt=4, final=True)
        chunks.append(s.messages)
    return chunks


def _send(broker: str, topics: dict[str, str], chunk: list[tuple[str, bytes | None, bytes]]) -> None:
    asyncio.run(produce(broker, [(topics[k], key, v) for k, key, v in chunk]))


def _check_exact(env_topics: dict[str, str], broker: str, dsn: str,
                 truth: dict[str, int]) -> None:
    total = sum(truth.values())
    rows = clickhouse_query(dsn, "SELECT account_id, toInt64(sum(events)) FROM account_daily "
                                 "GROUP BY account_id")
    assert dict(rows) == truth  # per account: nothing lost, nothing doubled
    published = asyncio.run(consume_all(broker, env_topics["alerts"], 1))
    ids = Counter(orjson.loads(r.value)["alert_id"] for r in published)
    [[stored]] = clickhouse_query(dsn, "SELECT count() FROM alerts")
    assert int(stored) == len(ids)
    figures(f"events {total}, accounts {len(truth)}, alerts {len(ids)} "
          f"(records {len(published)}), lost 0, doubled 0")


def _wait_until_exact(worker: Worker, truth: dict[str, int]) -> None:
    """Every account's state, as this worker holds it, equals the truth (within 2 min)."""
    deadline = time.monotonic() + 120
    while True:
        states = {acct: worker.account(acct) for acct in truth}
        if all(s["events"] == truth[acct] for acct, s in states.items()):
            break
        assert time.monotonic() < deadline, {k: (v["events"], truth[k], v["owned_here"])
                                             for k, v in states.items()
                                             if v["events"] != truth[k]}
        time.sleep(1)
    assert all(s["owned_here"] for s in states.values())
    time.sleep(2)  # the last flush


@pytest.mark.parametrize("joins_mid_stream", [False, True], ids=["from_start", "joins_later"])
def test_a_second_worker_shares_the_work_and_leaves_mid_stream(
        broker: str, tmp_path: Path, joins_mid_stream: bool) -> None:
    env = new_env(broker, tmp_path)
    chunks = _stream(time.time())
    truth = accepted_per_account([m for chunk in chunks for m in chunk])
    early, shared, late = (chunks[:2], chunks[2:4], chunks[4:]) if joins_mid_stream else (
        [], chunks[:3], chunks[3:])
    a = Worker(env, state_dir=tmp_path / "worker-a")
    b: Worker | None = None if joins_mid_stream else Worker(env,
                                                            state_dir=tmp_path / "worker-b")
    try:
        a.wait_ready()
        for chunk in early:
            _send(broker, env.topics, chunk)
        if b is None:  # joins while events flow: A hands partitions over
            b = Worker(env, state_dir=tmp_path / "worker-b")
        b.wait_ready()
        for chunk in shared:
            _send(broker, env.topics, chunk)
            time.sleep(1)
        assert b.stop() == 0, b.log()[-3000:]  # mid-stream: A takes B's partitions (back)
        for chunk in late:
            _send(broker, env.topics, chunk)
        _wait_until_exact(a, truth)
    finally:
        for w in (a, b):
            if w is not None:
                assert w.stop() == 0, w.log()[-3000:]
    merged = f"chdb://{tmp_path / 'merged'}"
    merge_clickhouse([a.dsn(), b.dsn()], merged, tmp_path)
    _check_exact(env.topics, broker, merged, truth)
    ids = [orjson.loads(r.value)["alert_id"]
           for r in asyncio.run(consume_all(broker, env.topics["alerts"], 1))]
    assert len(ids) == len(set(ids)), "a graceful hand-over publishes no alert twice"


def test_a_killed_worker_restarts_with_nothing_lost_or_doubled(broker: str,
                                                                tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    chunks = _stream(time.time())
    truth = accepted_per_account([m for chunk in chunks for m in chunk])
    worker = Worker(env)
    killed = 0
    try:
        worker.wait_ready()
        for i, chunk in enumerate(chunks):
            _send(broker, env.topics, chunk)
            if i in (1, 4):
                time.sleep(0.7)  # mid-batch, mid-flush: whatever it was doing
                worker.kill()
                killed += 1
                worker = Worker(env)
                worker.wait_ready()
        _wait_until_exact(worker, truth)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    figures(f"SIGKILLed {killed} times")
    _check_exact(env.topics, broker, worker.dsn(), truth)
    # Alerts go out after their rows and before their states: a kill repeats an alert only
    # in the milliseconds between the two (same id; the alerts table keeps one).
    ids = [orjson.loads(r.value)["alert_id"]
           for r in asyncio.run(consume_all(broker, env.topics["alerts"], 1))]
    figures(f"alerts published again after the kills: {len(ids) - len(set(ids))}")
