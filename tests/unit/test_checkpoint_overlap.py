"""Folding while a flush writes (stream.checkpoint, stream.store), without Kafka.

A flush takes its rows, packs and states at once and then waits on ClickHouse and Kafka; the
agent goes on folding meanwhile. These tests hold a flush inside a step and fold under it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from churnsignal.stream.checkpoint import ALERT_FLUSH_S, Checkpoint
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


def test_a_fold_during_a_flush_belongs_to_the_next_one() -> None:
    async def run() -> None:
        store = MemoryStateStore(4)
        out = Held("rows")
        acked: list[Any] = []

        async def ack(events: list[Any]) -> None:
            acked.extend(events)

        checkpoint = Checkpoint(store, out, "ingested", 4, ack)
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


def test_a_fold_undone_during_a_flush_goes_back_to_what_that_flush_stores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        store = MemoryStateStore(4)
        out = Held("states")
        acked: list[Any] = []

        async def ack(events: list[Any]) -> None:
            acked.extend(events)

        checkpoint = Checkpoint(store, out, "ingested", 4, ack)
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


def test_a_state_whose_working_copy_was_dropped_is_written_again_after_a_failed_flush(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        store = MemoryStateStore(4)
        out = Held("states")

        async def ack(events: list[Any]) -> None:
            pass

        checkpoint = Checkpoint(store, out, "ingested", 4, ack)
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
