"""Writing state checkpoints and other records as whole aiokafka batches.

Faust's own table writes went through its producer buffer one record at a time, a future per
record; at thousands of accounts per flush that dominated the worker. Here each partition's
records go out as full batches: one future per batch.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from churnsignal.stream import outbox, packs


async def send_batches(aio: Any, topic: str, partition: int,
                       records: list[tuple[bytes, bytes | None]]) -> list[Any]:
    """Produce records to one partition as whole batches (``aio``: an aiokafka producer);
    returns the batches' delivery futures."""
    futures = []
    batch = aio.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
            futures.append(await aio.send_batch(batch, topic, partition=partition))
            batch = aio.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    if batch.record_count():
        futures.append(await aio.send_batch(batch, topic, partition=partition))
    return futures


async def write_states(aio: Any, topic: str, partitions: int,
                       values: dict[bytes, bytes | None]) -> None:
    """Store states (None: a tombstone) in the partition each key's pack uses (an outbox
    record: the partition its key names), and wait for the broker's acknowledgement of
    every batch."""
    by_partition: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    for key, value in values.items():
        partition = outbox.partition_of(key, value)
        if partition is None:
            partition = packs.partition_for(key.decode(), partitions)
        by_partition[partition].append((key, value))
    futures = []
    for partition, records in by_partition.items():
        futures += await send_batches(aio, topic, partition, records)
    if futures:
        await asyncio.gather(*futures)
