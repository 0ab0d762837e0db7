"""A ClickHouse outage during a run: the worker stays up, holds back, and catches up exactly."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.integration.helpers import Worker, clickhouse_query, consume_all, figures, metric, new_env, produce
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

    worker = Worker(env, module="tests.integration.faulty_worker",
                    extra={"CHURNSIGNAL_TEST_CLICKHOUSE_DOWN": str(down),
                           "CHURNSIGNAL_SINK__RETRY_MAX_S": "1"})
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, [(env.topics[k], key, v) for k, key, v in before]))
        deadline = time.monotonic() + 60
        while metric(worker.metrics(), "churnsignal_clickhouse_errors_total") < 3:
            assert time.monotonic() < deadline, "writes never failed"
            time.sleep(0.5)
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
        worker = Worker(env, module="tests.integration.faulty_worker",
                        extra={"CHURNSIGNAL_TEST_CLICKHOUSE_DOWN": str(down)})
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
