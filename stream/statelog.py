"""The account-state changelog: a compacted topic, one record per account per checkpoint.

The worker writes it at each flush (one batch per partition) and reads a partition back when
the partition is assigned to it: no standby copies and no Faust table recovery, whose
rebalance handling left a survivor waiting forever on partitions it had taken over. A
partition is read to its end as seen after the assignment (``kafka_client.read_to_end``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from churnsignal.app.settings import Settings

log = logging.getLogger(__name__)

Records = dict[bytes, bytes]


async def read_partitions(settings: Settings, partitions: Iterable[int],
                          idle_ms: int = 300) -> dict[int, Records]:
    """Every key's newest value in these changelog partitions (deletes applied)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from churnsignal.app.kafka_client import connection_options, read_to_end

    topic = settings.state_topic
    tps = [TopicPartition(topic, p) for p in sorted(set(partitions))]
    out: dict[int, Records] = {tp.partition: {} for tp in tps}
    if not tps:
        return out
    consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=8 * 1024 * 1024,
                                fetch_max_bytes=32 * 1024 * 1024,
                                **connection_options(settings))
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        async for tp, records in read_to_end(consumer, ends, idle_ms=idle_ms):
            data = out[tp.partition]
            for rec in records:
                if rec.value is None:
                    data.pop(rec.key, None)
                else:
                    data[rec.key] = rec.value
        return out
    finally:
        await consumer.stop()


class PartitionLoads:
    """Which state partitions this worker holds, loading, or not at all.

    The agent waits on ``ready(partition)`` before folding a pack: a partition's states must
    be fully read back before any event is applied to them.
    """

    def __init__(self) -> None:
        self.loaded: set[int] = set()
        self.assigned: set[int] = set()
        self.generation = -1
        self._changed = asyncio.Condition()
        self.task: asyncio.Task[Any] | None = None

    def plan(self, assigned: set[int], generation: int) -> tuple[set[int], set[int]]:
        """(to drop, to load) for a new assignment. Partitions kept across consecutive
        generations stay loaded: nobody else wrote them in between. After a gap (a missed
        generation) everything is read again."""
        if generation != self.generation + 1:
            keep: set[int] = set()
        else:
            keep = self.loaded & assigned
        drop = (self.loaded | self.assigned) - keep
        self.assigned = set(assigned)
        self.loaded = keep
        self.generation = generation
        return drop, assigned - keep

    async def mark_loaded(self, partitions: set[int]) -> None:
        async with self._changed:
            self.loaded |= partitions & self.assigned
            self._changed.notify_all()

    async def touch(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def ready(self, partition: int, owned: Callable[[int], bool]) -> bool:
        """True once the partition is loaded; False if the consumer no longer owns it.

        ``owned`` asks the consumer itself: a pack may arrive before the assignment
        callback has planned its partition's load, and must then wait, not be skipped
        (an owned pack left unacked would hold back every later commit)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: partition in self.loaded or not owned(partition))
            return partition in self.loaded

    def all_loaded(self) -> bool:
        return self.assigned <= self.loaded
