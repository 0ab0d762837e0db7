"""Records of concurrent requests gathered into one open batch per partition.

aiokafka's ``send()`` costs a coroutine, a future and the accumulator's bookkeeping per record:
under load that was as much CPU as everything else the gateway does with a message. Here a
record costs one append to aiokafka's batch builder (C); each partition's batches are handed
to the producer (``send_batch``) in order by one task, and every request waits for the
batches holding its records. A batch that is still open when its partition's previous batch
is in flight takes the records of every request arriving meanwhile, as the producer's own
accumulator does, so one round trip to the broker still carries many requests.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Protocol


class BatchProducer(Protocol):
    def create_batch(self) -> Any: ...

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any: ...


class _Open:
    __slots__ = ("builder", "done")

    def __init__(self, builder: Any, done: asyncio.Future[None]) -> None:
        self.builder = builder
        self.done = done


class PartitionBatches:
    def __init__(self, producer: BatchProducer) -> None:
        self.producer = producer
        self._queues: dict[tuple[str, int], collections.deque[_Open]] = {}
        self._shippers: dict[tuple[str, int], asyncio.Task[None]] = {}

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: Any) -> asyncio.Future[None]:
        """Append one record; the future is done when Kafka acknowledged its batch (or
        failed with the producer's error)."""
        tp = (topic, partition)
        queue = self._queues.get(tp)
        if queue is None:
            queue = self._queues[tp] = collections.deque()
        if not queue or queue[-1].builder.append(key=key, value=value, timestamp=None,
                                                 headers=headers) is None:
            # none open, or the open one is full (closed by the failed append)
            batch = _Open(self.producer.create_batch(),
                          asyncio.get_running_loop().create_future())
            batch.done.add_done_callback(_retrieve)
            batch.builder.append(key=key, value=value, timestamp=None, headers=headers)
            queue.append(batch)
        if tp not in self._shippers:
            self._shippers[tp] = asyncio.get_running_loop().create_task(self._ship(tp))
        return queue[-1].done

    async def _ship(self, tp: tuple[str, int]) -> None:
        queue = self._queues[tp]
        try:
            while queue:
                batch = queue[0]
                # From here on nothing more is appended to it: it leaves the queue before
                # the (possibly long) wait for the partition's previous batch to drain.
                queue.popleft()
                batch.builder.close()
                try:
                    sent = await self.producer.send_batch(batch.builder, tp[0],
                                                          partition=tp[1])
                except Exception as exc:  # noqa: BLE001 - every waiter learns it
                    if not batch.done.done():
                        batch.done.set_exception(exc)
                    continue
                sent.add_done_callback(lambda result, done=batch.done: _settle(done, result))
        finally:
            del self._shippers[tp]
            if not queue:
                del self._queues[tp]

    async def close(self) -> None:
        for task in list(self._shippers.values()):
            task.cancel()
        for queue in self._queues.values():
            for batch in queue:
                if not batch.done.done():
                    batch.done.set_exception(ConnectionError("producer closed"))
        self._queues.clear()


def _settle(done: asyncio.Future[None], result: asyncio.Future[Any]) -> None:
    if done.done():
        return
    if result.cancelled():
        done.set_exception(ConnectionError("the batch's send was cancelled"))
    elif (exc := result.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(None)


def _retrieve(done: asyncio.Future[None]) -> None:
    """A batch whose every request gave up (timed out) fails unseen: not an unhandled error."""
    if not done.cancelled():
        done.exception()
