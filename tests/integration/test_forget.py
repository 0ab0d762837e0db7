"""`churnsignal forget account ID` against a real worker: state, links and rows go, audited."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from churnsignal.tools.synthetic import stripe_event, stripe_subscription
from tests.integration.helpers import (
    Env,
    Worker,
    clickhouse_query,
    figures,
    metric,
    new_env,
    produce,
)

pytestmark = [pytest.mark.integration]

TABLES = ("account_daily_data", "account_scores_data", "alerts_data", "billing_events_data",
          "support_events_data")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _track(env: Env, account: str, user: str, n: int, ts: float) -> tuple[str, bytes, bytes]:
    return (env.topics["usage"], user.encode(), orjson.dumps({
        "type": "track", "event": "Report Viewed", "userId": user, "messageId": f"{user}-{n}",
        "timestamp": _iso(ts), "context": {"groupId": account}}))


def _forget(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env.env(), "KAFKA_BOOTSTRAP_SERVERS": env.broker,
               "CHURNSIGNAL_STATE_DIR": str(env.state_dir / "cli")}
    return subprocess.run([sys.executable, "-m", "churnsignal", "forget", *args], env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


def test_forget_an_account(broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    t = env.topics
    now = time.time()
    messages = [_track(env, "acct-a", "ua", n, now - 3600 + n) for n in range(4)]
    messages += [_track(env, "acct-b", "ub", n, now - 3600 + n) for n in range(3)]
    messages += [(t["billing"], None, stripe_event(
        "customer.subscription.created", stripe_subscription(a, "active", 3, 4900),
        now - 1800, f"evt_sub_{a}")) for a in ("acct-a", "acct-b")]
    # a Segment user linked to acct-a (a group call): an identity link to forget with it
    messages.append((t["usage"], b"ua", orjson.dumps({
        "type": "group", "userId": "ua", "groupId": "acct-a", "messageId": "g-ua",
        "timestamp": _iso(now - 1700)})))
    worker = Worker(env)
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, messages))
        worker.wait_applied(4 + 3 + 2)
        assert worker.account("acct-a")["events"] == 5

        started = time.monotonic()
        first = _forget(env, "account", "acct-a")
        took = time.monotonic() - started
        assert first.returncode == 0, first.stderr
        print(first.stdout)
        assert "account state      1 deleted" in first.stdout, first.stdout
        assert worker.account("acct-a") == {"events": 0, "owned_here": False}  # a 404
        assert worker.account("acct-b")["events"] == 4

        again = _forget(env, "account", "acct-a", "--json")
        assert again.returncode == 0, again.stderr
        repeat: dict[str, Any] = json.loads(again.stdout)
        assert (repeat["states"], repeat["identities"], repeat["rows_total"]) == (0, 0, 0)

        # a later event starts afresh
        asyncio.run(produce(broker, [_track(env, "acct-a", "ua", 99, now - 60)]))
        deadline = time.monotonic() + 60
        while worker.account("acct-a")["events"] != 1:
            assert time.monotonic() < deadline, worker.account("acct-a")
            time.sleep(0.3)
        time.sleep(2)  # its rows reach ClickHouse within the flush interval
        metrics = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    assert metric(metrics, "churnsignal_forget_requests_total", kind="account") == 2
    assert metric(metrics, "churnsignal_forgotten_total", what="state") == 1
    assert metric(metrics, "churnsignal_forgotten_total", what="identity") == 2  # cus_, user
    rows_deleted = metric(metrics, "churnsignal_forgotten_total", what="row")

    dsn = worker.dsn()
    per_table = {table: dict(clickhouse_query(
        dsn, f"SELECT account_id, toInt64(count()) FROM {table} FINAL GROUP BY account_id"))  # noqa: S608
        for table in TABLES}
    # acct-a: only what came after the request (the new event's day and score)
    assert per_table["billing_events_data"].get("acct-a") is None
    assert per_table["alerts_data"].get("acct-a") is None
    assert clickhouse_query(dsn, "SELECT toInt64(sum(events)) FROM account_daily "
                                 "WHERE account_id = 'acct-a'") == [[1]]
    # acct-b untouched
    assert per_table["billing_events_data"]["acct-b"] == 1
    assert clickhouse_query(dsn, "SELECT toInt64(sum(events)) FROM account_daily "
                                 "WHERE account_id = 'acct-b'") == [[4]]
    audit = clickhouse_query(
        dsn, "SELECT request_id, phase, kind, subject, states, identities, toInt64(rows_total) "
             "FROM deletions ORDER BY done_at")
    by_request: dict[str, list[Any]] = {}
    for row in audit:
        by_request.setdefault(row[0], []).append(row[1:])
    assert len(by_request) == 2, audit
    first_rows, second_rows = by_request.values()
    assert sum(r[5] for r in first_rows) == rows_deleted > 0
    assert sum(r[3] for r in first_rows) == 1 and sum(r[4] for r in first_rows) == 2
    assert [r[:3] for r in second_rows] == [["states", "account", "acct-a"]]
    assert sum(r[5] for r in second_rows) == 0
    figures(f"forget: account acct-a forgotten in {took:.1f}s, {int(rows_deleted)} ClickHouse "
            "rows deleted, 2 identity links; a repeat deleted nothing; acct-b untouched")
