"""The batched consumer: source topics -> decode, dead-letter, repartition by account -> packs.

Faust spends ~150 us of CPU per message before any agent code runs, so the high-volume
decode path does not go through it. This stage reads the source topics with aiokafka in large
batches, decodes each message once, and hands the Faust state agent one pack per internal
partition per batch. Order of one batch (a crash between two steps only repeats work):

1. decode every record; rejected ones are produced to the DLQ with the reason;
2. accepted events are grouped by account partition and produced as packs;
3. all produces are awaited (acks=all);
4. only then are the source offsets committed.

A crash after 3 and before 4 re-reads the batch and re-sends its packs; the state agent skips
them by (source partition, offset) high-water per account, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaError

from churnsignal.app.kafka_client import connection_options
from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Accepted, Rejected
from churnsignal.stream import deadletter, packs
from churnsignal.stream.identity import link_item

log = logging.getLogger(__name__)


class Ingestor:
    """Runs the batch loop until stopped; owned by the worker's lifecycle."""

    def __init__(self, settings: Settings, metrics: Metrics, options: DecodeOptions) -> None:
        self.settings = settings
        self.metrics = metrics
        self.options = options
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self.assigned = False
        self.batches = 0
        # Links already sent (identity -> target): most calls repeat a known one.
        self._links_sent: dict[str, str] = {}

    async def start(self) -> None:
        s = self.settings
        conn = connection_options(s)
        self.producer = AIOKafkaProducer(acks="all", linger_ms=5, max_request_size=4_000_000,
                                         **conn)
        self.consumer = AIOKafkaConsumer(
            *s.topics.sources(),
            group_id=s.ingest_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=s.kafka.fetch_max_wait_ms,
            fetch_max_bytes=16 * 1024 * 1024,
            session_timeout_ms=int(s.kafka.session_timeout_s * 1000),
            rebalance_timeout_ms=int(s.kafka.rebalance_timeout_s * 1000),
            heartbeat_interval_ms=min(3000, int(s.kafka.session_timeout_s * 1000 / 3)),
            **conn,
        )
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def run(self) -> None:
        assert self.consumer is not None
        wait_ms = int(self.settings.ingest.batch_max_wait_s * 1000)
        while not self._stopping.is_set():
            batch = await self.consumer.getmany(
                timeout_ms=wait_ms, max_records=self.settings.ingest.batch_max_events
            )
            self.assigned = bool(self.consumer.assignment())
            if batch:
                await self.process(batch)

    def _add_links(self, links: tuple[tuple[str, str], ...], source: str, offset: int,
                   by_partition: dict[int, list[list[Any]]]) -> None:
        """Route each new identity link to its identity's partition, in source order."""
        for key, target in links:
            if self._links_sent.get(key) == target:
                continue
            if len(self._links_sent) >= 200_000:  # bounded: forgetting only costs a resend
                self._links_sent.clear()
            self._links_sent[key] = target
            by_partition[packs.partition_for(key, self.settings.partitions)].append(
                [source, offset, link_item(key, target)])

    async def process(self, batch: dict[Any, list[Any]]) -> None:
        """Decode, dead-letter and repartition one batch; commit its offsets after the acks."""
        assert self.producer is not None and self.consumer is not None
        s, m = self.settings, self.metrics
        now = time.time()
        partitions = s.partitions
        by_partition: dict[int, list[list[Any]]] = defaultdict(list)
        pending = []
        # Counted per batch: a labelled metric lookup per event costs more than the decode.
        accepted: Counter[tuple[str, str]] = Counter()
        rejected: Counter[tuple[str, str]] = Counter()
        skipped: Counter[tuple[str, str]] = Counter()
        for tp, records in batch.items():
            source = f"{tp.topic}/{tp.partition}"
            pinned = s.ingest.sources.get(tp.topic, "auto")
            m.events_consumed.labels(topic=tp.topic).inc(len(records))
            for rec in records:
                result = decode(rec.value, self.options, now, pinned)
                if not isinstance(result, Rejected) and result.links:
                    self._add_links(result.links, source, rec.offset, by_partition)
                if isinstance(result, Accepted):
                    event = result.event
                    by_partition[packs.partition_for(event.account_id, partitions)].append(
                        [source, rec.offset, event.model_dump(mode="json", exclude_none=True)]
                    )
                    accepted[tp.topic, event.type] += 1
                elif isinstance(result, Rejected):
                    pending.append(await self.producer.send(
                        s.topics.dlq, value=rec.value, key=rec.key,
                        headers=deadletter.headers(result, tp.topic, tp.partition, rec.offset,
                                                   rec.timestamp),
                    ))
                    rejected[tp.topic, result.reason] += 1
                else:
                    skipped[tp.topic, result.reason] += 1
        for (topic, kind), n in accepted.items():
            m.events_accepted.labels(topic=topic, type=kind).inc(n)
        for (topic, reason), n in rejected.items():
            m.events_dead_lettered.labels(topic=topic, reason=reason).inc(n)
        for (topic, reason), n in skipped.items():
            m.events_skipped.labels(topic=topic, reason=reason).inc(n)
        for partition, items in by_partition.items():
            for chunk in packs.chunks(items):
                pending.append(await self.producer.send(
                    s.ingested_topic, value=packs.encode(now, chunk), partition=partition
                ))
        if pending:
            await asyncio.gather(*pending)
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Partitions moved to another worker mid-batch: it re-reads them, and the packs
            # sent here are skipped there by offset, so this is safe to drop.
            log.warning("offset commit after rebalance failed (safe, will re-read): %s", exc)
        self.batches += 1
        for tp in batch:
            high = self.consumer.highwater(tp)
            if high is not None:
                m.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, high - offsets[tp]))
