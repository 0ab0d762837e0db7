"""The checkpoint: what a flush makes durable, in which order, and why.

Folded packs leave rows, alerts, dead letters and identity forwards waiting here. A flush
(every ``sink.flush_interval_s``, at ``sink.batch_max_rows``, or soon after an alert):

0. deletes the ClickHouse rows of accounts forgotten (``churnsignal forget``), before any
   row of their new state is written;
1. sends the dead letters and the identity forwards, and awaits their acks (before the
   states that no longer hold those events);
2. writes the outbox (``stream.outbox``): the rows only an applied event makes (alerts,
   billing and support facts) and the alerts to publish; then stores the alerting accounts'
   states; awaiting the acks of each;
3. publishes the alerts, then stores every other changed state once (and tombstones) with
   the deletion of the alerts' outbox records, and awaits the acks;
4. writes the rows, one insert per table (rows a table refuses go to the DLQ), then
   deletes their outbox records;
4b. audits and confirms the forget requests carried out (the command waits for that);
5. acks the packs, so Faust commits their offsets.

Alerts do not wait for ClickHouse (and go out while it is down). A flush brought forward only
by alerts (``flush(write=False)``) stops after 3: its rows and packs wait for the next
interval flush, so ClickHouse gets one insert per table and interval. A crash before 2
redelivers the packs, which fold again on the stored states: the same rows and the same
alerts (deterministic ``alert_id``). After 2, the packs' events are duplicates: their days'
rows and score snapshot are re-derived from the stored states, and the next owner of the
partition delivers what the outbox holds. Only a crash between publishing an alert and
deleting its outbox record (milliseconds) publishes it again, with the same id. Forwards
sent again carry the same (identity, sequence), which the receiving account skips. A forget
request redelivered after step 2 deletes again what came after it, and everything after it
in its partition is redelivered too and applied afresh, so the result is the same.

A flush takes what it writes at once, before its first await: the rows, the packs to ack
and the states they left (serialised). The agent goes on folding while the flush writes;
what it folds meanwhile is the next flush's, so the stored states never run ahead of the
packs a flush acks. Flushes run in order, two at a time: the next one stores its states
and publishes its alerts while the one before it writes ClickHouse.

A failed step (Kafka or ClickHouse unavailable) is not a data error: nothing is
dead-lettered for it; what was not done yet waits for the next flush, the packs stay unacked,
and the lock is released (every step is bounded in time). A flush carrying a forget request
waits for the one before to finish first: none of the account's older rows may land after
its deletion. A revoke while outbox records may still be undelivered has every partition
read back (``revoked``), so a partition that stays delivers them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from churnsignal.stream import outbox, packs
from churnsignal.stream.deadletter import DeadLetter, source_of
from churnsignal.stream.fold import (
    ALERTS,
    DAILY,
    Forgotten,
    PendingAlert,
    StepResult,
    account_column,
)
from churnsignal.stream.identity import Resolution
from churnsignal.stream.rows import (
    ALERT_COLUMNS,
    BILLING_COLUMNS,
    DAILY_COLUMNS,
    SCORE_COLUMNS,
    SUPPORT_COLUMNS,
    daily_rows,
)
from churnsignal.stream.store import StateStore

# A waiting alert brings the flush forward: at once, unless a flush started less than this
# ago (flushes back to back while alerts keep coming, never more often than this).
ALERT_FLUSH_S = 0.1

Forwards = dict[int, list[list[Any]]]  # ingested partition -> pack items


class Outputs(Protocol):
    """Where a checkpoint writes; each call is bounded in time and raises when it fails."""

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]: ...
    async def dead_letter(self, letters: list[DeadLetter]) -> None: ...
    async def forward(self, forwards: Forwards) -> None: ...
    async def publish(self, alerts: list[PendingAlert]) -> None: ...
    async def write_states(self, values: dict[bytes, bytes | None]) -> None: ...
    async def delete_account(self, account: str) -> dict[str, int]: ...
    async def forgotten(self, done: list[Forgotten]) -> None: ...


@dataclass
class Taken:
    rows: dict[str, list[Any]]  # new rows: the outbox keeps those no redelivery re-derives
    touched: dict[str, set[int]]
    events: list[Any]
    alerts: list[PendingAlert]  # new alerts, not in the outbox yet
    letters: list[DeadLetter]
    forwards: Forwards
    forgotten: list[Forgotten] = field(default_factory=list)
    retry: dict[str, list[Any]] = field(default_factory=dict)  # rows only ClickHouse lacks
    row_keys: list[bytes] = field(default_factory=list)  # their outbox records
    retry_alerts: list[PendingAlert] = field(default_factory=list)  # in the outbox already
    alert_keys: list[bytes] = field(default_factory=list)  # their outbox records
    since: float = 0.0  # when the oldest of it began waiting (monotonic)


@dataclass
class Pending:
    """What waits for the next flush. Daily rows are whole-day totals keyed by (account,
    day) with a growing version, so only the days a flush touched are kept; their rows are
    built once, at the flush, from the states as they stand then.

    ``retry`` holds rows whose states are stored already (a flush whose ClickHouse write
    failed, or what a partition's outbox held when it was assigned): they only need
    writing, and ``row_keys`` are the outbox records to delete then; ``retry_alerts`` and
    ``alert_keys`` the same for alerts waiting to be published."""

    rows: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    touched: dict[str, set[int]] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    alerts: list[PendingAlert] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    forwards: Forwards = field(default_factory=lambda: defaultdict(list))
    forgotten: list[Forgotten] = field(default_factory=list)
    retry: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    row_keys: list[bytes] = field(default_factory=list)
    retry_alerts: list[PendingAlert] = field(default_factory=list)
    alert_keys: list[bytes] = field(default_factory=list)
    count: int = 0  # rows and touched days waiting: the flush trigger and memory bound
    since: float = 0.0
    # Packs of a failed flush wait here again: a later flush must not ack its own before
    # them (Faust commits past a gap before a partition's first commit).
    restored: bool = False

    def _touch(self, touched: dict[str, set[int]]) -> None:
        for account, days in touched.items():
            held = self.touched.setdefault(account, set())
            before = len(held)
            held |= days
            self.count += len(held) - before

    def take(self) -> Taken:
        taken = Taken(dict(self.rows), self.touched, self.events, self.alerts, self.letters,
                      dict(self.forwards), self.forgotten, dict(self.retry), self.row_keys,
                      self.retry_alerts, self.alert_keys, self.since)
        self.rows, self.touched, self.events, self.alerts = defaultdict(list), {}, [], []
        self.letters, self.forwards, self.count = [], defaultdict(list), 0
        self.forgotten = []
        self.retry, self.row_keys = defaultdict(list), []
        self.retry_alerts, self.alert_keys = [], []
        self.restored = False
        return taken

    def has_work(self) -> bool:
        """Anything to flush: packs to ack, or what a re-score tick's slices left (rows, a
        sweep's dead letters, forwards) before its pack is added, or what an outbox held."""
        return bool(self.events or self.count or self.letters or self.forwards
                    or self.forgotten or self.alerts or self.retry_alerts or self.row_keys
                    or self.alert_keys)

    def drop_account(self, account: str) -> None:
        """A forgotten account: what earlier steps left waiting for it is not written."""
        for held in (self.rows, self.retry):
            for table, rows in held.items():
                at = account_column(table)
                kept = [row for row in rows if row[at] != account]
                self.count -= len(rows) - len(kept)
                rows[:] = kept
        self.count -= len(self.touched.pop(account, ()))
        self.alerts = [a for a in self.alerts if a.alert.account_id != account]
        self.retry_alerts = [a for a in self.retry_alerts if a.alert.account_id != account]

    def recover(self, rows: dict[str, list[Any]], row_keys: list[bytes],
                alerts: list[PendingAlert], alert_keys: list[bytes]) -> None:
        """What a partition's outbox held when it was assigned (``stream.outbox.read``)."""
        for table, data in rows.items():
            self.retry[table].extend(data)
            self.count += len(data)
        self.row_keys += row_keys
        self.retry_alerts += alerts
        self.alert_keys += alert_keys

    def restore(self, taken: Taken, keep_since: bool = False) -> None:
        """Put back what a failed flush did not make durable, before what came since
        (``keep_since``: what a flush left for a later one, which waits no longer for it).

        An account forgotten by a fold during that flush loses what the flush had taken of
        it too: its deletion is the next flush's first step, and nothing of before may be
        written after it."""
        # Requests carried out already (their rows deleted) came back from a failed flush:
        # what was folded after them is the account's new life, and stays.
        gone = {done.account for done in self.forgotten
                if done.account is not None and not done.deleted}
        for source, into in ((taken.rows, self.rows), (taken.retry, self.retry)):
            for table, data in source.items():
                if table != DAILY:  # rebuilt from the states at the next flush
                    if gone:
                        at = account_column(table)
                        data = [row for row in data if row[at] not in gone]
                    into[table][:0] = data
                    self.count += len(data)
        self.row_keys[:0] = taken.row_keys
        self.alert_keys[:0] = taken.alert_keys
        touched = taken.touched if not gone else {
            a: days for a, days in taken.touched.items() if a not in gone}
        if len(touched) > len(self.touched):
            # Merged the other way round: an alert-only flush puts back every account the
            # interval touched, and only a few were touched since.
            self.touched, touched = touched, self.touched
            self.count += sum(map(len, self.touched.values())) - sum(map(len, touched.values()))
        self._touch(touched)
        self.events[:0] = taken.events
        self.restored = self.restored or bool(taken.events)
        self.alerts[:0] = [a for a in taken.alerts if a.alert.account_id not in gone]
        self.retry_alerts[:0] = [a for a in taken.retry_alerts
                                 if a.alert.account_id not in gone]
        self.letters[:0] = taken.letters
        for partition, items in taken.forwards.items():
            self.forwards[partition][:0] = items
        self.forgotten[:0] = taken.forgotten
        now = time.monotonic()
        if keep_since:
            self.since = min(self.since, taken.since)
        else:
            self.since = min(self.since, now) if self.events else now


class Checkpoint:
    """Collects step results and flushes them in order (see the module docstring)."""

    def __init__(self, store: StateStore, outputs: Outputs, ingested_topic: str,
                 partitions: int, ack: Callable[[list[Any]], Awaitable[None]],
                 step_timeout_s: float = 120.0) -> None:
        self.store = store
        self.outputs = outputs
        self.ingested_topic = ingested_topic
        self.partitions = partitions
        self.ack = ack
        self.step_timeout_s = step_timeout_s
        self.pending = Pending()
        # Held by the agent while it folds and by a drain (revoke, shutdown) around its
        # flush: no fold between a drain's flush and what follows it. A flush itself does
        # not hold it: it takes what it writes at once, and folds go on while it writes.
        self.lock = asyncio.Lock()
        # Flushes in order: one stores states and publishes alerts while the one before it
        # writes ClickHouse (``writing``), and acks its packs only after that one.
        self.flushing = asyncio.Lock()
        self.writing = asyncio.Lock()
        self.keys = outbox.Keys()
        self.flushes = 0
        self.started = 0.0  # when the last flush started (monotonic)
        self.epoch = 0  # revokes so far (``revoked``)
        # Flushes that took work and have not finished, by the epoch they started in.
        self.running: Counter[int] = Counter()
        # Alerts published whose outbox records are not deleted yet (``recover``).
        self.published: set[str] = set()
        # What the flushes in progress took (their rows not in ClickHouse yet).
        self.in_flight: list[Taken] = []

    @contextlib.asynccontextmanager
    async def folding(self, epoch: int) -> AsyncIterator[bool]:
        """The lock, for a fold of packs taken in ``epoch``: yields False when partitions
        were revoked since. A drain (revoke) holds the lock around its flush and the store
        is reset right after it, before a fold waiting for the lock runs: that fold would
        build states of a partition that may be another worker's now, which the next flush
        would write over that worker's. Packs taken but not folded are redelivered from the
        committed offsets (Faust seeks back to them on a rebalance)."""
        async with self.lock:
            yield epoch == self.epoch

    # -- collecting --------------------------------------------------------------------

    def add(self, result: StepResult, events: list[Any], pack_partition: int) -> None:
        """A folded step and the packs it came from (acked after the flush)."""
        p = self.pending
        if not p.has_work():
            p.since = time.monotonic()
        for done in result.forgotten:  # before this step's rows: those came after it
            if done.account is not None:
                p.drop_account(done.account)
        p.forgotten.extend(result.forgotten)
        for table, data in result.rows.items():
            if data:
                p.rows[table].extend(data)
                p.count += len(data)
        p._touch(result.touched)
        p.events.extend(events)
        if result.alerts:
            p.alerts.extend(result.alerts)
        for failure in result.failures:
            topic, partition = source_of(failure.source)
            p.letters.append(DeadLetter(
                failure.reason, failure.detail, "state", topic, partition, failure.offset,
                None, str(failure.data.get("account_id", "")).encode(),
                orjson.dumps(failure.data),
                (("dlq_pack_topic", self.ingested_topic.encode()),
                 ("dlq_pack_partition", str(pack_partition).encode()))))
        self.add_resolutions(result.identities, pack_partition)

    def add_unreadable(self, event: Any, exc: Exception) -> None:
        """A pack that is not even JSON (not written by our ingest): dead-lettered whole,
        acked with the next flush."""
        message = event.message
        self.pending.letters.append(DeadLetter(
            "processing_error", f"unreadable pack: {type(exc).__name__}: {exc}", "state",
            self.ingested_topic, message.partition, message.offset, None, None, event.value))
        self.add_tick(event)

    def add_resolutions(self, resolutions: list[Resolution], pack_partition: int) -> None:
        p = self.pending
        for res in resolutions:
            for target, source, offset, data in res.forwards:
                p.forwards[packs.partition_for(target, self.partitions)].append(
                    [source, offset, data])
            for data in res.overflow:
                p.letters.append(DeadLetter(
                    "unattributed_overflow", "more events wait for this identity's account "
                    "than it may hold (CHURNSIGNAL_INGEST__MAX_PARKED_PER_IDENTITY)", "identity",
                    self.ingested_topic, pack_partition, None, None,
                    str(data.get("account_id", "")).encode(), orjson.dumps(data)))
            for origin, offset, data in res.expired:
                topic, partition = source_of(origin)
                # An older record, or another identity: no offset to name.
                letter_offset = None if partition is None or offset < 0 else offset
                by = ("more identities waited than CHURNSIGNAL_INGEST__MAX_PARKED_IDENTITIES "
                      "allows; the longest waiting expired first" if res.expired_by == "count"
                      else "no link to an account arrived within "
                      "CHURNSIGNAL_INGEST__IDENTITY_TTL_S")
                p.letters.append(DeadLetter(
                    "unattributed_expired", f"{res.key}: {by}", "identity", topic or res.key,
                    partition, letter_offset, None, str(data.get("account_id", "")).encode(),
                    orjson.dumps(data)))

    def add_tick(self, event: Any) -> None:
        """A pack with nothing to write is still acked by the next flush."""
        if not self.pending.events:
            self.pending.since = time.monotonic()
        self.pending.events.append(event)

    def revoked(self) -> bool:
        """Partitions were revoked: a flush still running (it outlived a drain's wait) must
        not put back what it took once it fails, into a store that was reset since.

        True when outbox records may still hold undelivered rows or alerts (a flush failed
        or is still running): then every partition kept must be read back from the state
        topic, outbox included, before anything more is folded into it."""
        self.epoch += 1
        p = self.pending
        return bool(p.retry_alerts or p.alert_keys or p.row_keys or any(p.retry.values())
                    or self.running.total())

    async def settled(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until no flush from before the last revoke is still
        running: partitions are read back only after what it writes, or it could publish an
        alert the read-back outbox holds too. False when one still runs."""
        deadline = time.monotonic() + timeout_s
        while any(n for epoch, n in self.running.items() if epoch < self.epoch):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def recover(self, found: outbox.Recovered) -> None:
        """What a partition's outbox records held, read back with its states: delivered by
        the next flush. Alerts this worker published but could not delete the records of
        (the state topic failed right after) are not published again."""
        alerts = [a for a in found.alerts if a.alert.alert_id not in self.published]
        self.pending.recover(found.rows, found.row_keys, alerts, found.alert_keys)

    def due(self, max_rows: int, max_wait_s: float) -> bool:
        return self.due_for(max_rows, max_wait_s) is not None

    def due_for(self, max_rows: int, max_wait_s: float, writable: bool = True) -> str | None:
        """Why a flush is due: "rows" (the batch is full or has waited the interval),
        "alerts" (only alerts wait: ``flush(write=False)`` publishes them without writing
        ClickHouse), or None (not due). ``writable=False`` (ClickHouse asked to wait): only
        alerts are due, so they do not wait out its back-off."""
        p = self.pending
        if not p.has_work():
            return None
        now = time.monotonic()
        if writable and (p.count >= max_rows or now - p.since >= max_wait_s):
            return "rows"
        if (p.alerts or p.retry_alerts) and now - self.started >= ALERT_FLUSH_S:
            return "alerts"
        return None

    def latest_alert(self, account: str) -> str | None:
        """The id of the newest alert of ``account`` decided here whose row is not in
        ClickHouse yet (an alert leaves before its row is written: an ack right after it
        must still find it), or None."""
        at = ALERT_COLUMNS.index("emitted_at")
        rows = [row for held in (self.pending.rows, self.pending.retry,
                                 *(t.rows for t in self.in_flight),
                                 *(t.retry for t in self.in_flight))
                for row in held.get(ALERTS, ()) if row[1] == account]
        return str(max(rows, key=lambda row: row[at])[0]) if rows else None

    # -- flushing ----------------------------------------------------------------------

    async def _step(self, call: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(call, self.step_timeout_s)

    async def flush(self, write: bool = True) -> int:
        """Make everything waiting durable, in order; returns the packs acked. Raises when
        a step failed (what was not done waits for the next flush).

        ``write=False`` (alerts waiting, the rows not due yet) stops after step 3: the
        states are stored and the alerts published, and the rows and the packs to ack wait
        for the next flush, as after a failed ClickHouse write. Alerts then leave as soon
        as they are decided, while ClickHouse gets one insert per table and flush interval
        (each insert a part to merge) and not one per alert."""
        async with self.flushing:
            p = self.pending
            if not p.has_work() or p.forgotten:
                # The flush before is done (packs acked). Before a forget's deletion, too:
                # none of the account's older rows may land after it, and what that flush
                # puts back if it fails is filtered by the requests still waiting here.
                async with self.writing:
                    if not p.has_work():
                        return 0
            self.started = time.monotonic()
            epoch = self.epoch
            # Taken together, before the first await: the rows, the packs to ack and the
            # states they left. Folds go on while this flush writes; what they change is
            # the next flush's.
            taken = p.take()
            write = write or bool(taken.forgotten)  # a forget waits for its deletions' audit
            self.running[epoch] += 1
            self.in_flight.append(taken)
            store = self.store
            try:
                # Daily rows are built from the states by the flush that writes them.
                taken.rows[DAILY] = [row for account, days in taken.touched.items()
                                     if (state := store.get(account)) is not None
                                     for row in daily_rows(state, days)] if write else []
                values = store.take_dirty()
                try:
                    flush_id = self.keys.flush()
                    rows_box = outbox.row_records(
                        flush_id, outbox.by_partition(taken.rows, self._partition))
                    alerts_box = outbox.alert_records(flush_id, taken.alerts)
                except BaseException:
                    store.unstored(values)
                    raise
                await self._store(taken, values, rows_box, alerts_box, epoch)
                if not write:
                    self._done(epoch, taken)
                    if epoch == self.epoch:  # else the packs go to be redelivered
                        self.pending.restore(taken, keep_since=True)
                    return 0
                # The next flush may store and publish while this one writes ClickHouse.
                await self.writing.acquire()
            except BaseException:
                self._done(epoch, taken)
                self._failed(epoch, taken)
                raise
        try:
            await self._write(taken)
            if self.pending.restored:  # the flush before failed: its packs are acked first
                self.pending.events.extend(taken.events)
                taken.events = []
            else:
                await self.ack(taken.events)
        except BaseException:
            self._failed(epoch, taken)
            raise
        finally:
            self._done(epoch, taken)
            self.writing.release()
        self.flushes += 1
        return len(taken.events)

    def _done(self, epoch: int, taken: Taken) -> None:
        self.in_flight = [t for t in self.in_flight if t is not taken]
        self.running[epoch] -= 1
        if not self.running[epoch]:
            del self.running[epoch]

    def _partition(self, account: str) -> int:
        return packs.partition_for(account, self.partitions)

    def _failed(self, epoch: int, taken: Taken) -> None:
        # After a revoke (``revoked``) the states were forgotten and the packs go to be
        # redelivered: what this flush took is not put back.
        if epoch == self.epoch:
            self.pending.restore(taken)

    async def _store(self, taken: Taken, values: dict[bytes, bytes | None],
                     rows_box: dict[bytes, bytes], alerts_box: dict[bytes, bytes],
                     epoch: int) -> None:
        """Steps 0-3: up to the states stored and the alerts published."""
        store = self.store
        stored = False

        def settle(done: dict[bytes, bytes | None], ok: bool) -> None:
            # Not after a revoke: the store was reset; these states are not ours to keep.
            if epoch == self.epoch:
                (store.stored if ok else store.unstored)(done)

        try:
            for done in taken.forgotten:
                # Once per request: a retry must not delete rows of the new state that
                # an earlier attempt wrote after it.
                if done.account is not None and not done.deleted:
                    done.rows = await self._step(self.outputs.delete_account(done.account))
                    done.deleted = True
            if taken.letters:
                await self._step(self.outputs.dead_letter(taken.letters))
                taken.letters = []
            if taken.forwards:
                await self._step(self.outputs.forward(taken.forwards))
                taken.forwards = {}
            # A record half written by a failed attempt is deleted with the others.
            taken.row_keys += list(rows_box)
            taken.alert_keys += list(alerts_box)
            # The outbox first (a state must never be stored without it), then the
            # alerting accounts' states, then the alerts: the other states, most of the
            # bytes, follow with the alerts' deletion.
            box: dict[bytes, bytes | None] = {**rows_box, **alerts_box}
            if box:
                await self._step(self.outputs.write_states(box))
            alerting = {a.alert.account_id.encode() for a in taken.alerts}
            first = {key: values[key] for key in alerting if key in values}
            if first:
                await self._step(self.outputs.write_states(first))
            settle(first, True)
            stored = True
        except BaseException:
            if not stored:
                settle(values, False)
            raise
        # Stored: the rows only ClickHouse lacks now, the alerts only the alerts topic.
        for table, data in taken.rows.items():
            if table != DAILY and data:
                taken.retry[table] = [*taken.retry.get(table, ()), *data]
        taken.rows = {DAILY: taken.rows.get(DAILY, [])}
        # Once per id: an alert read back from an outbox may be decided again by its
        # redelivered pack when its state was not stored.
        unique = {a.alert.alert_id: a for a in [*taken.retry_alerts, *taken.alerts]}
        taken.retry_alerts = list(unique.values())
        taken.alerts = []
        rest = {key: value for key, value in values.items() if key not in first}
        try:
            if taken.retry_alerts:
                await self._step(self.outputs.publish(taken.retry_alerts))
                self.published.update(a.alert.alert_id for a in taken.retry_alerts)
                taken.retry_alerts = []
            # The alerts' records deleted at once: a crash from here on publishes none of
            # them again.
            if rest or taken.alert_keys:
                await self._step(self.outputs.write_states(
                    {**rest, **dict.fromkeys(taken.alert_keys)}))
        except BaseException:
            settle(rest, False)
            raise
        settle(rest, True)
        taken.alert_keys = []
        self.published.clear()  # every record of a published alert is deleted now

    async def _write(self, taken: Taken) -> None:
        """Steps 4-4b: the rows into ClickHouse, then their outbox records deleted."""
        rows = {table: data for table, data in taken.rows.items() if data}
        for table, data in taken.retry.items():
            if data:
                rows[table] = [*rows.get(table, ()), *data]
        refused = await self._step(self.outputs.write_rows(rows))
        taken.rows, taken.retry, taken.touched = {}, {}, {}
        taken.letters = _refused_letters(refused or [])  # put back if they fail
        if taken.letters:
            await self._step(self.outputs.dead_letter(taken.letters))
            taken.letters = []
        if taken.forgotten:
            await self._step(self.outputs.forgotten(taken.forgotten))
            taken.forgotten = []
        if taken.row_keys:
            await self._step(self.outputs.write_states(dict.fromkeys(taken.row_keys)))
            taken.row_keys = []


_ACCOUNT_COLUMN = {table: columns.index("account_id") for table, columns in (
    ("account_daily_data", DAILY_COLUMNS), ("account_scores_data", SCORE_COLUMNS),
    ("alerts_data", ALERT_COLUMNS), ("billing_events_data", BILLING_COLUMNS),
    ("support_events_data", SUPPORT_COLUMNS))}


def _refused_letters(refused: list[Any]) -> list[DeadLetter]:
    """Rows a ClickHouse table refused for good: the row, the table and the server's word."""
    letters = []
    for r in refused:
        row = r.row
        # Keyed by account, as every other dead letter: its column, wherever the table has it
        # (an alert row starts with the alert id).
        at = _ACCOUNT_COLUMN.get(str(r.table), 0)
        account = str(row[at]) if len(row) > at else ""
        letters.append(DeadLetter(
            "sink_rejected", str(r.error), "sink", "", None, None, None, account.encode(),
            orjson.dumps(list(row), default=str), (("dlq_table", str(r.table).encode()),)))
    return letters
