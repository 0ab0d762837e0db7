"""Folding while a flush writes (stream.checkpoint, stream.store), without Kafka.

A flush takes its rows, packs and states at once and then waits on ClickHouse and Kafka; the
agent goes on folding meanwhile. These tests hold a flush inside a step and fold under it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from churnsignal.stream import packs
from churnsignal.stream.checkpoint import ALERT_FLUSH_S, Checkpoint, Pending
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.fold import fold_step
from churnsignal.stream.state import AccountState
from churnsignal.stream.store import MemoryStateStore
from tests.unit.test_fold import POLICY, Recorder, pack, poisoned, usage


class Held(Recorder):
    """Outputs whose one step waits until released, as a slow ClickHouse or broker would."""

    def __init__(self, hold: str) -> None:
        super().__init__()
        self.hold = hold
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def _wait(self, name: str) -> None:
        if name == self.hold:
            self.entered.set()
            await self.release.wait()

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
        await self._wait("rows")
        return await super().write_rows(rows)

    async def write_states(self, values: dict[bytes, bytes | None]) -> None:
        await self._wait("states")
        await super().write_states(values)


def fold(store: MemoryStateStore, checkpoint: Checkpoint, n: int, age_days: float,
         name: str, account: str = "acme") -> Any:
    result = fold_step(store, pack([["usage.events/0", n, usage(n, age_days, account)]]), 0, n,
                       POLICY, PartitionClock())
    checkpoint.add(result, [name], 0)
    return result


def seq_of(raw: bytes | None) -> int:
    assert raw is not None
    return AccountState.from_bytes(raw).seq


def held_checkpoint(hold: str) -> tuple[MemoryStateStore, Held, list[Any], Checkpoint]:
    """A store, outputs holding ``hold``, the packs acked so far, and their checkpoint."""
    store = MemoryStateStore(4)
    out = Held(hold)
    acked: list[Any] = []

    async def ack(events: list[Any]) -> None:
        acked.extend(events)

    return store, out, acked, Checkpoint(store, out, "ingested", 4, ack)


def test_a_fold_during_a_flush_belongs_to_the_next_one() -> None:
    async def run() -> None:
        store, out, acked, checkpoint = held_checkpoint("rows")
        fold(store, checkpoint, 1, 2, "pack-1")
        flushing = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()
        # The flush is writing rows; the agent folds on (no lock held by a regular flush).
        assert not checkpoint.lock.locked()
        fold(store, checkpoint, 2, 1, "pack-2")
        fold(store, checkpoint, 3, 1, "pack-3", "globex")
        out.release.set()
        assert await flushing == 1
        # The states stored are those the acked pack left, not what was folded since.
        assert acked == ["pack-1"] and set(out.states) == {b"acme"}
        assert seq_of(out.states[b"acme"]) == 1
        assert store.dirty == {"acme", "globex"}
        assert await checkpoint.flush() == 2
        assert acked == ["pack-1", "pack-2", "pack-3"]
        assert seq_of(out.states[b"acme"]) == 2 and seq_of(out.states[b"globex"]) == 1
        assert not store.dirty and not store.inflight

    asyncio.run(run())


@pytest.mark.interpreted_only
def test_a_fold_undone_during_a_flush_goes_back_to_what_that_flush_stores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        store, out, acked, checkpoint = held_checkpoint("states")
        fold(store, checkpoint, 1, 3, "pack-1")
        fold(store, checkpoint, 2, 2, "pack-2")
        flushing = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()
        # The working copy is clean now (taken by the flush): a failed fold drops it, and
        # the state read next is the one being stored, not the older stored bytes (none).
        poisoned(monkeypatch, "e3")
        result = fold(store, checkpoint, 3, 1, "pack-3")
        assert len(result.failures) == 1
        state = store.get("acme")
        assert state is not None and state.seq == 2
        # The state topic refuses the write: the states are written again by the next flush.
        out.fail = "states"
        out.release.set()
        with pytest.raises(ConnectionError):
            await flushing
        assert acked == [] and "acme" in store.dirty and not store.inflight
        out.fail = None
        assert await checkpoint.flush() == 3
        assert acked == ["pack-1", "pack-2", "pack-3"] and seq_of(out.states[b"acme"]) == 2

    asyncio.run(run())


@pytest.mark.interpreted_only
def test_a_state_whose_working_copy_was_dropped_is_written_again_after_a_failed_flush(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        store, out, _, checkpoint = held_checkpoint("states")
        fold(store, checkpoint, 1, 2, "pack-1")
        flushing = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()
        poisoned(monkeypatch, "e2")
        fold(store, checkpoint, 2, 1, "pack-2")  # fails, drops the clean working copy
        assert "acme" not in store.cache
        out.fail = "states"
        out.release.set()
        with pytest.raises(ConnectionError):
            await flushing
        # Nothing else holds those bytes: the store takes them back as a changed state.
        assert "acme" in store.dirty and store.get("acme") is not None
        out.fail = None
        await checkpoint.flush()
        assert seq_of(out.states[b"acme"]) == 1

    asyncio.run(run())


def test_a_waiting_alert_flushes_at_once_unless_a_flush_just_started() -> None:
    store = MemoryStateStore(4)
    checkpoint = Checkpoint(store, Recorder(), "ingested", 4, lambda events: asyncio.sleep(0))
    fold(store, checkpoint, 1, 0.01, "pack-1")
    assert not checkpoint.due(50_000, 60.0)  # rows wait for the interval...
    checkpoint.pending.alerts.append(object())  # type: ignore[arg-type]
    assert checkpoint.due(50_000, 60.0)  # ...an alert does not
    checkpoint.started = time.monotonic()
    assert not checkpoint.due(50_000, 60.0)  # a flush just started: at most this often
    checkpoint.started -= ALERT_FLUSH_S
    assert checkpoint.due(50_000, 60.0)


def test_an_account_forgotten_during_a_failed_flush_gets_none_of_its_rows_back() -> None:
    from tests.unit.test_forget import PARTITIONS, ForgetRecorder, forget_item, home

    class HeldForget(ForgetRecorder):
        def __init__(self) -> None:
            super().__init__()
            self.entered, self.release = asyncio.Event(), asyncio.Event()
            self.first = True

        async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
            if self.first:  # the first flush is held, then ClickHouse fails
                self.first = False
                self.entered.set()
                await self.release.wait()
                raise ConnectionError("ClickHouse unavailable")
            return await super().write_rows(rows)

    async def run() -> None:
        p = home("acme")
        store = MemoryStateStore(PARTITIONS)
        out = HeldForget()

        async def ack(events: list[Any]) -> None:
            pass

        checkpoint = Checkpoint(store, out, "ingested", PARTITIONS, ack)
        checkpoint.add(fold_step(store, pack([["u/0", 1, usage(1, 1)]]), p, 1, POLICY,
                                 PartitionClock()), ["pack-1"], p)
        flushing = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()  # acme's rows are taken
        checkpoint.add(fold_step(store, pack([forget_item("account", "acme", "states")]), p,
                                 2, POLICY, PartitionClock()), ["pack-2"], p)
        out.release.set()
        with pytest.raises(ConnectionError):
            await flushing
        first = len(out.calls)
        await checkpoint.flush()
        second = out.calls[first:]
        assert second[0] == "delete" and "rows" in second  # deleted first, then...
        written = [row for rows in out.rows for table in rows.values() for row in table]
        assert not [row for row in written if "acme" in row[:2]]  # ...nothing of before

    asyncio.run(run())


@pytest.mark.interpreted_only
def test_an_identity_expired_by_a_failed_flush_stays_expired() -> None:
    from churnsignal.stream import fold as fold_module
    from churnsignal.stream import packs
    from churnsignal.stream.fold import IdentityLimits
    from tests.unit.test_fold import NOW

    async def run() -> None:
        key = "~segment:user:u9"
        part = packs.partition_for(key, 4)
        store, out = MemoryStateStore(4), Held("rows")
        out.release.set()  # not held until the tick's flush

        async def ack(events: list[Any]) -> None:
            pass

        checkpoint = Checkpoint(store, out, "ingested", 4, ack)
        limits = IdentityLimits(ttl_s=3600)
        checkpoint.add(fold_step(store, pack([["usage.events/2", 5, usage(5, 0.1, key)]]), part,
                                 1, POLICY, PartitionClock(), limits), ["pack-1"], part)
        await checkpoint.flush()  # stored: the identity, its event waiting
        checkpoint.add(fold_step(store, packs.decode(packs.encode_tick(NOW + 7200)), part, 2,
                                 POLICY, PartitionClock(), limits), ["tick-2"], part)
        out.release.clear()
        out.entered.clear()
        flushing = asyncio.ensure_future(checkpoint.flush())  # takes the expiry: a tombstone
        await out.entered.wait()
        real = fold_module.resolve

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise ValueError("bad event")

        fold_module.resolve = broken  # a fold of the identity fails: its copy is dropped
        try:
            fold_step(store, pack([["usage.events/2", 9, usage(9, 0.01, key)]]), part, 3,
                      POLICY, PartitionClock(), limits)
        finally:
            fold_module.resolve = real
        out.fail = "rows"
        out.release.set()
        with pytest.raises(ConnectionError):
            await flushing
        # Not read back from the older stored bytes: its event expired (and was dead-lettered).
        assert not store.may_wait(key) and store.identity(key).parked == []

    asyncio.run(run())


def test_a_flush_that_fails_after_a_revoke_puts_nothing_back() -> None:
    async def run() -> None:
        store, out, _, checkpoint = held_checkpoint("rows")
        fold(store, checkpoint, 1, 1, "pack-1")
        flushing = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()
        # The revoke's drain gave up waiting for it: the states are forgotten.
        checkpoint.revoked()
        checkpoint.pending.take()
        store.forget()
        out.fail = "rows"
        out.release.set()
        with pytest.raises(ConnectionError):
            await flushing
        assert not checkpoint.pending.has_work() and not store.dirty and not store.cache

    asyncio.run(run())


def test_dead_letters_without_a_pack_are_flushed() -> None:
    from churnsignal.stream.fold import Failure, StepResult

    store = MemoryStateStore(4)
    out = Recorder()
    checkpoint = Checkpoint(store, out, "ingested", 4, lambda events: asyncio.sleep(0))
    result = StepResult()  # as a tick's first slice may be: its sweep's letters, no rows
    result.failures.append(Failure("processing_error", "x", "usage.events/0", 1, {}))
    checkpoint.add(result, [], 0)
    assert checkpoint.due(50_000, 0.0)
    asyncio.run(checkpoint.flush())
    assert "dlq" in out.calls and not checkpoint.pending.has_work()


def test_a_fold_waiting_while_a_revoke_drains_is_left_out() -> None:
    """The drain holds the lock around its flush and the store is reset right after it,
    before the waiting fold runs: the fold must see the revoke (its packs are redelivered),
    or it would build states of a partition that may be another worker's now."""
    async def run() -> None:
        store = MemoryStateStore(4)
        checkpoint = Checkpoint(store, Recorder(), "ingested", 4,
                                lambda events: asyncio.sleep(0))
        seen: list[bool] = []

        async def agent(epoch: int) -> None:
            async with checkpoint.folding(epoch) as current:
                seen.append(current)

        epoch = checkpoint.epoch
        async with checkpoint.lock:  # the drain's flush
            waiting = asyncio.ensure_future(agent(epoch))
            await asyncio.sleep(0)
        checkpoint.revoked()  # what flush_before_revoke does next, without an await
        store.forget()
        await waiting
        await agent(checkpoint.epoch)  # packs taken after the revoke fold as usual
        assert seen == [False, True]

    asyncio.run(run())


def test_dropping_a_partition_drops_its_changed_states_too() -> None:
    store = MemoryStateStore(4)
    for i in range(40):
        store.put(AccountState(f"acct-{i}"))
    store.delete("acct-0")
    home = {f"acct-{i}": packs.partition_for(f"acct-{i}", 4) for i in range(40)}
    store.drop_partitions({home["acct-0"], home["acct-1"]})
    kept = {k for k, p in home.items() if p not in (home["acct-0"], home["acct-1"])}
    assert kept and store.dirty == kept and set(store.cache) == kept
    assert set(store.take_dirty()) == {k.encode() for k in kept}  # no tombstone either


def test_packs_fetched_before_a_revoke_are_not_folded_after_it() -> None:
    """Faust may hand the agent a pack it fetched before a revoke in a batch after it. It
    is redelivered from the committed offset once the partition is assigned again; folded
    first, it would raise the account's offset high-water past the partition's earlier
    packs that the revoke left out, and those, redelivered, would count as duplicates."""
    from types import SimpleNamespace

    from churnsignal.stream.agents import fetched_in

    def pack_event(offset: int, generation: int) -> Any:
        return SimpleNamespace(message=SimpleNamespace(offset=offset, generation_id=generation,
                                                       partition=0))

    held, redelivered = pack_event(12, 7), [pack_event(11, 8), pack_event(12, 8)]
    group = [held, *redelivered]
    assert fetched_in(group, None) == []  # revoked, not assigned again yet: nothing
    assert fetched_in(group, 8) == redelivered  # the new generation's, in order
    assert fetched_in(group, 7) == [held]  # before the revoke, all of them fold

    # What folding the held pack first would do (the loss the filter prevents):
    store = MemoryStateStore(4)
    for offsets, n in (([6], 12), ([4, 5], 11)):
        fold_step(store, pack([["usage.events/0", o, usage(o, 1.0)] for o in offsets]), 0, n,
                  POLICY, PartitionClock())
    state = store.get("acme")
    assert state is not None and state.seq == 1  # events 4 and 5 taken for duplicates


def test_an_alert_only_flush_goes_out_while_the_flush_before_writes_clickhouse() -> None:
    async def run() -> None:
        store, out, acked, checkpoint = held_checkpoint("rows")
        fold(store, checkpoint, 1, 2, "pack-1")
        writing = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()  # pack-1's rows are being written
        fold(store, checkpoint, 2, 0.01, "pack-2")
        # Not held by the write: an alert-only flush stores and returns at once.
        assert await asyncio.wait_for(checkpoint.flush(write=False), 1.0) == 0
        assert out.states[b"acme"] is not None and seq_of(out.states[b"acme"]) == 2
        out.release.set()
        # pack-1 is not acked ahead of pack-2, which waits for its rows: both go together.
        assert await writing == 0 and acked == []
        assert await checkpoint.flush() == 2 and sorted(acked) == ["pack-1", "pack-2"]
        assert not checkpoint.pending.has_work()

    asyncio.run(run())


@pytest.mark.parametrize("since_flush", [{"b": {3}}, {f"n{i}": {i} for i in range(5)}])
def test_putting_back_what_a_flush_left_merges_the_touched_days_either_way(
        since_flush: dict[str, set[int]]) -> None:
    # An alert-only flush puts back every day the interval touched; folds meanwhile added
    # a few (or, after a long flush, more): the union and the count are the same either way.
    pending = Pending()
    pending._touch({"a": {1, 2}, "b": {1}, "c": {7}})
    taken = pending.take()
    pending._touch({k: set(v) for k, v in since_flush.items()})
    pending.restore(taken, keep_since=True)
    expected = {"a": {1, 2}, "b": {1}, "c": {7}}
    for account, days in since_flush.items():
        expected[account] = expected.get(account, set()) | days
    assert pending.touched == expected
    assert pending.count == sum(len(days) for days in expected.values())
