"""Record batches as non-Python producers write them: every codec librdkafka uses is read, and
a batch that cannot be read is dead-lettered and skipped while everything else goes on."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.helpers import (
    Worker,
    clickhouse_query,
    consume_all,
    figures,
    metric,
    new_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # compression.type -> Kafka's codec id
ACCOUNTS = [f"codec-{i}" for i in range(5)]


def _track(account: str, message_id: str, ts: float) -> bytes:
    """A Segment track call as analytics libraries send it."""
    return orjson.dumps({
        "type": "track", "event": "Report Viewed", "userId": f"user-{message_id}",
        "messageId": message_id, "context": {"groupId": account},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)),
        "properties": {"report": "weekly", "rows": 1200}})


def librdkafka_produce(broker: str, topic: str, codec: str,
                       messages: list[tuple[bytes | None, bytes]],
                       partition: int | None = None) -> tuple[list[int], list[str]]:
    """Produce with confluent-kafka (librdkafka, not aiokafka) as one flush: the messages
    travel as compressed multi-record batches. Returns (offsets, errors)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker, "compression.type": codec,
                         "linger.ms": 100, "acks": "all", "enable.idempotence": False})
    offsets: list[int] = []
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            offsets.append(msg.offset())

    for key, value in messages:
        if partition is None:
            producer.produce(topic, value, key, on_delivery=delivered)
        else:
            producer.produce(topic, value, key, partition=partition, on_delivery=delivered)
    left = producer.flush(30)
    if left:
        errors.append(f"{left} messages not delivered within 30 s")
    return sorted(offsets), errors


def batches_on_disk(kafka_dir: str, topic: str, partition: int) -> list[tuple[int, int, int, int]]:
    """(file position, size, base offset, codec id) of each record batch in a partition's log."""
    out = []
    for segment in sorted((Path(kafka_dir) / "data" / f"{topic}-{partition}").glob("*.log")):
        data = segment.read_bytes()
        pos = 0
        while pos + 23 <= len(data):
            base, length = struct.unpack_from(">qi", data, pos)
            attributes = struct.unpack_from(">h", data, pos + 21)[0]
            out.append((pos, 12 + length, base, attributes & 0x07))
            pos += 12 + length
    return out


def _account_totals(worker: Worker) -> dict[str, int]:
    rows = clickhouse_query(worker.dsn(), "SELECT account_id, toInt64(sum(events)) "
                                          "FROM account_daily GROUP BY account_id")
    return {account: int(n) for account, n in rows}


def test_every_codec_a_librdkafka_producer_uses_is_read_exactly_once(
        broker: str, broker_kind: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    topic = env.topics["usage"]
    now = time.time()
    truth: Counter[str] = Counter()
    for codec in CODECS:
        messages = []
        for n in range(60):
            account = ACCOUNTS[n % len(ACCOUNTS)]
            messages.append((account.encode(), _track(account, f"{codec}-{n}", now - 3600 + n)))
            truth[account] += 1
        offsets, errors = librdkafka_produce(broker, topic, codec, messages)
        if errors and broker_kind == "embedded":
            pytest.skip(f"the embedded broker refused {codec} batches: {errors[0]}")
        assert not errors and len(offsets) == len(messages), errors
    kafka_dir = os.environ.get("CHURNSIGNAL_TEST_KAFKA_DIR")
    if kafka_dir:  # the log holds the producer's batches as compressed (topic compression: producer)
        on_disk = {codec for p in range(4) for *_, codec in batches_on_disk(kafka_dir, topic, p)}
        assert on_disk == set(CODECS.values())
    total = sum(truth.values())
    worker = Worker(env)
    try:
        worker.wait_ready()
        worker.wait_applied(total)
        text = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert metric(text, "churnsignal_events_accepted_total", topic=topic) == total
    assert metric(text, "churnsignal_events_dead_lettered_total") == 0
    assert metric(text, "churnsignal_ingest_unreadable_batches_total") == 0
    assert _account_totals(worker) == truth
    figures(f"codecs {', '.join(CODECS)} from librdkafka: {total} events counted exactly once")


def test_a_corrupt_batch_is_dead_lettered_and_skipped_while_the_rest_goes_on(
        broker: str, tmp_path: Path) -> None:
    kafka_dir = os.environ.get("CHURNSIGNAL_TEST_KAFKA_DIR")
    if not kafka_dir:
        pytest.skip("needs the Apache Kafka `make test-kafka` starts, to corrupt a batch in its "
                    "log on disk (the embedded broker keeps its log in memory); "
                    "tests/unit/test_ingest.py reads corrupt and unknown-codec batch bytes")
    env = new_env(broker, tmp_path)
    topic = env.topics["usage"]
    now = time.time()
    truth: Counter[str] = Counter()
    batches: dict[str, list[int]] = {}
    # Partition 0 gets three batches (before, bad, after); the other partitions one each.
    for name, partition in [("before", 0), ("bad", 0), ("after", 0), ("p1", 1), ("p2", 2),
                            ("p3", 3)]:
        messages = [(account.encode(), _track(account, f"{name}-{i}", now - 3600 + i))
                    for i, account in enumerate(ACCOUNTS * 4)]
        offsets, errors = librdkafka_produce(broker, topic, "gzip", messages, partition)
        assert not errors and len(offsets) == len(messages), errors
        batches[name] = offsets
        if name != "bad":
            truth.update(account for account, _ in ((k.decode(), v) for k, v in messages))
    # A bit flipped inside the bad batch's records, as a failing disk would leave it: its CRC
    # no longer matches. The broker serves log bytes as they are, so the consumer sees it.
    bad = [b for b in batches_on_disk(kafka_dir, topic, 0) if b[2] == batches["bad"][0]]
    assert len(bad) == 1, batches_on_disk(kafka_dir, topic, 0)
    position, size, _, _ = bad[0]
    log_file = sorted((Path(kafka_dir) / "data" / f"{topic}-0").glob("*.log"))[0]
    with open(log_file, "r+b") as f:
        f.seek(position + size - 3)
        byte = f.read(1)[0]
        f.seek(position + size - 3)
        f.write(bytes([byte ^ 0xFF]))
    total = sum(truth.values())
    worker = Worker(env)
    try:
        worker.wait_ready()
        worker.wait_applied(total)
        text = worker.metrics()
        assert worker.proc.poll() is None
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert _account_totals(worker) == truth
    dead = asyncio.run(consume_all(broker, env.topics["dlq"]))
    headers = [dict(r.headers) for r in dead]
    assert sorted(int(h["dlq_offset"]) for h in headers) == batches["bad"]
    assert {h["dlq_reason"] for h in headers} == {b"unreadable_batch"}
    assert {(h["dlq_topic"], h["dlq_partition"], h["dlq_step"]) for h in headers} == {
        (topic.encode(), b"0", b"ingest")}
    assert all(b"CorruptRecordException" in h["dlq_detail"] for h in headers)
    assert all(r.value is None and r.key == b"" for r in dead)  # nothing of them was read
    assert metric(text, "churnsignal_ingest_unreadable_batches_total", topic=topic) == 1
    assert metric(text, "churnsignal_events_dead_lettered_total", topic=topic,
                  reason="unreadable_batch") == len(batches["bad"])
    assert metric(text, "churnsignal_events_consumed_total", topic=topic) == total + len(
        batches["bad"])
    log_lines = [line for line in worker.log().splitlines() if "unreadable_batch" in line]
    assert len(log_lines) == 1 and f"offsets {batches['bad'][0]}.." in log_lines[0]
    figures(f"corrupt batch of {len(batches['bad'])} records: dead-lettered and skipped; "
            f"{total} other events counted exactly once")
