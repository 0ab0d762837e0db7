"""The account-state changelog: a compacted topic, one record per account per checkpoint.

The worker writes it at each flush (one batch per partition) and reads a partition back when
the partition is assigned to it: no standby copies and no Faust table recovery, whose
rebalance handling left a survivor waiting forever on partitions it had taken over. A
partition is read to its end as seen after the assignment (``kafka_client.read_to_end``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

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
