"""The ingest in a child process of the worker (``CHURNSIGNAL_INGEST__SEPARATE_PROCESS``):
the same results, its metrics on the worker's endpoint, a child that dies started again, and
none left behind by a worker that dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.helpers import (
    Worker,
    clickhouse_query,
    figures,
    http_json,
    metric,
    new_env,
    produce,
)
from tests.scenarios import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEPARATE = {"CHURNSIGNAL_INGEST__SEPARATE_PROCESS": "true"}


def _history(s: Scenario, accounts: range) -> None:
    for a in accounts:
        account = f"acct-{a:03d}"
        s.subscription(account, 30)
        s.steady(account, days=20, per_day=2)
        if a % 5 == 0:
            s.subscription(account, 0.001, cancel=True, kind="customer.subscription.updated")


def _is_ingest(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE and (
            "churnsignal.app.ingest_process" in " ".join(process.cmdline()))
    except psutil.Error:  # gone (or a zombie) meanwhile
        return False


def _child(worker: Worker, timeout: float = 30) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [p for p in psutil.Process(worker.proc.pid).children() if _is_ingest(p)]
        if children:
            return children[0]
        time.sleep(0.2)
    raise AssertionError("no ingest process")


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_an_ingest_process_of_its_own_folds_everything_once_across_its_crash_and_the_workers(
        broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    s = Scenario(time.time())
    batches = []
    for first in (0, 10, 20):
        s.messages.clear()
        _history(s, range(first, first + 10))
        batches.append([(env.topics[k], key, v) for k, key, v in s.messages])
    total = sum(len(b) for b in batches)

    worker = Worker(env, extra=SEPARATE)
    try:
        worker.wait_ready()
        child = _child(worker)
        asyncio.run(produce(broker, batches[0]))
        worker.wait_applied(len(batches[0]))
        # Counted by the child, shown by the worker (reported every 0.2 s).
        deadline = time.monotonic() + 10
        while metric(worker.metrics(), "churnsignal_events_consumed_total") < len(batches[0]):
            assert time.monotonic() < deadline, "the child's metrics never reached the worker"
            time.sleep(0.2)
        metrics = worker.metrics()
        assert metric(metrics, "churnsignal_events_consumed_total") == len(batches[0])
        assert metric(metrics, "churnsignal_events_accepted_total") == len(batches[0])

        # The child dies: the worker starts another, which goes on from the committed offsets.
        os.kill(child.pid, signal.SIGKILL)
        assert _gone(child.pid, 10)
        second = _child(worker)
        assert second.pid != child.pid
        asyncio.run(produce(broker, batches[1]))
        worker.wait_applied(len(batches[0]) + len(batches[1]))
        assert worker.proc.poll() is None
        # The outage its death was ended with the new child's first report.
        health = http_json(worker.port, "/healthz")
        assert health["status"] == "ok" and "outage" not in health["reason"], health

        # The worker dies (SIGKILL: no drain): its child stops by itself, and the next
        # worker applies what was not acked, once.
        worker.kill()
        assert _gone(second.pid, 15), "the ingest process outlived its worker"
        worker = Worker(env, extra=SEPARATE)
        worker.wait_ready()
        asyncio.run(produce(broker, batches[2]))
        summary = worker.wait_applied(len(batches[2]))
        deadline = time.monotonic() + 60
        while summary["events_in_clickhouse"] < total:
            assert time.monotonic() < deadline, f"{summary['events_in_clickhouse']} of {total}"
            time.sleep(0.5)
            summary = worker.summary()
        last_child = _child(worker)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert _gone(last_child.pid, 5), "a stopped worker left its ingest process running"

    dsn = env.settings().effective_clickhouse_dsn()
    [[events, accounts]] = clickhouse_query(
        dsn, "SELECT sum(events), uniqExact(account_id) FROM account_daily")
    [[alerts]] = clickhouse_query(dsn, "SELECT count() FROM alerts")
    figures(f"ingest process: {total} events, {events} in ClickHouse over {accounts} accounts, "
            f"{alerts} alerts, across a child crash and a worker crash")
    assert (int(events), int(accounts)) == (total, 30)
    assert int(alerts) == 6


def test_an_ingest_process_that_cannot_start_fails_the_health_check(broker: str,
                                                                     tmp_path: Path) -> None:
    # A bad install: the child's module is missing, so each child exits at once. The
    # worker must not look healthy while it reads nothing; a restart of the pod (what a
    # failing /healthz brings) is also what would pick up a fixed image.
    import json
    import urllib.error
    import urllib.request

    env = new_env(broker, tmp_path)
    worker = Worker(env, extra=SEPARATE, module="tests.integration.crashing_ingest_worker")
    try:
        deadline = time.monotonic() + 90
        while True:
            assert worker.proc.poll() is None, worker.log()[-3000:]
            try:
                with urllib.request.urlopen(  # noqa: S310
                        f"http://127.0.0.1:{worker.port}/healthz", timeout=5) as resp:
                    status, body = resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                status, body = exc.code, json.loads(exc.read())
            except (urllib.error.URLError, OSError):
                status, body = 0, {}  # not listening yet
            if status == 503:
                break
            assert time.monotonic() < deadline, (status, body, worker.log()[-3000:])
            time.sleep(0.5)
        assert "ingest-process: the ingest process exited 5 times in a row" in body["reason"]
        assert "last exit code 1" in body["reason"], body
        assert "no_such_ingest_module" in worker.log()  # its own error is in the log
        figures(f"ingest process that cannot start: /healthz 503 ({body['reason'][:80]}...)")
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]  # and it still stops cleanly
