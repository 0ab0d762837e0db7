"""The gateway's shared per-partition batches (churnsignal/gateway/batches.py): concurrent
requests share a partition's open batch, batches reach the producer in order, one at a time per
partition, and every request learns its batches' fate. The producer here is aiokafka's own
batch builder with the broker's side played by the test (the real broker runs in
tests/integration/test_gateway*.py, outages included)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from churnsignal.gateway.batches import MAX_QUEUED, Full, PartitionBatches


class Broker:
    """create_batch/send_batch as AIOKafkaProducer has them; acks when the test says so."""

    def __init__(self, batch_size: int = 16_384, fail: BaseException | None = None) -> None:
        self.batch_size = batch_size
        self.fail = fail
        self.sent: list[tuple[str, int, list[bytes]]] = []
        self.acks: list[asyncio.Future[Any]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        records = DefaultRecordBatch(bytes(batch._build()))  # noqa: SLF001 - the wire bytes
        self.sent.append((topic, partition, [r.value for r in records]))
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


async def test_requests_share_open_batches_in_order_and_wait_for_their_acks() -> None:
    broker = Broker()
    batches = PartitionBatches(broker)
    first = [batches.add("usage", 0, b"k", b"a%d" % i, [("source", b"segment")])
             for i in range(3)]
    second = [batches.add("usage", 0, b"k", b"b%d" % i, []) for i in range(2)]
    other = batches.add("usage", 1, None, b"c0", [])
    assert len({*first, *second}) == 1  # one open batch for partition 0, both requests
    await asyncio.sleep(0.01)
    # while partition 0's batch is in flight, a third request opens the next one
    third = batches.add("usage", 0, b"k", b"d0", [])
    await asyncio.sleep(0.01)
    assert [s[2] for s in broker.sent if s[1] == 0] == [
        [b"a0", b"a1", b"a2", b"b0", b"b1"], [b"d0"]]
    assert [s[2] for s in broker.sent if s[1] == 1] == [[b"c0"]]
    assert not first[0].done() and not third.done()
    for ack in broker.acks:
        ack.set_result(None)
    await asyncio.wait_for(asyncio.gather(first[0], other, third), 1)


async def test_a_full_batch_is_closed_and_the_next_one_opened() -> None:
    broker = Broker(batch_size=1_000)
    batches = PartitionBatches(broker)
    waits = {batches.add("usage", 0, None, bytes(300), [], first=i == 0) for i in range(10)}
    assert len(waits) > 1
    await asyncio.sleep(0.05)
    assert sum(len(s[2]) for s in broker.sent) == 10
    for ack in broker.acks:
        ack.set_result(None)
    await asyncio.wait_for(asyncio.gather(*waits), 1)


async def test_every_waiter_learns_a_failure() -> None:
    batches = PartitionBatches(Broker(fail=KafkaTimeoutError()))
    waits = [batches.add("usage", 0, None, b"x", []) for _ in range(3)]
    done, _ = await asyncio.wait(waits, timeout=1)
    assert done == set(waits)  # one batch, one future for all three
    assert all(isinstance(w.exception(), KafkaTimeoutError) for w in waits)
    # a failed ack after a successful hand-over too
    broker = Broker()
    batches = PartitionBatches(broker)
    wait = batches.add("usage", 0, None, b"y", [])
    await asyncio.sleep(0.01)
    broker.acks[0].set_exception(KafkaTimeoutError())
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(wait, 1)


class Stalled(Broker):
    """A broker that takes no batch until released: Kafka not draining."""

    def __init__(self) -> None:
        super().__init__(batch_size=1_000)
        self.release = asyncio.Event()

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        await self.release.wait()
        return await super().send_batch(batch, topic, partition=partition)


async def test_a_stalled_partition_holds_a_bounded_number_of_batches() -> None:
    broker = Stalled()
    batches = PartitionBatches(broker)
    accepted = 0
    with pytest.raises(Full):
        for _ in range(10_000):  # requests of one record each
            batches.add("usage", 0, None, bytes(300), [])
            accepted += 1
            await asyncio.sleep(0)
    # one batch in the hand-over, MAX_QUEUED waiting: three of about three records each
    assert accepted <= (MAX_QUEUED + 1) * 3
    # a request admitted is appended whole, however many batches it fills
    whole = {batches.add("usage", 2, None, bytes(300), [], first=i == 0) for i in range(30)}
    assert len(whole) >= 10
    batches.add("usage", 1, None, b"x", [])  # another partition is not held up
    broker.release.set()
    await asyncio.sleep(0.05)
    assert sum(len(s[2]) for s in broker.sent if s[1] == 0) == accepted
    await batches.close()


async def test_a_failed_hand_over_fails_the_batches_behind_it() -> None:
    class FailsFirst(Broker):
        calls = 0

        async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
            self.calls += 1
            if self.calls == 1:
                await asyncio.sleep(0.01)
                raise KafkaTimeoutError()
            return await super().send_batch(batch, topic, partition=partition)

    broker = FailsFirst(batch_size=1_000)
    batches = PartitionBatches(broker)
    first = batches.add("usage", 0, b"k", bytes(300), [])
    await asyncio.sleep(0)  # handed over (and failing); the next ones queue behind it
    later = {batches.add("usage", 0, b"k", bytes(300), [], first=i == 0) for i in range(5)}
    await asyncio.wait({first, *later}, timeout=1)
    assert isinstance(first.exception(), KafkaTimeoutError)
    assert all(isinstance(w.exception(), KafkaTimeoutError) for w in later)
    assert broker.sent == []  # nothing after the failed batch was written before it
    # afterwards the partition works again
    again = batches.add("usage", 0, b"k", b"y", [])
    await asyncio.sleep(0.01)
    broker.acks[-1].set_result(None)
    await asyncio.wait_for(again, 1)


async def test_close_fails_what_was_not_handed_over() -> None:
    broker = Stalled()
    batches = PartitionBatches(broker)
    handing = batches.add("usage", 0, None, bytes(600), [])
    await asyncio.sleep(0)
    queued = batches.add("usage", 0, None, bytes(600), [])
    await batches.close()
    assert isinstance(handing.exception(), ConnectionError)
    assert isinstance(queued.exception(), ConnectionError)
    with pytest.raises(Full):
        batches.add("usage", 0, None, b"z", [])
