"""The gateway's Kafka producer: acks=all, idempotent where the broker allows, every send
awaited to its acknowledgement within a bound, (re)connected in the background."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, UnknownError, UnsupportedVersionError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from churnsignal.gateway.batches import Full, PartitionBatches

log = logging.getLogger("churnsignal.gateway")


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge in time (or is not connected): answer 503."""


# Not frozen: one or more of these is made per message, and a frozen init costs 3x.
@dataclass(slots=True)
class Out:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]  # a list: aiokafka's batch builder takes no tuple


class CachedPartitioner(DefaultPartitioner):
    """aiokafka's default partitioner (murmur2, as the Java client: the same key, the same
    partition) with the hashes of recent keys kept: the gateway sees the same accounts again
    and again, and aiokafka's murmur2 is pure Python (~4 us a key). Bounded: 65,536 keys."""

    def __init__(self) -> None:
        self._hash = functools.lru_cache(maxsize=65_536)(murmur2)

    def __call__(self, key: bytes | None, all_partitions: list[int],
                 available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner.__call__(key, all_partitions, available))
        return all_partitions[(self._hash(key) & 0x7FFFFFFF) % len(all_partitions)]


class Producer:
    def __init__(self, options: dict[str, Any], *, idempotence: bool, timeout_s: float,
                 max_request_size: int) -> None:
        self.options = options
        self.idempotence = idempotence
        self.timeout_s = timeout_s
        self.max_request_size = max_request_size
        self.producer: AIOKafkaProducer | None = None
        self.partitioner = CachedPartitioner()
        self.batches: PartitionBatches | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _new(self, idempotent: bool) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            acks="all", enable_idempotence=idempotent, linger_ms=2,
            partitioner=self.partitioner,
            # records of concurrent requests share a partition's batch (gateway.batches)
            max_batch_size=min(self.max_request_size, 1 << 20),
            request_timeout_ms=int(self.timeout_s * 1000),
            max_request_size=self.max_request_size, **self.options)

    async def _connect(self) -> None:
        delay = 0.2
        while not self._closing:
            candidate = self._new(self.idempotence)
            try:
                await candidate.start()
            except (UnknownError, UnsupportedVersionError) as exc:
                await _quiet_stop(candidate)
                if not self.idempotence:
                    raise
                log.warning("the broker refused an idempotent producer (%s: InitProducerId "
                            "unsupported, e.g. Tansu 0.6): using acks=all without idempotence; "
                            "retried sends may write a record twice, which the worker "
                            "deduplicates by event id", type(exc).__name__)
                self.idempotence = False
                continue
            except (KafkaError, OSError) as exc:
                await _quiet_stop(candidate)
                log.warning("Kafka not reachable yet (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.producer = candidate
            self.batches = PartitionBatches(candidate)
            log.info("gateway producer connected (acks=all, idempotence=%s)", self.idempotence)
            return

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect())

    @property
    def connected(self) -> bool:
        return self.producer is not None

    async def send_all(self, records: Sequence[Out]) -> None:
        """Every record acknowledged by Kafka (acks=all), or KafkaUnavailable. Some may have
        been written when it raises: the sender retries, the worker deduplicates."""
        if not records:  # an empty batch: nothing to wait for
            return
        producer, batches = self.producer, self.batches
        if producer is None or batches is None:
            raise KafkaUnavailable("not connected to Kafka yet")

        async def run() -> None:
            # topic -> (all partitions, those with a leader): a key picks among all, as the
            # default partitioner does; a record without a key among those with a leader
            partitions: dict[str, tuple[list[int], list[int]]] = {}
            waits: set[asyncio.Future[None]] = set()
            touched: set[tuple[str, int]] = set()
            for r in records:
                known = partitions.get(r.topic)
                if known is None:
                    every = sorted(await producer.partitions_for(r.topic))
                    led = producer.client.cluster.available_partitions_for_topic(r.topic)
                    known = partitions[r.topic] = (every, sorted(led) if led else every)
                partition = self.partitioner(r.key, *known)
                first = (r.topic, partition) not in touched
                touched.add((r.topic, partition))
                try:
                    waits.add(batches.add(r.topic, partition, r.key, r.value, r.headers,
                                          first=first))
                except Full as full:
                    raise KafkaUnavailable(f"Kafka is not keeping up ({full})") from None
            await asyncio.wait(waits)  # (a timeout cancels this wait, never the batches)
            for done in waits:
                if (exc := done.exception()) is not None:
                    raise KafkaUnavailable(f"Kafka refused the write ({type(exc).__name__})")

        try:
            await asyncio.wait_for(run(), timeout=self.timeout_s)
        except TimeoutError:
            raise KafkaUnavailable(f"Kafka did not acknowledge within {self.timeout_s:g}s") \
                from None
        except KafkaError as exc:
            raise KafkaUnavailable(f"Kafka refused the write ({type(exc).__name__})") from None

    async def topics_present(self, topics: Sequence[str]) -> tuple[bool, str]:
        producer = self.producer
        if producer is None:
            return False, "not connected to Kafka"
        try:
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout=3.0)
        except (TimeoutError, KafkaError, OSError) as exc:
            return False, f"Kafka metadata unavailable ({type(exc).__name__})"
        missing = sorted(set(topics) - set(cluster.topics()))
        if missing:
            return False, f"missing topics: {', '.join(missing)}"
        return True, "ok"

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.batches is not None:
            await self.batches.close()
        if self.producer is not None:
            await _quiet_stop(self.producer)
            self.producer = None


async def _quiet_stop(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), timeout=10)
