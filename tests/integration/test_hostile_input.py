"""Hostile and random input at a running worker: every message is accepted or dead-lettered
with a reason, the worker never stops, and what was accepted lands exactly once."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from churnsignal.schemas.decode import REJECT_REASONS
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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REASONS = set(REJECT_REASONS)  # decode's; nothing here should fail later than decoding
SQLISH = ["acme'; DROP TABLE alerts_data; --", 'x" OR 1=1 --', "{account}", "a\\';--",
          "Robert'); DROP TABLE account_daily_data;--"]
NASTY_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                     min_size=1, max_size=60)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | NASTY_TEXT,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "id", "object", "data", "event_id", "account_id",
                                       "occurred_at", "messageId", "context", "created",
                                       "userId", "ticket", "event"]), children, max_size=6),
    max_leaves=25,
)


def _canonical(account: str, when: datetime, event_type: str, n: int) -> bytes:
    return orjson.dumps({"event_id": f"h{n}", "account_id": account, "type": event_type,
                         "occurred_at": when.isoformat(), "data": {"feature": account[:40]}})


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "canonical", "canonical", "canonical",
                                 "mutated", "deep", "huge"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=300))  # invalid UTF-8 included
    if kind == "json":
        # the standard library writes what orjson will not: ints past 64 bits, NaN, Infinity
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1500, 60_000]))
        return b"[" * depth + b"]" * depth
    if kind == "huge":
        return b'{"event_id":"big","account_id":"a","type":"session","data":{"x":"' + (
            b"x" * draw(st.integers(260_000, 400_000))) + b'"}}'
    account = draw(st.sampled_from(SQLISH) | NASTY_TEXT)
    recent = st.floats(-80 * 86_400, 3600).map(
        lambda s: datetime.fromtimestamp(time.time() + s, tz=UTC))
    far = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                       timezones=st.just(UTC))
    when = draw(st.one_of(recent, recent, recent, far))
    event_type = draw(st.sampled_from(["session", "feature_used", "export", "nope"]))
    raw = _canonical(account, when, event_type, draw(st.integers(0, 10**9)))
    if kind == "mutated":  # a valid shape with one field of the wrong type
        payload = orjson.loads(raw)
        payload[draw(st.sampled_from(list(payload)))] = draw(json_values)
        raw = json.dumps(payload).encode()
    return raw


class Run:
    def __init__(self, broker: str, env: Env, worker: Worker) -> None:
        self.broker, self.env, self.worker = broker, env, worker
        self.produced = 0
        self.examples = 0


@pytest.fixture(scope="module")
def run(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    env = new_env(broker, tmp_path_factory.mktemp("hostile"))
    worker = Worker(env)
    worker.wait_ready()
    yield Run(broker, env, worker)
    assert worker.stop() == 0, worker.log()[-3000:]


@settings(max_examples=4, deadline=None, phases=[Phase.generate], database=None,
          suppress_health_check=list(HealthCheck))
@given(messages=st.lists(hostile(), min_size=40, max_size=120))
def test_hostile_input_is_accepted_or_dead_lettered_and_the_worker_stays_up(
        run: Run, messages: list[bytes]) -> None:
    topics = [run.env.topics[k] for k in ("usage", "billing", "support")]
    rng = random.Random(run.examples)
    batch: list[tuple[str, bytes | None, bytes]] = []
    for raw in messages:
        batch.append((rng.choice(topics), None, raw))
        if rng.random() < 0.1:
            batch.append((rng.choice(topics), None, raw))  # a producer retry
    asyncio.run(produce(run.broker, batch))
    run.produced += len(batch)
    run.examples += 1
    deadline = time.monotonic() + 60
    while True:
        assert run.worker.proc.poll() is None, run.worker.log()[-3000:]
        metrics = run.worker.metrics()
        consumed = metric(metrics, "churnsignal_events_consumed_total")
        if consumed >= run.produced:
            break
        assert time.monotonic() < deadline, f"consumed {consumed} of {run.produced}"
        time.sleep(0.5)
    accepted = metric(metrics, "churnsignal_events_accepted_total")
    skipped = metric(metrics, "churnsignal_events_skipped_total")
    dead = sum(metric(metrics, "churnsignal_events_dead_lettered_total", step=step)
               for step in ("decode", "ingest"))  # instead of accepted (later steps: after)
    figures(f"example {run.examples}: produced {run.produced}, accepted {accepted:.0f}, "
          f"skipped {skipped:.0f}, dead-lettered {dead:.0f}")
    assert consumed == run.produced
    assert accepted + skipped + dead == run.produced  # nothing lost, nothing counted twice


def test_dead_letters_carry_reasons_and_accepted_events_land_exactly_once(run: Run) -> None:
    if not run.produced:
        pytest.skip("the hypothesis test did not run")
    worker = run.worker
    deadline = time.monotonic() + 60
    while True:
        metrics = worker.metrics()
        applied = metric(metrics, "churnsignal_events_applied_total")
        summary: dict[str, Any] = worker.summary()
        if summary["events_in_clickhouse"] >= applied:
            break
        assert time.monotonic() < deadline, summary
        time.sleep(0.5)
    dlq = asyncio.run(consume_all(run.broker, run.env.topics["dlq"], 1))
    reasons = Counter(dict(r.headers)["dlq_reason"].decode() for r in dlq)
    assert set(reasons) <= REASONS, reasons
    assert sum(reasons.values()) == metric(metrics, "churnsignal_events_dead_lettered_total")
    assert all(dict(r.headers).get("dlq_offset") for r in dlq)
    assert summary["events_in_clickhouse"] == applied  # exactly once in ClickHouse
    figures(f"dead letters by reason: {dict(reasons)}; applied {applied:.0f}")


def test_sql_looking_account_ids_are_stored_as_data(run: Run) -> None:
    before = metric(run.worker.metrics(), "churnsignal_events_applied_total")
    asyncio.run(produce(run.broker, [
        (run.env.topics["usage"], None, _canonical(a, datetime.now(UTC), "session", 10**10 + i))
        for i, a in enumerate(SQLISH)]))
    run.worker.wait_applied(0)  # the endpoint answers
    deadline = time.monotonic() + 60
    while metric(run.worker.metrics(), "churnsignal_events_applied_total") < before + len(SQLISH):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(2)  # the next flush
    assert run.worker.stop() == 0, run.worker.log()[-3000:]  # the embedded store is then free
    dsn = run.env.settings().effective_clickhouse_dsn()
    stored = {a for [a] in clickhouse_query(
        dsn, "SELECT DISTINCT account_id FROM account_daily WHERE has({ids:Array(String)}, "
        "account_id)", {"ids": SQLISH})}
    assert stored == set(SQLISH)
    [[tables]] = clickhouse_query(dsn, "SELECT count() FROM system.tables WHERE name IN "
                                       "('alerts_data', 'account_daily_data')")
    assert int(tables) == 2  # nothing was dropped
