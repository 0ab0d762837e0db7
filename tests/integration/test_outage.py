"""A ClickHouse outage during a run: the worker stays up, holds back, and catches up exactly."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from churnsignal.app.embedded import free_port, wait_for_port
from churnsignal.stream.agents import SINK_START_WAIT_S
from tests.integration.helpers import (
    Env,
    Worker,
    clickhouse_query,
    consume_all,
    figures,
    metric,
    new_env,
    produce,
)
from tests.scenarios import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:  # noqa: S310
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _history(s: Scenario, accounts: range) -> None:
    for a in accounts:
        account = f"acct-{a:03d}"
        s.subscription(account, 30)
        s.steady(account, days=30, per_day=3)
        if a % 10 == 0:  # some of them schedule a cancellation now: critical alerts
            s.subscription(account, 0.001, cancel=True, kind="customer.subscription.updated")


def _worker_without_clickhouse(env: Env, down: Path, **settings: str) -> Worker:
    """A worker whose ClickHouse inserts fail while ``down`` exists."""
    return Worker(env, module="tests.integration.faulty_worker",
                  extra={"CHURNSIGNAL_TEST_CLICKHOUSE_DOWN": str(down), **settings})


def _wait_for_failed_writes(worker: Worker, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while metric(worker.metrics(), "churnsignal_clickhouse_errors_total") < n:
        assert time.monotonic() < deadline, "writes never failed"
        time.sleep(0.2)


def test_clickhouse_outage_and_a_crash_during_it_lose_and_double_nothing(
        broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    down = tmp_path / "clickhouse-down"
    down.touch()  # ClickHouse rejects every insert from the start
    s = Scenario(time.time())
    _history(s, range(0, 20))
    before = list(s.messages)
    s.messages.clear()
    _history(s, range(20, 40))
    during = list(s.messages)
    total = len(before) + len(during)
    billing = sum(1 for kind, _, _ in before + during if kind == "billing")

    worker = _worker_without_clickhouse(env, down, CHURNSIGNAL_SINK__RETRY_MAX_S="1")
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in before]))
        _wait_for_failed_writes(worker, 3, timeout=60)
        asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in during]))
        time.sleep(3)  # the outage goes on while more events arrive
        metrics = worker.metrics()
        summary = worker.summary()
        assert worker.proc.poll() is None, "the worker must stay up"
        assert _status(worker.port, "/healthz") == 200  # alive ...
        assert _status(worker.port, "/readyz") == 503  # ... but says its sink is not writable
        assert summary["events_in_clickhouse"] == 0
        assert metric(metrics, "churnsignal_clickhouse_rows_total") == 0
        errors_during = metric(metrics, "churnsignal_clickhouse_errors_total")
        # Alerts do not wait for ClickHouse: the states (and the rows only they would not
        # give again, in the outbox) are stored, and the alerts published.
        deadline = time.monotonic() + 60
        while len(during_outage := asyncio.run(consume_all(broker, env.topics["alerts"], 1))) < 4:
            assert time.monotonic() < deadline, f"{len(during_outage)} alerts during the outage"
        assert len(during_outage) == 4
        assert metric(worker.metrics(), "churnsignal_clickhouse_rows_total") == 0  # still down
        figures(f"outage: {len(before)} events before, {len(during)} during, "
                f"{errors_during:.0f} failed writes, {len(during_outage)} alerts published "
                "meanwhile, then the worker is SIGKILLed")

        # The worker dies while ClickHouse is still down: no pack was acknowledged, so its
        # successor reads every event again; those in the stored states are duplicates,
        # and the outbox gives the rows they made.
        worker.kill()
        down.unlink()  # ClickHouse is back
        worker = _worker_without_clickhouse(env, down)
        worker.wait_ready()
        summary = worker.wait_applied(total)
        metrics = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    assert metric(metrics, "churnsignal_events_applied_total") + metric(
        metrics, "churnsignal_duplicates_skipped_total") == total
    dsn = env.settings().effective_clickhouse_dsn()
    [[events, accounts]] = clickhouse_query(
        dsn, "SELECT sum(events), uniqExact(account_id) FROM account_daily")
    [[billing_rows]] = clickhouse_query(dsn, "SELECT count() FROM billing_events")
    [[alert_rows]] = clickhouse_query(dsn, "SELECT count() FROM alerts")
    published = asyncio.run(consume_all(broker, env.topics["alerts"], 1))
    alert_ids = {orjson.loads(r.value)["alert_id"] for r in published}
    figures(f"after recovery: {events} events, {billing_rows} billing rows, {alert_rows} alerts; "
          f"lost 0 = {total - int(events)}, doubled 0 = {int(events) - total}")
    assert (int(events), int(accounts)) == (total, 40)
    assert int(billing_rows) == billing
    assert len(alert_ids) == len(published) == int(alert_rows) == 4


async def _time_to_alert(broker: str, topic: str, send: list[tuple[str, bytes | None, bytes]],
                         account: str, timeout: float) -> float:
    """Seconds from producing ``send`` to an alert of ``account`` on ``topic``."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker, group_id=None,
                                auto_offset_reset="latest", fetch_max_wait_ms=100)
    await consumer.start()
    try:
        await consumer.seek_to_end()
        started = time.monotonic()
        await produce(broker, send)
        while time.monotonic() - started < timeout:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                if any(orjson.loads(r.value)["account_id"] == account for r in records):
                    return time.monotonic() - started
        return math.inf
    finally:
        await consumer.stop()


def test_alerts_do_not_wait_out_the_clickhouse_back_off(broker: str, tmp_path: Path) -> None:
    # ClickHouse refuses every insert; the sink's back-off doubles up to RETRY_MAX_S. An
    # alert decided meanwhile goes out at once (with its rows' outbox records stored), not
    # at the next write attempt; once ClickHouse is back, its row and everything else land.
    env = new_env(broker, tmp_path)
    down = tmp_path / "clickhouse-down"
    down.touch()
    s = Scenario(time.time())
    _history(s, range(1, 4))  # no cancellations: no alert yet
    history = list(s.messages)
    s.messages.clear()
    s.subscription("acct-new", 0.001, cancel=True, kind="customer.subscription.updated")
    worker = _worker_without_clickhouse(env, down, CHURNSIGNAL_SINK__RETRY_MAX_S="300",
                                        CHURNSIGNAL_SINK__WRITE_TIMEOUT_S="1")
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in history]))
        # After the 7th failed attempt the next one is 6.4-12.8 s away (jittered doubling
        # from 0.2 s).
        _wait_for_failed_writes(worker, 7, timeout=90)
        errors = metric(worker.metrics(), "churnsignal_clickhouse_errors_total")
        waited = asyncio.run(_time_to_alert(
            broker, env.topics["alerts"], [(env.topics[k], key, v) for k, key, v in s.messages],
            "acct-new", timeout=30))
        figures(f"ClickHouse back-off: an alert {waited:.2f}s after its event, "
                f"{errors:.0f} failed writes before it")
        assert waited < 4.0
        assert metric(worker.metrics(), "churnsignal_clickhouse_errors_total") == errors, \
            "no write was attempted meanwhile: the sink was still backing off"
        assert metric(worker.metrics(), "churnsignal_clickhouse_rows_total") == 0
        down.unlink()
        total = len(history) + len(s.messages)
        worker.wait_applied(total)
        deadline = time.monotonic() + 60
        while worker.summary()["events_in_clickhouse"] < total:
            assert time.monotonic() < deadline, "the rows never followed"
            time.sleep(0.5)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    dsn = env.settings().effective_clickhouse_dsn()
    [[alert_rows]] = clickhouse_query(dsn, "SELECT count() FROM alerts")
    [[events]] = clickhouse_query(dsn, "SELECT sum(events) FROM account_daily")
    published = asyncio.run(consume_all(broker, env.topics["alerts"], 1))
    assert int(alert_rows) == len(published) == 1
    assert int(events) == total


def test_a_clickhouse_unreachable_at_start_holds_back_no_alert(broker: str,
                                                                tmp_path: Path) -> None:
    # The state agent folds nothing until the sink has started, or failed to (agents.py,
    # SINK_START_WAIT_S). A server that refuses connections fails the start at once: the
    # agent must fold then, not wait the bound out, and its alerts must not wait for
    # ClickHouse either.
    env = new_env(broker, tmp_path)
    s = Scenario(time.time())
    _history(s, range(0, 10))  # acct-000 schedules a cancellation: one critical alert
    asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in s.messages]))
    closed = free_port()  # nothing listens there
    worker = Worker(env, extra={"CHURNSIGNAL_CLICKHOUSE_DSN": f"http://127.0.0.1:{closed}",
                                "CHURNSIGNAL_SINK__WRITE_TIMEOUT_S": "1"})
    try:
        assert wait_for_port(worker.port, 120), worker.log()[-3000:]
        up = time.monotonic()
        deadline = up + 60
        while not (alerts := asyncio.run(consume_all(broker, env.topics["alerts"], 1))):
            assert time.monotonic() < deadline, worker.log()[-3000:]
        waited = time.monotonic() - up
        figures(f"ClickHouse unreachable at start: the first alert {waited:.1f}s after the "
                f"worker's port opened (the start's bound is {SINK_START_WAIT_S:.0f}s)")
        # Waiting the bound out would put the alert after SINK_START_WAIT_S (the agent starts
        # as the port opens); the consumer group's forming and a failed write come first.
        assert waited < SINK_START_WAIT_S, "the agent waited out the sink's start"
        assert [orjson.loads(r.value)["account_id"] for r in alerts] == ["acct-000"]
        assert _status(worker.port, "/readyz") == 503  # the sink is not writable
        assert metric(worker.metrics(), "churnsignal_clickhouse_rows_total") == 0
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    # The shutdown flush could not write its rows: one warning, not a service's traceback.
    log = worker.log()
    assert "shutdown flush did not complete" in log, log[-3000:]
    assert "Error while stopping" not in log, log[-3000:]
