"""The state store: account and identity states of a worker's partitions (no I/O).

``StateStore`` is the interface the agent, the fold and the web views use; ``MemoryStateStore``
keeps each key's stored bytes (read back from the state topic when its partition is
assigned, see ``statelog``) and decoded working copies the fold changes. A later columnar
store can replace it behind the same interface.

A checkpoint (``stream.checkpoint``) takes the changed states (``take_dirty``) and, once the
state topic acknowledged them, hands them back as stored (``stored``); a failed write puts
them back (``unstored``). A fold that fails half way restores the working copy it started
from (``snapshot`` / ``restore``), so a record that cannot be folded leaves no trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from churnsignal.schemas.identity import PREFIX as IDENTITY_PREFIX
from churnsignal.stream import packs
from churnsignal.stream.identity import IdentityState, is_blank, is_waiting, waiting_bytes
from churnsignal.stream.state import AccountState


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
        self.stale = False  # read everything again at the next assignment

    def reload_all(self) -> None:
        """What is in memory is not the whole truth (an outbox not delivered): the next
        assignment reads every partition back, kept ones too."""
        self.stale = True

    def plan(self, assigned: set[int], generation: int) -> tuple[set[int], set[int]]:
        """(to drop, to load) for a new assignment. Partitions kept across consecutive
        generations stay loaded: nobody else wrote them in between. After a gap (a missed
        generation) everything is read again."""
        if generation != self.generation + 1 or self.stale:
            keep: set[int] = set()
            self.stale = False
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


State = AccountState | IdentityState
# What restore() needs: a copy of a working state changed since the last checkpoint, or
# None when the stored bytes are the state to go back to.
Snapshot = State | None


class StateStore(Protocol):
    """What the agent needs of a state store."""

    loads: PartitionLoads

    def get(self, account_id: str) -> AccountState | None: ...
    def peek(self, account_id: str) -> AccountState | None: ...
    def put(self, state: AccountState) -> None: ...
    def identity(self, key: str) -> IdentityState: ...
    def peek_identity(self, key: str) -> IdentityState | None: ...
    def put_identity(self, state: IdentityState) -> None: ...
    def may_wait(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def snapshot(self, key: str) -> Snapshot: ...
    def restore(self, key: str, snapshot: Snapshot) -> None: ...
    def keys_in(self, partition: int) -> list[str]: ...
    def load(self, records: dict[bytes, bytes]) -> None: ...
    def drop_partitions(self, partitions: set[int]) -> None: ...
    def take_dirty(self) -> dict[bytes, bytes | None]: ...
    def stored(self, values: dict[bytes, bytes | None]) -> None: ...
    def unstored(self, values: dict[bytes, bytes | None]) -> None: ...
    def forget(self) -> None: ...
    def account_sizes(self) -> list[int]: ...
    def __len__(self) -> int: ...


def _decode(key: str, raw: bytes) -> State:
    if key.startswith(IDENTITY_PREFIX):
        return IdentityState.from_bytes(raw)
    return AccountState.from_bytes(raw)


def _copy(state: State) -> State:
    if isinstance(state, AccountState):
        return state.clone()
    return IdentityState.from_bytes(state.to_bytes())


class MemoryStateStore:
    """States in process memory: stored bytes per key, and decoded working copies.

    Changed states are written once per key per checkpoint, not per pack, in the partition
    Kafka's default partitioner gives the key, as the packs use.
    """

    def __init__(self, partitions: int, max_cached: int = 200_000) -> None:
        self.partitions = partitions
        self.data: dict[bytes, bytes] = {}
        self.cache: dict[str, State] = {}
        self.dirty: set[str] = set()
        self.deleted: set[str] = set()  # tombstones to write at the next checkpoint
        # Deleted keys whose tombstone the state topic has not acknowledged yet: their
        # stored bytes stay (a rebalance before the ack makes them the truth again), but
        # nothing reads them (a forgotten account's next event starts afresh).
        self.gone: set[str] = set()
        # What the checkpoint in progress took (``take_dirty``) and the state topic has not
        # acknowledged yet: the stored truth for a fold that is undone meanwhile (folds go on
        # while a flush writes).
        self.inflight: dict[str, bytes | None] = {}
        self.max_cached = max_cached
        self.loads = PartitionLoads()

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, account_id: str) -> AccountState | None:
        state = self.cache.get(account_id)
        if state is None:
            raw = self._raw(account_id)
            if raw is not None:
                state = self.cache[account_id] = AccountState.from_bytes(raw)
        return state  # type: ignore[return-value]

    def peek(self, account_id: str) -> AccountState | None:
        """Read-only view for endpoints: never caches, so a read while a partition is
        loading cannot become the agent's working copy."""
        state = self.cache.get(account_id)
        if state is None:
            raw = self._raw(account_id)
            return AccountState.from_bytes(raw) if raw is not None else None
        return state if isinstance(state, AccountState) else None

    def put(self, state: AccountState) -> None:
        self.cache[state.account_id] = state
        self.dirty.add(state.account_id)
        self.deleted.discard(state.account_id)
        self.gone.discard(state.account_id)

    def identity(self, key: str) -> IdentityState:
        """An identity's state (same topic, keys starting with ``~``), new if unknown."""
        state = self.cache.get(key)
        if state is None:
            raw = self._raw(key)
            state = IdentityState.from_bytes(raw) if raw is not None else IdentityState(key)
            self.cache[key] = state
        return state  # type: ignore[return-value]

    def peek_identity(self, key: str) -> IdentityState | None:
        state = self.cache.get(key)
        if state is None:
            raw = self._raw(key)
            return IdentityState.from_bytes(raw) if raw is not None else None
        return state if isinstance(state, IdentityState) else None

    def put_identity(self, state: IdentityState) -> None:
        self.cache[state.key] = state
        self.dirty.add(state.key)
        self.deleted.discard(state.key)
        self.gone.discard(state.key)

    def may_wait(self, key: str) -> bool:
        """Whether an identity may have events waiting, without decoding a stored one."""
        state = self.cache.get(key)
        if state is not None:
            return isinstance(state, IdentityState) and is_waiting(state)
        raw = self._raw(key)
        return raw is not None and waiting_bytes(raw)

    def delete(self, key: str) -> None:
        """Forget a key: a tombstone on the state topic at the next checkpoint."""
        self.cache.pop(key, None)
        self.dirty.discard(key)
        self.deleted.add(key)
        self.gone.add(key)

    def _raw(self, key: str) -> bytes | None:
        """A key's stored bytes (or those a flush in progress is storing), unless it was
        deleted since."""
        if key in self.gone:
            return None
        if key in self.inflight:
            return self.inflight[key]
        return self.data.get(key.encode())

    def snapshot(self, key: str) -> Snapshot:
        """What ``restore`` needs to undo a fold of ``key``: a copy only when the working
        state differs from the stored bytes (changed since the last checkpoint)."""
        if key in self.dirty:
            return _copy(self.cache[key])
        return None

    def restore(self, key: str, snapshot: Snapshot) -> None:
        if snapshot is None:  # the stored bytes are the truth: drop the working copy
            self.cache.pop(key, None)
        else:
            self.cache[key] = snapshot

    def keys_in(self, partition: int) -> list[str]:
        """Accounts and identities of one partition."""
        keys = {k.decode() for k in self.data}
        keys.update(k for k, v in self.inflight.items() if v is not None)
        keys -= self.gone
        keys.update(self.cache)
        return [k for k in keys if packs.partition_for(k, self.partitions) == partition]

    def load(self, records: dict[bytes, bytes]) -> None:
        self.data.update(records)

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the states of partitions this worker no longer holds: stored and working
        copies alike (a changed state left here would be written by the next flush, over
        what the partition's new owner stores)."""
        if not partitions:
            return

        def gone(name: str) -> bool:
            return packs.partition_for(name, self.partitions) in partitions

        for key in [k for k in self.data if gone(k.decode())]:
            del self.data[key]
        for name in [k for k in self.inflight if gone(k)]:
            del self.inflight[name]
        for name in [k for k in self.cache if gone(k)]:
            del self.cache[name]
        self.dirty = {k for k in self.dirty if not gone(k)}
        self.deleted = {k for k in self.deleted if not gone(k)}
        self.gone = {k for k in self.gone if not gone(k)}

    def take_dirty(self) -> dict[bytes, bytes | None]:
        """Every changed state as bytes (None: a tombstone), and nothing dirty any more.

        Taken with the checkpoint's rows, before its first await: the agent keeps folding
        meanwhile, and those changes belong to the next checkpoint. Until ``stored`` or
        ``unstored``, these bytes are what undoing a fold goes back to."""
        values: dict[bytes, bytes | None] = {}
        for key in self.dirty:
            state = self.cache[key]
            if isinstance(state, IdentityState) and is_blank(state):
                values[key.encode()] = None  # an identity that expired: a tombstone
            else:
                # A copy: orjson's result keeps a 4 KiB buffer however small it is, and
                # stored states live as long as their partition (4 KB per key otherwise).
                values[key.encode()] = bytes(memoryview(state.to_bytes()))
        values.update(dict.fromkeys((key.encode() for key in self.deleted), None))
        self.dirty, self.deleted = set(), set()
        self.inflight = {key.decode(): value for key, value in values.items()}
        return values

    def stored(self, values: dict[bytes, bytes | None]) -> None:
        """The state topic acknowledged these: they are the stored truth now."""
        for key, value in values.items():
            self.inflight.pop(key.decode(), None)
            if value is None:
                self.data.pop(key, None)
                name = key.decode()
                self.gone.discard(name)
                cached = self.cache.get(name)
                if name not in self.dirty and isinstance(cached, IdentityState) and is_blank(
                        cached):
                    del self.cache[name]
            else:
                self.data[key] = value
        if len(self.cache) > self.max_cached:  # bounded memory: drop clean copies
            for name in list(self.cache)[: len(self.cache) - self.max_cached]:
                if name not in self.dirty:
                    del self.cache[name]

    def unstored(self, values: dict[bytes, bytes | None]) -> None:
        """A checkpoint failed: these are written again by the next one."""
        for raw, value in values.items():
            key = raw.decode()
            self.inflight.pop(key, None)
            if key in self.cache:
                self.dirty.add(key)
            elif value is None:
                if key not in self.dirty:
                    self.deleted.add(key)
                    # the older stored bytes are not the truth: it was deleted (or expired)
                    self.gone.add(key)
            elif key not in self.gone:  # a fold undone meanwhile dropped its working copy
                self.cache[key] = _decode(key, value)
                self.dirty.add(key)

    def account_sizes(self) -> list[int]:
        """The stored size in bytes of each account state (identity states not counted)."""
        prefix = IDENTITY_PREFIX.encode()
        return [len(v) for k, v in list(self.data.items()) if not k.startswith(prefix)]

    def forget(self) -> None:
        """After a rebalance the stored states are the truth again; unflushed changes are
        dropped (their packs were not acked, so the new owner applies them again)."""
        self.cache.clear()
        self.dirty.clear()
        self.deleted.clear()
        self.gone.clear()
        self.inflight = {}
