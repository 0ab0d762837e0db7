"""Thousands of provider-shaped mutants at a running worker, then sentinels on every partition.

The mutants are the providers' documented payloads (Stripe Events, Segment calls, Zendesk
webhooks and tickets, canonical events) with one leaf changed: numbers at and beyond the
platform's limits, type swaps, huge and odd strings, deleted keys, deep nesting, duplicate
keys (tests/strategies.py). The worker must stay up and account for every record
(accepted + skipped + dead-lettered at decode = consumed, each dead letter with a known reason), and a
valid sentinel event produced afterwards to every partition of every source topic must be
counted exactly once: nothing upstream of it stopped its partition.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from churnsignal.schemas.decode import REJECT_REASONS
from tests.integration.helpers import (
    Worker,
    clickhouse_query,
    consume_all,
    figures,
    metric,
    new_env,
)
from tests.strategies import mutants, sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_TOPIC = 800  # mutants per source topic
# Reasons a record may be dead-lettered with at any step.
KNOWN = set(REJECT_REASONS) | {"processing_error", "unreadable_batch", "unattributed_overflow",
                               "unattributed_expired", "unattributed_history", "sink_rejected"}


async def _produce_to_partitions(broker: str, topic: str,
                                 values: list[tuple[int | None, bytes]]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all",
                                max_request_size=4_000_000)
    await producer.start()
    try:
        for partition, value in values:
            await producer.send(topic, value, partition=partition)
        await producer.flush()
        return len(await producer.partitions_for(topic))
    finally:
        await producer.stop()


def _sentinel(account: str) -> bytes:
    return orjson.dumps({"event_id": f"{account}-1", "account_id": account, "type": "session",
                         "user_id": "u1", "occurred_at": datetime.now(UTC).isoformat(),
                         "data": {}})


def test_provider_mutants_never_stop_a_partition(broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    worker = Worker(env)
    worker.wait_ready()
    now = time.time()
    produced = 0
    partitions: dict[str, int] = {}
    for seed, kind in enumerate(("usage", "billing", "support")):
        values = sample(mutants(kind, now), PER_TOPIC, seed=seed)
        partitions[kind] = asyncio.run(_produce_to_partitions(
            broker, env.topics[kind], [(None, v) for v in values]))
        produced += len(values)
    # Then one valid event to every partition of every source topic.
    sentinels = []
    for kind, count in partitions.items():
        for partition in range(count):
            account = f"sentinel-{kind}-{partition}"
            sentinels.append(account)
            asyncio.run(_produce_to_partitions(broker, env.topics[kind],
                                               [(partition, _sentinel(account))]))
    produced += len(sentinels)

    deadline = time.monotonic() + 180
    while True:
        assert worker.proc.poll() is None, worker.log()[-3000:]
        text = worker.metrics()
        consumed = metric(text, "churnsignal_events_consumed_total")
        if consumed >= produced and all(worker.account(a)["events"] == 1 for a in sentinels):
            break
        assert time.monotonic() < deadline, f"consumed {consumed} of {produced}"
        time.sleep(1)
    accepted = metric(text, "churnsignal_events_accepted_total")
    skipped = metric(text, "churnsignal_events_skipped_total")
    dead = metric(text, "churnsignal_events_dead_lettered_total")
    # instead of being accepted; later steps' dead letters (a history row ClickHouse refuses,
    # say) are of events counted as accepted
    refused = sum(metric(text, "churnsignal_events_dead_lettered_total", step=step)
                  for step in ("decode", "ingest"))
    dlq = asyncio.run(consume_all(broker, env.topics["dlq"], 2))
    reasons = Counter(dict(r.headers)["dlq_reason"].decode() for r in dlq)
    steps = Counter(dict(r.headers)["dlq_step"].decode() for r in dlq)
    figures(f"mutants: produced {produced} ({len(sentinels)} sentinels), accepted "
            f"{accepted:.0f}, skipped {skipped:.0f}, dead-lettered {dead:.0f}; "
            f"DLQ by reason {dict(reasons)}, by step {dict(steps)}")
    for record in dlq:  # rare (a mutant the decoder accepts and the fold refuses): name it
        headers = dict(record.headers)
        if headers["dlq_step"] != b"decode":
            figures(f"mutants: dead-lettered at {headers['dlq_step'].decode()} as "
                    f"{headers['dlq_reason'].decode()}: {headers['dlq_detail'].decode()[:500]}; "
                    f"record {(record.value or b'')[:800]!r}")
    assert consumed == produced
    assert accepted + skipped + refused == produced  # nothing lost, nothing counted twice
    assert set(reasons) <= KNOWN, reasons
    for record in dlq:  # every documented header, from every step
        assert {"dlq_reason", "dlq_detail", "dlq_step", "dlq_topic", "dlq_partition",
                "dlq_offset", "dlq_timestamp"} <= set(dict(record.headers))

    time.sleep(2)  # the next flush
    assert worker.stop() == 0, worker.log()[-3000:]
    assert "We experienced a crash" not in worker.log()
    rows = dict(clickhouse_query(
        worker.dsn(), "SELECT account_id, sum(events) FROM account_daily WHERE "
        "has({ids:Array(String)}, account_id) GROUP BY account_id", {"ids": sentinels}))
    assert {a: int(n) for a, n in rows.items()} == dict.fromkeys(sentinels, 1)
