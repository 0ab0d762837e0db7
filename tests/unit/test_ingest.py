"""The ingest's error paths without a broker: per-record isolation, history items, Kafka
failures retried (never dead-lettered), unreadable batches turned into placeholders."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.errors import (
    CommitFailedError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    UnsupportedCodecError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings
from churnsignal.schemas.decode import DecodeOptions
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.schemas.results import Skipped
from churnsignal.stream import ingest, packs
from churnsignal.stream.ingest import Ingestor, RateLimitedLog, Unreadable

USAGE = TopicPartition("usage.events", 0)


# --- the rate-limited log ----------------------------------------------------------------------

def test_a_kind_of_problem_is_logged_once_a_minute_with_what_was_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t.ratelimit"), period_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.ratelimit"):
        assert limited.log("OverflowError", logging.WARNING, "bad %s", 1)
        for i in range(1000):
            now[0] = i * 0.05
            assert not limited.log("OverflowError", logging.WARNING, "bad %s", i)
        assert limited.log("KeyError", logging.WARNING, "other")  # its own key
        now[0] = 61.0
        assert limited.log("OverflowError", logging.WARNING, "bad %s", 2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad 1", "other", "bad 2 (1000 more like this since 61 s ago)"]


def test_the_rate_limited_log_keeps_a_bounded_number_of_keys() -> None:
    limited = RateLimitedLog(logging.getLogger("t.bounded"), max_keys=10)
    for i in range(100):
        limited.log(i, logging.DEBUG, "x")
    assert len(limited._seen) <= 10


# --- unreadable batches: aiokafka's own PartitionRecords over real batch bytes ------------------

def _batch(base: int, n: int, codec: int = 0) -> bytearray:
    builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 20)
    for i in range(n):
        builder.append(i, 1_700_000_000_000 + i, f"k{base + i}".encode(),
                       orjson.dumps({"n": base + i}), [])
    buf = builder.build()
    struct.pack_into(">q", buf, 0, base)  # the broker assigns the base offset (outside the CRC)
    return buf


def _with_codec(buf: bytearray, codec: int) -> bytearray:
    """The same batch claiming another codec, with a valid CRC: a codec nobody can read."""
    attributes_at = struct.calcsize(">qiibI")  # base offset, length, epoch, magic, CRC
    attributes = struct.unpack_from(">h", buf, attributes_at)[0]
    struct.pack_into(">h", buf, attributes_at, (attributes & ~0x07) | codec)
    struct.pack_into(">I", buf, struct.calcsize(">qiib"),
                     calc_crc32c(bytes(buf[attributes_at:])))
    return buf


def _corrupt(buf: bytearray) -> bytearray:
    buf[-3] ^= 0xFF  # a flipped bit in a record, as a bad disk would leave it: CRC mismatch
    return buf


def _read(data: bytes, fetch_offset: int = 0, guarded: bool = True) -> tuple[list[Any], Any]:
    ingest.install_guard()
    from aiokafka.consumer import fetcher

    records = fetcher.PartitionRecords(
        USAGE, MemoryRecords(data), None, fetch_offset,
        ingest.source_key if guarded else None, None, True, 0)
    return list(records), records


def _marks(records: list[Any]) -> list[tuple[int, int | None, str]]:
    """(first, end, exception class) of each placeholder."""
    classes = ("UnsupportedCodecError", "CorruptRecordException")
    return [(r.headers[0].first, r.headers[0].end,
             next(c for c in classes if c in r.headers[0].error))
            for r in records if r.headers and isinstance(r.headers[0], Unreadable)]


def test_the_private_fetcher_the_guard_relies_on_is_still_there() -> None:
    assert ingest.guard_problems() == []


def test_an_unreadable_batch_becomes_one_placeholder_and_the_rest_is_read() -> None:
    data = (_batch(0, 3, codec=1) + _with_codec(_batch(3, 3), 5) + _batch(6, 2)
            + _corrupt(_batch(8, 2)) + _batch(10, 2))
    records, state = _read(bytes(data))
    assert [r.offset for r in records] == [0, 1, 2, 3, 6, 7, 8]
    assert _marks(records) == [(3, 6, "UnsupportedCodecError"), (8, 10, "CorruptRecordException")]
    assert [orjson.loads(r.value)["n"] for r in records if r.value] == [0, 1, 2, 6, 7]
    assert records[3].key is None and records[3].value is None
    # After a CRC mismatch the rest of the fetch is not trusted: the next fetch starts after
    # the bad batch, at a boundary the broker finds.
    assert state.next_fetch_offset == 10


def test_a_fetch_that_starts_inside_an_unreadable_batch_skips_only_what_is_left() -> None:
    records, state = _read(bytes(_with_codec(_batch(3, 5), 5) + _batch(8, 1)), fetch_offset=5)
    assert _marks(records) == [(5, 8, "UnsupportedCodecError")]
    assert [r.offset for r in records] == [5, 8]
    assert state.next_fetch_offset == 9


def test_a_batch_header_that_cannot_be_parsed_has_an_unknown_end() -> None:
    garbage = struct.pack(">qi", 4, 10) + bytes(10)  # a batch 22 bytes long: below any header
    records, state = _read(bytes(_batch(0, 4) + garbage))
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    assert _marks(records) == [(4, None, "CorruptRecordException")]


def test_other_consumers_keep_aiokafkas_behaviour() -> None:
    with pytest.raises(UnsupportedCodecError):
        _read(bytes(_batch(0, 2) + _with_codec(_batch(2, 2), 5)), guarded=False)


# --- the batch loop, with a fake consumer and producer ------------------------------------------

class FakeProducer:
    """Acknowledges sends, or fails them as ``fail(topic, value, partition, attempt)`` says."""

    def __init__(self, fail: Callable[[str, Any, int | None, int], BaseException | None]
                 = lambda *_: None) -> None:
        self.fail = fail
        self.attempts = 0
        self.sent: list[tuple[str, Any, Any, Any, int | None, bool]] = []  # ..., acknowledged

    async def send(self, topic: str, value: Any = None, key: Any = None, headers: Any = None,
                   partition: int | None = None) -> asyncio.Future[Any]:
        assert not (value is None and key is None), "aiokafka: Need at least one: key or value"
        self.attempts += 1
        error = self.fail(topic, value, partition, self.attempts)
        self.sent.append((topic, value, key, headers, partition, error is None))
        fut = asyncio.get_running_loop().create_future()
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
        return fut

    def delivered(self, topic: str) -> list[Any]:
        return [s for s in self.sent if s[0] == topic and s[5]]


class FakeConsumer:
    def __init__(self, commit_errors: list[BaseException] | None = None) -> None:
        self.commits: list[dict[Any, int]] = []
        self.commit_errors = commit_errors or []
        self._paused: set[Any] = set()

    async def commit(self, offsets: dict[Any, int]) -> None:
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.commits.append(dict(offsets))

    def pause(self, *tps: Any) -> None:
        self._paused.update(tps)

    def paused(self) -> set[Any]:
        return self._paused

    def highwater(self, tp: Any) -> int | None:
        return None


def _ingestor(tmp_path: Path, producer: FakeProducer,
              consumer: FakeConsumer | None = None) -> Ingestor:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9", state_dir=tmp_path)
    ingestor = Ingestor(settings, Metrics(CollectorRegistry()), DecodeOptions())
    ingestor.producer = producer  # type: ignore[assignment]
    ingestor.consumer = consumer or FakeConsumer()  # type: ignore[assignment]
    return ingestor


def _record(offset: int, value: bytes | None, key: bytes | None = b"k",
            headers: tuple[Any, ...] = ()) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(USAGE.topic, USAGE.partition, offset, 1_700_000_000_000, 0, key, value,
                          None, 1, len(value or b""), headers)


def _event(n: int, account: str = "acme") -> bytes:
    return orjson.dumps({"event_id": f"e{n}", "account_id": account, "type": "session",
                         "occurred_at": _recent(), "data": {}})


def _recent() -> str:
    import datetime as dt

    return (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _pack_items(producer: FakeProducer, topic: str) -> list[list[Any]]:
    return [item for s in producer.delivered(topic) for item in packs.decode(s[1])["items"]]


async def test_a_record_that_raises_is_dead_lettered_alone_and_logged_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = ingest.decode

    def decode(raw: bytes | None, *args: Any) -> Any:
        if raw and raw.startswith(b"poison"):
            raise OverflowError("date value out of range")
        return real(raw, *args)

    monkeypatch.setattr(ingest, "decode", decode)
    producer = FakeProducer()
    ing = _ingestor(tmp_path, producer)
    batch = {USAGE: [_record(0, _event(0)), _record(1, b"poison-1", b"key-1"),
                     _record(2, _event(2)), _record(3, b"poison-2"), _record(4, _event(4))]}
    with caplog.at_level(logging.ERROR, logger="churnsignal.stream.ingest"):
        await ing.process(batch)
    dlq = producer.delivered(ing.settings.topics.dlq)
    assert [(s[1], s[2]) for s in dlq] == [(b"poison-1", b"key-1"), (b"poison-2", b"k")]
    headers = dict(dlq[0][3])
    assert headers["dlq_reason"] == b"processing_error"
    assert headers["dlq_detail"].startswith(b"OverflowError: date value out of range")
    assert (headers["dlq_step"], headers["dlq_offset"], headers["dlq_timestamp"]) == (
        b"ingest", b"1", b"1700000000000")
    assert [i[2]["event_id"] for i in _pack_items(producer, ing.settings.ingested_topic)] == [
        "e0", "e2", "e4"]
    assert ing.consumer.commits == [{USAGE: 5}]  # type: ignore[union-attr]
    assert _sample(ing.metrics, "churnsignal_events_dead_lettered_total",
                   topic=USAGE.topic, reason="processing_error", step="ingest") == 2
    assert len([r for r in caplog.records if "processing_error" in r.getMessage()]) == 1


async def test_a_too_old_billing_event_is_counted_skipped_and_packed_as_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = EVENT_ADAPTER.validate_python({
        "event_id": "evt_old", "account_id": "acme", "type": "invoice_paid",
        "occurred_at": "2020-01-01T00:00:00Z", "data": {"amount_cents": 100}})
    monkeypatch.setattr(ingest, "decode",
                        lambda *_: Skipped("too_old", (("~stripe:customer:c", "acme"),), old))
    producer = FakeProducer()
    ing = _ingestor(tmp_path, producer)
    await ing.process({USAGE: [_record(7, b"{}")]})
    items = _pack_items(producer, ing.settings.ingested_topic)
    assert [i[2].get("link") for i in items] == ["acme", None]
    assert items[1][:2] == ["usage.events/0", 7] and items[1][3] == packs.HISTORY
    assert items[1][2]["event_id"] == "evt_old"
    assert _sample(ing.metrics, "churnsignal_events_skipped_total",
                   topic=USAGE.topic, reason="too_old") == 1
    assert not producer.delivered(ing.settings.topics.dlq)


async def test_kafka_failures_are_retried_in_order_never_dead_lettered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = packs.chunks
    monkeypatch.setattr(ingest.packs, "chunks", lambda items: chunks(items, 2))

    def fail(topic: str, value: Any, partition: int | None, attempt: int) -> BaseException | None:
        return KafkaTimeoutError("broker blip") if attempt in (1, 3) else None

    producer = FakeProducer(fail)
    consumer = FakeConsumer(commit_errors=[KafkaTimeoutError("coordinator blip")])
    ing = _ingestor(tmp_path, producer, consumer)
    await ing.process({USAGE: [_record(i, _event(i)) for i in range(5)]})
    ingested = ing.settings.ingested_topic
    # One pack per internal partition at a time: a later pack is never sent while an earlier
    # one is unacknowledged (the agent's offset high-water would skip the earlier one).
    order = [(orjson.loads(s[1])["items"][0][1], s[5]) for s in producer.sent if s[0] == ingested]
    assert order == [(0, False), (0, True), (2, False), (2, True), (4, True)]
    assert [i[1] for i in _pack_items(producer, ingested)] == [0, 1, 2, 3, 4]
    assert not producer.delivered(ing.settings.topics.dlq)
    assert consumer.commits == [{USAGE: 5}]
    assert _sample(ing.metrics, "churnsignal_ingest_kafka_retries_total", operation="produce") == 2
    assert _sample(ing.metrics, "churnsignal_ingest_kafka_retries_total", operation="commit") == 1


async def test_a_commit_after_a_rebalance_is_not_retried(tmp_path: Path) -> None:
    consumer = FakeConsumer(commit_errors=[CommitFailedError("rebalanced")])
    ing = _ingestor(tmp_path, FakeProducer(), consumer)
    await ing.process({USAGE: [_record(0, _event(0))]})
    assert consumer.commits == [] and not consumer.commit_errors
    assert _sample(ing.metrics, "churnsignal_ingest_kafka_retries_total", operation="commit") == 0


async def test_a_pack_too_large_for_the_topic_is_split_in_order(tmp_path: Path) -> None:
    def fail(topic: str, value: Any, partition: int | None, attempt: int) -> BaseException | None:
        if topic.endswith("-ingested") and len(orjson.loads(value)["items"]) > 2:
            return MessageSizeTooLargeError("too large")
        return None

    producer = FakeProducer(fail)
    ing = _ingestor(tmp_path, producer)
    await ing.process({USAGE: [_record(i, _event(i)) for i in range(7)]})
    assert [i[1] for i in _pack_items(producer, ing.settings.ingested_topic)] == list(range(7))
    assert _sample(ing.metrics, "churnsignal_ingest_kafka_retries_total", operation="produce") == 0


async def test_a_stop_while_kafka_is_down_leaves_the_batch_uncommitted(tmp_path: Path) -> None:
    consumer = FakeConsumer()
    ing = _ingestor(tmp_path, FakeProducer(lambda *_: KafkaTimeoutError("down")), consumer)
    task = asyncio.create_task(ing.process({USAGE: [_record(0, _event(0))]}))
    await asyncio.sleep(0.3)
    await ing.stop()
    with pytest.raises(ingest._Stopping):
        await asyncio.wait_for(task, 5)
    assert consumer.commits == []


async def test_an_unreadable_batch_is_dead_lettered_per_offset_and_skipped(
        tmp_path: Path) -> None:
    producer = FakeProducer()
    ing = _ingestor(tmp_path, producer)
    mark = Unreadable(3, 6, "UnsupportedCodecError: Unknown compression codec 0x05")
    await ing.process({USAGE: [_record(2, _event(2)), _record(3, None, None, (mark,))]})
    dlq = producer.delivered(ing.settings.topics.dlq)
    assert [(dict(s[3])["dlq_offset"], s[1], s[2]) for s in dlq] == [
        (b"3", None, b""), (b"4", None, b""), (b"5", None, b"")]  # the key is not known
    headers = dict(dlq[0][3])
    assert headers["dlq_reason"] == b"unreadable_batch" and headers["dlq_step"] == b"ingest"
    assert b"offsets 3..5" in headers["dlq_detail"] and b"UnsupportedCodecError" in headers[
        "dlq_detail"]
    assert ing.consumer.commits == [{USAGE: 6}]  # type: ignore[union-attr]
    m = ing.metrics
    assert _sample(m, "churnsignal_ingest_unreadable_batches_total", topic=USAGE.topic) == 1
    assert _sample(m, "churnsignal_events_dead_lettered_total", topic=USAGE.topic,
                   reason="unreadable_batch", step="ingest") == 3
    assert _sample(m, "churnsignal_events_consumed_total", topic=USAGE.topic) == 4


async def test_an_unreadable_span_of_unknown_end_pauses_only_its_partition(
        tmp_path: Path) -> None:
    other = TopicPartition("usage.events", 1)
    producer = FakeProducer()
    ing = _ingestor(tmp_path, producer)
    mark = Unreadable(3, None, "CorruptRecordException: bad header")
    await ing.process({USAGE: [_record(2, _event(2)), _record(3, None, None, (mark,)),
                               _record(9, _event(9))],
                       other: [_record(0, _event(10))]})
    assert ing.consumer.paused() == {USAGE}  # type: ignore[union-attr]
    assert ing.consumer.commits == [{USAGE: 3, other: 1}]  # type: ignore[union-attr]
    assert [i[1] for i in _pack_items(producer, ing.settings.ingested_topic)] in ([2, 0], [0, 2])
    assert _sample(ing.metrics, "churnsignal_ingest_paused_partitions") == 1
    # partition 0 consumed offset 2 only (the rest waits behind the pause), partition 1 one
    assert _sample(ing.metrics, "churnsignal_events_consumed_total", topic=USAGE.topic) == 2
