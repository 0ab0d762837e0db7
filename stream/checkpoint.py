"""The checkpoint: what a flush makes durable, in which order, and why.

Folded packs leave rows, alerts, dead letters and identity forwards waiting here. A flush
(every ``sink.flush_interval_s``, at ``sink.batch_max_rows``, or soon after an alert):

0. deletes the ClickHouse rows of accounts forgotten (``churnsignal forget``), before any
   row of their new state is written;
1. writes the rows, one insert per table (rows a table refuses come back, for the DLQ);
2. sends the dead letters and the identity forwards, and awaits their acks;
3. publishes the alerts and awaits their acks;
4. stores each changed state once (and tombstones) and awaits the acks;
4b. audits and confirms the forget requests carried out (the command waits for that);
5. acks the packs, so Faust commits their offsets.

A crash before 3 redelivers the packs, which fold again on the stored states: the same rows
(whole-day totals with a growing version; facts keyed by event id) and the same alerts
(deterministic ``alert_id``), which were not published yet. Only a crash between 3 and 4
(milliseconds) publishes an alert again, with the same id. After 4 but before 5, the packs'
events are duplicates, and their days' rows and score snapshot are re-derived from the
stored states. Forwards sent again carry the same (identity, sequence), which the receiving
account skips. A forget request redelivered after step 4 deletes again what came after it,
and everything after it in its partition is redelivered too and applied afresh, so the
result is the same.

A flush takes what it writes at once, before its first await: the rows, the packs to ack
and the states they left (serialised). The agent goes on folding while the flush writes (a
flush is mostly waiting on ClickHouse and Kafka); what it folds meanwhile is the next
flush's, so the stored states never run ahead of the packs acked with them.

A failed step (Kafka or ClickHouse unavailable) is not a data error: nothing is
dead-lettered for it; what was not done yet waits for the next flush, the packs stay unacked,
and the lock is released (every step is bounded in time).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from churnsignal.stream import packs
from churnsignal.stream.deadletter import DeadLetter, source_of
from churnsignal.stream.fold import (
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
    rows: dict[str, list[Any]]
    touched: dict[str, set[int]]
    events: list[Any]
    alerts: list[PendingAlert]
    letters: list[DeadLetter]
    forwards: Forwards
    forgotten: list[Forgotten] = field(default_factory=list)


@dataclass
class Pending:
    """What waits for the next flush. Daily rows are whole-day totals keyed by (account,
    day) with a growing version, so only the days a flush touched are kept; their rows are
    built once, at the flush, from the states as they stand then."""

    rows: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    touched: dict[str, set[int]] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    alerts: list[PendingAlert] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    forwards: Forwards = field(default_factory=lambda: defaultdict(list))
    forgotten: list[Forgotten] = field(default_factory=list)
    count: int = 0  # rows and touched days waiting: the flush trigger and memory bound
    since: float = 0.0

    def _touch(self, touched: dict[str, set[int]]) -> None:
        for account, days in touched.items():
            held = self.touched.setdefault(account, set())
            before = len(held)
            held |= days
            self.count += len(held) - before

    def take(self) -> Taken:
        taken = Taken(dict(self.rows), self.touched, self.events, self.alerts, self.letters,
                      dict(self.forwards), self.forgotten)
        self.rows, self.touched, self.events, self.alerts = defaultdict(list), {}, [], []
        self.letters, self.forwards, self.count = [], defaultdict(list), 0
        self.forgotten = []
        return taken

    def has_work(self) -> bool:
        """Anything to flush: packs to ack, or what a re-score tick's slices left (rows, a
        sweep's dead letters, forwards) before its pack is added."""
        return bool(self.events or self.count or self.letters or self.forwards
                    or self.forgotten)

    def drop_account(self, account: str) -> None:
        """A forgotten account: what earlier steps left waiting for it is not written."""
        for table, rows in self.rows.items():
            at = account_column(table)
            kept = [row for row in rows if row[at] != account]
            self.count -= len(rows) - len(kept)
            rows[:] = kept
        self.count -= len(self.touched.pop(account, ()))
        self.alerts = [a for a in self.alerts if a.alert.account_id != account]

    def restore(self, taken: Taken) -> None:
        """Put back what a failed flush did not make durable, before what came since.

        An account forgotten by a fold during that flush loses what the flush had taken of
        it too: its deletion is the next flush's first step, and nothing of before may be
        written after it."""
        gone = {done.account for done in self.forgotten if done.account is not None}
        for table, data in taken.rows.items():
            if table != DAILY:  # rebuilt from the states at the next flush
                if gone:
                    at = account_column(table)
                    data = [row for row in data if row[at] not in gone]
                self.rows[table][:0] = data
                self.count += len(data)
        self._touch({a: days for a, days in taken.touched.items() if a not in gone})
        self.events[:0] = taken.events
        self.alerts[:0] = [a for a in taken.alerts if a.alert.account_id not in gone]
        self.letters[:0] = taken.letters
        for partition, items in taken.forwards.items():
            self.forwards[partition][:0] = items
        self.forgotten[:0] = taken.forgotten
        now = time.monotonic()
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
        self.flushing = asyncio.Lock()  # one flush at a time, in order
        self.flushes = 0
        self.started = 0.0  # when the last flush started (monotonic)
        self.epoch = 0  # revokes so far (``revoked``)

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

    def revoked(self) -> None:
        """Partitions were revoked: a flush still running (it outlived a drain's wait) must
        not put back what it took once it fails, into a store that was reset since."""
        self.epoch += 1

    def due(self, max_rows: int, max_wait_s: float) -> bool:
        p = self.pending
        now = time.monotonic()
        return p.has_work() and (
            p.count >= max_rows or now - p.since >= max_wait_s
            or (bool(p.alerts) and now - self.started >= ALERT_FLUSH_S))

    # -- flushing ----------------------------------------------------------------------

    async def _step(self, call: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(call, self.step_timeout_s)

    async def flush(self) -> int:
        """Make everything waiting durable, in order; returns the packs acked. Raises when
        a step failed (what was not done waits for the next flush)."""
        async with self.flushing:
            p = self.pending
            if not p.has_work():
                return 0
            self.started = time.monotonic()
            epoch = self.epoch
            # Taken together, before the first await: the rows, the packs to ack and the
            # states they left. Folds go on while this flush writes; what they change is
            # the next flush's.
            taken = p.take()
            store = self.store
            taken.rows[DAILY] = [row for account, days in taken.touched.items()
                                 if (state := store.get(account)) is not None
                                 for row in daily_rows(state, days)]
            values = store.take_dirty()
            written = False
            try:
                for done in taken.forgotten:
                    # Once per request: a retry must not delete rows of the new state that
                    # an earlier attempt wrote after it.
                    if done.account is not None and not done.deleted:
                        done.rows = await self._step(self.outputs.delete_account(done.account))
                        done.deleted = True
                refused = await self._step(self.outputs.write_rows(taken.rows))
                taken.rows, taken.touched = {}, {}
                taken.letters.extend(_refused_letters(refused or []))
                if taken.letters:
                    await self._step(self.outputs.dead_letter(taken.letters))
                    taken.letters = []
                if taken.forwards:
                    await self._step(self.outputs.forward(taken.forwards))
                    taken.forwards = {}
                # Alerts after their rows and before the states that record them: a crash
                # before the states are stored redelivers the packs, which decide the same
                # alerts again (same ids); only one between publish and store repeats one.
                if taken.alerts:
                    await self._step(self.outputs.publish(taken.alerts))
                    taken.alerts = []
                await self._step(self.outputs.write_states(values))
                store.stored(values)
                written = True
                if taken.forgotten:
                    await self._step(self.outputs.forgotten(taken.forgotten))
                    taken.forgotten = []
            except BaseException:
                # After a revoke (``revoked``) the states were forgotten and the packs go
                # to be redelivered: what this flush took is not put back.
                if epoch == self.epoch:
                    if not written:
                        store.unstored(values)
                    p.restore(taken)
                raise
            await self.ack(taken.events)
            self.flushes += 1
            return len(taken.events)


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
