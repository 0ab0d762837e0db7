"""Records of concurrent requests gathered into one open batch per partition.

aiokafka's ``send()`` costs a coroutine, a future and the accumulator's bookkeeping per record:
under load that was as much CPU as everything else the gateway does with a message. Here a
record costs one append to aiokafka's batch builder (C); each partition's batches are handed
to the producer (``send_batch``) in order by one task, and every request waits for the
batches holding its records. The batch that is open while its partition's previous one is
being handed over takes the records of every request arriving meanwhile, so one round trip
to the broker still carries many requests.

Bounded: a request is refused at once (``Full``: answered 503) when a partition it writes to
already holds ``MAX_QUEUED`` batches waiting for their hand-over, so a stalled broker cannot
make the gateway hold more than a few batches (and the requests admitted before) per
partition. A failed hand-over fails every batch queued behind it in that
partition too: a later batch must not be written while an earlier one was not (a request's
records would land with a gap, out of order on retry).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Protocol

MAX_QUEUED = 2  # batches per partition waiting for the hand-over (each up to max_batch_size)


class Full(Exception):
    """The partition's queue is full: Kafka is not taking batches as fast as they come."""


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
        self._handing: dict[tuple[str, int], _Open] = {}  # being handed over, per partition
        self._closed = False

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes]], *, first: bool = True) -> asyncio.Future[None]:
        """Append one record; the future is done when Kafka acknowledged its batch (or
        failed with the producer's error). ``first``: the request's first record for this
        partition, which raises ``Full`` (nothing appended) when the partition already holds
        its share of waiting batches; a request admitted is appended whole, however many
        batches it fills, so that no request is too large ever to be taken."""
        if self._closed:
            raise Full("the producer is closing")
        tp = (topic, partition)
        queue = self._queues.get(tp)
        if queue is None:
            queue = self._queues[tp] = collections.deque()
        if first and len(queue) >= MAX_QUEUED:
            raise Full(f"{len(queue)} batches of {topic}/{partition} wait for Kafka")
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
                # Off the queue and closed before the (possibly long) wait for the
                # partition's previous batch to drain: nothing more is appended to it.
                batch = self._handing[tp] = queue.popleft()
                batch.builder.close()
                try:
                    sent = await self.producer.send_batch(batch.builder, tp[0],
                                                          partition=tp[1])
                except Exception as exc:  # noqa: BLE001 - every waiter learns it
                    _fail(batch.done, exc)
                    while queue:  # and nothing after it is written before it
                        _fail(queue.popleft().done, exc)
                    continue
                finally:
                    self._handing.pop(tp, None)
                sent.add_done_callback(lambda result, done=batch.done: _settle(done, result))
        finally:
            self._shippers.pop(tp, None)
            if not queue:
                self._queues.pop(tp, None)

    async def close(self) -> None:
        """Fail what was not handed over (its requests answer 503); stop the shippers."""
        self._closed = True
        closing = ConnectionError("the gateway's producer is closing")
        for batch in self._handing.values():
            _fail(batch.done, closing)
        for queue in self._queues.values():
            while queue:
                _fail(queue.popleft().done, closing)
        tasks = list(self._shippers.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _fail(done: asyncio.Future[None], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


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
