"""`churnsignal forget user ID` against a real worker, and `forget` on the embedded defaults
(no KAFKA_BOOTSTRAP_SERVERS: a worker with its own embedded broker and ClickHouse)."""

from __future__ import annotations

import asyncio
import json
import os
import re
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


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _segment(env: Env, body: dict[str, Any]) -> tuple[str, bytes, bytes]:
    key = str(body.get("userId") or body.get("anonymousId")).encode()
    return (env.topics["usage"], key, orjson.dumps(body))


def _track(env: Env, n: int, ts: float, user: str | None = None, anon: str | None = None,
           group: str | None = None) -> tuple[str, bytes, bytes]:
    body: dict[str, Any] = {"type": "track", "event": "Report Viewed",
                            "messageId": f"{user or anon}-{n}", "timestamp": _iso(ts)}
    if user:
        body["userId"] = user
    if anon:
        body["anonymousId"] = anon
    if group:
        body["context"] = {"groupId": group}
    return _segment(env, body)


def _forget(env: Env, *args: str, broker: str | None,
            state_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    environ.update({**env.env(), "CHURNSIGNAL_STATE_DIR": str(state_dir or env.state_dir / "cli")})
    if broker is not None:
        environ["KAFKA_BOOTSTRAP_SERVERS"] = broker
    return subprocess.run([sys.executable, "-m", "churnsignal", "forget", *args], env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


# The relink below depends on the ingest forgetting which links it sent: with the ingest in
# a child process (CHURNSIGNAL_INGEST__SEPARATE_PROCESS) that request crosses its pipe.
@pytest.mark.parametrize("extra", [{}, {"CHURNSIGNAL_INGEST__SEPARATE_PROCESS": "true"}],
                         ids=["ingest_in_worker", "ingest_process"])
def test_forget_a_user(broker: str, tmp_path: Path, extra: dict[str, str]) -> None:
    env = new_env(broker, tmp_path)
    now = time.time()
    messages = [
        # ua is linked to acct-a by a Group call, and a visitor's anonymous id to ua by an
        # Identify call: two identity keys that name the user
        _segment(env, {"type": "group", "userId": "ua", "groupId": "acct-a",
                       "messageId": "g-ua", "timestamp": _iso(now - 3700)}),
        _segment(env, {"type": "identify", "userId": "ua", "anonymousId": "anon-ua",
                       "messageId": "i-ua", "timestamp": _iso(now - 3700)}),
    ]
    # ua's events name no account: they reach acct-a through ua's link (forwarded)
    messages += [_track(env, n, now - 3600 + n, user="ua") for n in range(3)]
    messages.append(_track(env, 0, now - 3500, anon="anon-ua"))  # through anon -> ua -> acct-a
    # another user of the same account, naming it: untouched
    messages += [_track(env, n, now - 3400 + n, user="ub", group="acct-a") for n in range(2)]
    worker = Worker(env, extra=extra)
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, messages))
        worker.wait_applied(6)
        assert worker.account("acct-a")["events"] == 6

        first = _forget(env, "user", "ua", broker=broker)
        assert first.returncode == 0, first.stderr
        print(first.stdout)
        assert "identity keys      2 deleted" in first.stdout, first.stdout
        assert "account states     1 no longer hold the user" in first.stdout, first.stdout
        assert "ClickHouse rows    none are per user" in first.stdout
        # the account keeps what it counted (events are the account's, not the user's)
        assert worker.account("acct-a")["events"] == 6

        again = _forget(env, "user", "ua", "--json", broker=broker)
        assert again.returncode == 0, again.stderr
        repeat: dict[str, Any] = json.loads(again.stdout)
        assert (repeat["identities"], repeat["scrubbed"], repeat["rows_total"]) == (0, 0, 0)

        # A later event of ua names no account and its link is gone: it waits under a new
        # identity instead of reaching acct-a ...
        parked = metric(worker.metrics(), "churnsignal_identity_events_total", outcome="parked")
        asyncio.run(produce(broker, [_track(env, 99, now - 60, user="ua")]))
        deadline = time.monotonic() + 60
        while metric(worker.metrics(), "churnsignal_identity_events_total",
                     outcome="parked") < parked + 1:
            assert time.monotonic() < deadline, worker.metrics()
            time.sleep(0.3)
        assert worker.account("acct-a")["events"] == 6
        # ... until a new Group call links ua again: the new identity starts afresh (its
        # forwards are numbered from 0 again, and acct-a, which forgot ua's high-water,
        # takes them instead of skipping them as already seen)
        asyncio.run(produce(broker, [_segment(env, {
            "type": "group", "userId": "ua", "groupId": "acct-a", "messageId": "g-ua-2",
            "timestamp": _iso(now - 30)})]))
        deadline = time.monotonic() + 60
        while worker.account("acct-a")["events"] != 7:
            assert time.monotonic() < deadline, worker.account("acct-a")
            time.sleep(0.3)
        time.sleep(2)  # its rows reach ClickHouse within the flush interval
        metrics = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    assert metric(metrics, "churnsignal_forget_requests_total", kind="user") == 2
    assert metric(metrics, "churnsignal_forgotten_total", what="identity") == 2  # user, anon
    assert metric(metrics, "churnsignal_forgotten_total", what="user_trace") == 1
    assert metric(metrics, "churnsignal_forgotten_total", what="row") == 0

    dsn = worker.dsn()
    # By design no ClickHouse table holds anything per user: the only columns that mention
    # users are per-day counts (aggregates), which stay.
    user_columns = clickhouse_query(
        dsn, "SELECT DISTINCT name FROM system.columns WHERE database = currentDatabase() "
             "AND (positionCaseInsensitive(name, 'user') > 0 "
             "OR positionCaseInsensitive(name, 'anon') > 0)")
    assert user_columns == [["active_users"]], user_columns
    assert clickhouse_query(dsn, "SELECT toInt64(sum(events)) FROM account_daily "
                                 "WHERE account_id = 'acct-a'") == [[7]]
    audit = clickhouse_query(
        dsn, "SELECT request_id, phase, kind, subject, identities, scrubbed, "
             "toInt64(rows_total) FROM deletions ORDER BY done_at")
    by_request: dict[str, list[Any]] = {}
    for row in audit:
        by_request.setdefault(row[0], []).append(row[1:])
    assert len(by_request) == 2, audit
    first_rows, second_rows = by_request.values()
    assert all(r[1:3] == ["user", "ua"] for r in first_rows + second_rows), audit
    assert sum(r[3] for r in first_rows) == 2 and sum(r[4] for r in first_rows) == 1
    assert sum(r[5] for r in first_rows + second_rows) == 0  # no rows: none are per user
    assert [r[:3] for r in second_rows] == [["states", "user", "ua"]]  # its home partition
    assert sum(r[3] + r[4] for r in second_rows) == 0
    figures("forget: user ua forgotten (2 identity keys, 1 account state scrubbed, 0 "
            "ClickHouse rows by design); a repeat deleted nothing; its next event waited for a "
            "new link, then joined acct-a afresh")


def _embedded_bootstrap(worker: Worker, run: int) -> str:
    """The address of the worker's own embedded broker in its ``run``-th run (from 1), as
    its log (appended to by every run) says it."""
    deadline = time.monotonic() + 30
    while True:
        found = re.findall(r"embedded Tansu broker pid=\d+ at (127\.0\.0\.1:\d+)", worker.log())
        if len(found) >= run:
            return str(found[run - 1])
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)


@pytest.mark.offline  # brings its own broker (the worker's embedded one)
def test_forget_on_the_embedded_defaults(tmp_path: Path) -> None:
    """No KAFKA_BOOTSTRAP_SERVERS: the worker runs its own broker and ClickHouse. While it
    runs, forget refuses and says how; once it stopped, forget deletes the rows itself,
    audited, idempotently; the next run of the worker starts the account afresh."""
    env = Env("", tmp_path / "state", f"t{time.time_ns() % 10**10}")
    env.state_dir.mkdir(parents=True)
    embedded = {"KAFKA_BOOTSTRAP_SERVERS": ""}
    now = time.time()
    worker = Worker(env, extra=embedded)
    try:
        worker.wait_ready()
        bootstrap = _embedded_bootstrap(worker, 1)
        messages = [_track(env, n, now - 3600 + n, user="ue", group="acct-e") for n in range(3)]
        messages += [_track(env, n, now - 3600 + n, user="uf", group="acct-f") for n in range(2)]
        messages.append((env.topics["billing"], None, stripe_event(
            "customer.subscription.created", stripe_subscription("acct-e", "active", 3, 4900),
            now - 1800, "evt_sub_acct-e")))
        asyncio.run(produce(bootstrap, messages))
        worker.wait_applied(6)
        held = _forget(env, "account", "acct-e", broker=None, state_dir=env.state_dir)
        assert held.returncode == 2, held.stdout + held.stderr
        assert f"held by PID {worker.proc.pid}" in held.stderr, held.stderr
        assert "stop it and run `churnsignal forget` again" in held.stderr
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    first = _forget(env, "account", "acct-e", broker=None, state_dir=env.state_dir)
    assert first.returncode == 0, first.stderr
    print(first.stdout)
    deleted = int(re.search(r"ClickHouse rows +(\d+) deleted", first.stdout).group(1))  # type: ignore[union-attr]
    assert deleted > 0 and "billing_events_data 1" in first.stdout, first.stdout
    again = _forget(env, "account", "acct-e", "--json", broker=None, state_dir=env.state_dir)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["rows_total"] == 0
    user = _forget(env, "user", "ue", broker=None, state_dir=env.state_dir)
    assert user.returncode == 0 and "none are per user" in user.stdout, user.stderr

    dsn = f"chdb://{(env.state_dir / 'clickhouse').resolve()}"
    tables = ("account_daily_data", "account_scores_data", "billing_events_data")
    for table in tables:
        assert clickhouse_query(dsn, f"SELECT toInt64(count()) FROM {table} FINAL "  # noqa: S608
                                     "WHERE account_id = 'acct-e'") == [[0]], table
    assert clickhouse_query(dsn, "SELECT toInt64(sum(events)) FROM account_daily "
                                 "WHERE account_id = 'acct-f'") == [[2]]
    audit = clickhouse_query(dsn, "SELECT phase, kind, subject, toInt64(rows_total) "
                                  "FROM deletions ORDER BY done_at")
    assert audit == [["clickhouse", "account", "acct-e", deleted],
                     ["clickhouse", "account", "acct-e", 0],
                     ["clickhouse", "user", "ue", 0]], audit

    # the worker's next run: a new embedded broker, no state from before; acct-e afresh
    worker = Worker(env, extra=embedded)
    try:
        worker.wait_ready()
        bootstrap = _embedded_bootstrap(worker, 2)
        asyncio.run(produce(bootstrap, [_track(env, 9, now - 60, user="ue", group="acct-e")]))
        worker.wait_applied(1)
        assert worker.account("acct-e")["events"] == 1
        time.sleep(2)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert clickhouse_query(dsn, "SELECT toInt64(sum(events)) FROM account_daily "
                                 "WHERE account_id = 'acct-e'") == [[1]]
    figures(f"forget (embedded defaults): refused while the worker held the store; after it "
            f"stopped, acct-e's {deleted} rows deleted and audited, a repeat deleted nothing")
