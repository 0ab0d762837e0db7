"""A Kafka topic range as history: ``kafka:TOPIC[,TOPIC...][?from=DATE][&to=DATE]``.

Reads every partition of the topics from the first record at or after ``from`` (record
timestamp; default: the oldest retained) up to the end offsets seen when reading starts, or
the first record at or after ``to`` (exclusive). No consumer group is used and no offset is
committed: a backtest never disturbs the workers. Brokers and credentials are the worker's
(``KAFKA_BOOTSTRAP_SERVERS``, ``CHURNSIGNAL_KAFKA__*``); topics pinned to a payload format
(``CHURNSIGNAL_INGEST__SOURCES``) are decoded as pinned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from churnsignal.app.settings import Settings
from churnsignal.offline.history import HistoryError
from churnsignal.schemas.decode import Source

PREFIX = "kafka:"


@dataclass(frozen=True)
class KafkaRange:
    topics: tuple[str, ...]
    start: float | None = None  # Unix seconds, inclusive
    end: float | None = None  # Unix seconds, exclusive

    @staticmethod
    def parse(value: str) -> KafkaRange:
        parts = urlsplit(value.removeprefix(PREFIX).removeprefix("//"))
        topics = tuple(t for t in parts.path.split(",") if t)
        if not topics:
            raise HistoryError(f"{value!r}: expected kafka:TOPIC[,TOPIC...][?from=DATE&to=DATE]")
        # Not parse_qs: it reads "+" as a space, and "+01:00" is a time zone here.
        query = dict(p.partition("=")[::2] for p in parts.query.split("&") if p)
        query = {k: unquote(v) for k, v in query.items()}
        unknown = set(query) - {"from", "to"}
        if unknown:
            raise HistoryError(f"{value!r}: unknown option(s) {sorted(unknown)}; "
                               "use from= and to= (dates or ISO times, UTC if no zone)")
        start, end = (_moment(query[k]) if k in query else None for k in ("from", "to"))
        if start is not None and end is not None and end <= start:
            raise HistoryError(f"{value!r}: 'to' must come after 'from'")
        return KafkaRange(topics, start, end)


def is_kafka(value: str) -> bool:
    return value.startswith(PREFIX)


def _moment(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise HistoryError(f"expected a date or ISO time like 2025-06-01, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def read_range(spec: KafkaRange, settings: Settings,
               on_record: Callable[[bytes, Source], None],
               progress: Callable[[int], None] | None = None) -> int:
    """Hand every record's value in the range to ``on_record(value, pinned_format)``."""
    if not settings.kafka_bootstrap_servers:
        raise HistoryError("a Kafka topic range needs KAFKA_BOOTSTRAP_SERVERS")
    return asyncio.run(_read(spec, settings, on_record, progress))


async def _read(spec: KafkaRange, settings: Settings, on_record: Callable[[bytes, Source], None],
                progress: Callable[[int], None] | None) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from churnsignal.app.kafka_client import connection_options, read_to_end

    consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None,
                                max_partition_fetch_bytes=4 * 1024 * 1024,
                                **connection_options(settings))
    try:
        await asyncio.wait_for(consumer.start(), timeout=settings.kafka.connect_timeout_s)
    except Exception as exc:  # unreachable, refused, bad credentials: one clear line
        await consumer.stop()
        raise HistoryError(f"Kafka at {settings.kafka_bootstrap_servers}: {exc!r}") from None
    try:
        tps = [TopicPartition(topic, p) for topic, ids in
               (await _partitions(settings, spec.topics)).items() for p in ids]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        if spec.end is not None:
            found = await consumer.offsets_for_times({tp: int(spec.end * 1000) for tp in tps})
            ends = {tp: found[tp].offset if found[tp] is not None else ends[tp] for tp in tps}
        starts = await consumer.beginning_offsets(tps)
        if spec.start is not None:
            found = await consumer.offsets_for_times({tp: int(spec.start * 1000) for tp in tps})
            starts = {tp: found[tp].offset if found[tp] is not None else ends[tp] for tp in tps}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        pinned = {t: settings.ingest.sources.get(t, "auto") for t in spec.topics}
        low = None if spec.start is None else spec.start * 1000
        # Without ``to``, the range ends where reading began, also by timestamp: a live
        # topic goes on growing, and some brokers (Tansu 0.6) report an end offset short
        # of the last batch's tail, so the end offsets alone are not the end.
        high = spec.end * 1000 if spec.end is not None else time.time() * 1000
        todo = set(tps)
        read = 0
        async for tp, records in read_to_end(consumer, ends, todo=todo, idle_ms=500,
                                             max_records=10_000):
            if tp not in todo:
                continue  # already past the range
            for rec in records:
                # Offsets found by time are a bound; timestamps need not be monotonic.
                if rec.offset >= ends[tp] and rec.timestamp >= high:
                    todo.discard(tp)  # past the range
                    break
                if rec.value is not None and (low is None or rec.timestamp >= low) and \
                        rec.timestamp < high:
                    on_record(rec.value, pinned[tp.topic])
                    read += 1
            if progress is not None:
                progress(read)
        return read
    finally:
        await consumer.stop()


async def _partitions(settings: Settings, topics: tuple[str, ...]) -> dict[str, list[int]]:
    """Each topic's partition ids, from the cluster's metadata."""
    from aiokafka.admin import AIOKafkaAdminClient

    from churnsignal.app.kafka_client import connection_options

    admin = AIOKafkaAdminClient(**connection_options(settings))
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics(list(topics))}
    finally:
        await admin.close()
    out = {}
    for topic in topics:
        found = described.get(topic)
        if found is None or found["error_code"] or not found["partitions"]:
            raise HistoryError(f"Kafka topic {topic!r} does not exist")
        out[topic] = sorted(p["partition"] for p in found["partitions"])
    return out
