"""Alerts that do not wait for ClickHouse (stream.outbox, stream.checkpoint), without Kafka.

A flush stores the states with the outbox (alert rows, billing and support facts, alerts to
publish), publishes, then writes ClickHouse. These tests fail ClickHouse, the alerts topic or
the worker itself at each point and check that nothing is lost or delivered twice: a new
checkpoint over what the state topic holds plays the worker's successor.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from churnsignal.stream import outbox
from churnsignal.stream.checkpoint import Checkpoint
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.fold import ALERTS, BILLING, SCORES, fold_step
from churnsignal.stream.state import DAY
from churnsignal.stream.store import MemoryStateStore
from tests.unit.test_checkpoint_overlap import Held
from tests.unit.test_fold import NOW, POLICY, Recorder, pack, usage

PARTITIONS = 4


class Topic(Recorder):
    """Outputs that keep what a real run would leave: the state topic compacted (newest value
    per key, tombstones removing), every alert published, every row written."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[Any] = []
        self.rows: list[dict[str, list[Any]]] = []
        self.writes: list[set[bytes]] = []  # the keys of each state-topic write

    async def publish(self, alerts: list[Any]) -> None:
        await super().publish(alerts)
        self.published += [a.alert.alert_id for a in alerts]

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
        refused = await super().write_rows(rows)
        self.rows.append({t: list(r) for t, r in rows.items() if r})
        return refused

    async def write_states(self, values: dict[bytes, bytes | None]) -> None:
        await super().write_states(values)
        self.writes.append(set(values))

    def compacted(self) -> dict[bytes, bytes]:
        return {k: v for k, v in self.states.items() if v is not None}

    def written(self, table: str) -> list[Any]:
        return [row for rows in self.rows for row in rows.get(table, ())]


def billing(n: int, kind: str, age_days: float, **data: Any) -> dict[str, Any]:
    return {"event_id": f"b{n}", "account_id": "acme", "type": kind,
            "occurred_at": datetime.fromtimestamp(NOW - age_days * DAY, tz=UTC).isoformat(),
            "data": {"status": "active", "mrr_cents": 9900, **data}}


def history() -> list[list[Any]]:
    """A subscribed, active account that schedules its cancellation now: a critical alert,
    an alert row and two billing facts, none of which a redelivery makes again."""
    items: list[list[Any]] = [["billing/0", 1, billing(1, "subscription_created", 30)]]
    items += [["usage/0", 10 + n, usage(10 + n, 20 - n)] for n in range(20)]
    items.append(["billing/0", 2, billing(2, "subscription_updated", 0.001,
                                          cancel_at_period_end=True)])
    return items


def worker(out: Any) -> tuple[MemoryStateStore, Checkpoint, list[Any]]:
    store = MemoryStateStore(PARTITIONS)
    acked: list[Any] = []

    async def ack(events: list[Any]) -> None:
        acked.extend(events)

    return store, Checkpoint(store, out, "ingested", PARTITIONS, ack), acked


def fold(store: MemoryStateStore, checkpoint: Checkpoint, name: str,
         items: list[list[Any]]) -> Any:
    partition = 0
    result = fold_step(store, pack(items), partition, 1, POLICY, PartitionClock())
    checkpoint.add(result, [name], partition)
    return result


def successor(out: Topic) -> tuple[MemoryStateStore, Checkpoint, list[Any]]:
    """The partition's next owner: the states and the outbox read back, as ``_load`` does."""
    store, checkpoint, acked = worker(out)
    load(out, store, checkpoint)
    return store, checkpoint, acked


def load(out: Topic, store: MemoryStateStore, checkpoint: Checkpoint) -> None:
    records = out.compacted()
    box = {k: v for k, v in records.items() if outbox.is_outbox(k, v)}
    checkpoint.recover(outbox.read(box))
    store.load({k: v for k, v in records.items() if k not in box})


def revoke_and_keep(out: Topic, store: MemoryStateStore, checkpoint: Checkpoint) -> None:
    """A rebalance that leaves the partition with this worker, after a failed flush: as
    flush_before_revoke and load_states do (the store read back whole, outbox included)."""
    assert checkpoint.revoked()  # undelivered outbox records: read everything back
    checkpoint.pending.take()
    store.forget()
    store.data.clear()
    load(out, store, checkpoint)


def failed_once(fail: str) -> tuple[Topic, MemoryStateStore, Checkpoint, list[Any], list[str]]:
    """A worker that folded ``history()`` and whose flush then failed at ``fail`` (which
    works again afterwards); the ids of the alerts it decided."""
    out = Topic()
    store, checkpoint, acked = worker(out)
    result = fold(store, checkpoint, "pack-1", history())
    out.fail = fail
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    out.fail = None
    return out, store, checkpoint, acked, [a.alert.alert_id for a in result.alerts]


def test_an_alert_goes_out_while_clickhouse_is_down_and_its_rows_follow() -> None:
    out = Topic()
    store, checkpoint, acked = worker(out)
    result = fold(store, checkpoint, "pack-1", history())
    [alert] = [a.alert.alert_id for a in result.alerts]
    out.fail = "rows"
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    # The outbox, the alerting state, the alert, the other states with the alert's record
    # deleted; the rows could not be written.
    assert out.calls == ["states", "states", "alerts", "states", "rows"]
    assert out.published == [alert] and acked == []
    box = {k: v for k, v in out.compacted().items() if outbox.is_outbox(k, v)}
    found = outbox.read(box)
    assert not found.alerts  # published: not in the outbox any more
    assert [r[0] for r in found.rows[ALERTS]] == [alert]
    assert sorted(r[1] for r in found.rows[BILLING]) == ["b1", "b2"]

    out.fail, out.calls = None, []
    assert asyncio.run(checkpoint.flush()) == 1
    assert out.calls == ["rows", "states"] and acked == ["pack-1"]  # rows, then their records deleted
    assert out.published == [alert]  # once
    assert [r[0] for r in out.written(ALERTS)] == [alert]
    assert sorted(r[1] for r in out.written(BILLING)) == ["b1", "b2"]
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]  # all delivered


def test_a_crash_while_clickhouse_is_down_loses_no_row_and_repeats_no_alert() -> None:
    out, store, checkpoint, _, _ = failed_once("rows")
    before = {t: list(out.written(t)) for t in (ALERTS, BILLING)}
    assert before == {ALERTS: [], BILLING: []}

    # The worker dies. Its successor reads the states and the outbox back; the pack, never
    # acked, comes again and its events are duplicates now.
    store, checkpoint, acked = successor(out)
    again = fold(store, checkpoint, "pack-1", history())
    assert again.applied == 0 and again.duplicates == len(history()) and not again.alerts
    assert asyncio.run(checkpoint.flush()) == 1 and acked == ["pack-1"]
    assert len(out.published) == 1  # not published again
    assert len(out.written(ALERTS)) == 1
    assert sorted(r[1] for r in out.written(BILLING)) == ["b1", "b2"]
    assert [r[0] for r in out.written(SCORES)] == ["acme"]  # re-derived from the state
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]


def test_alerts_stored_but_not_published_are_published_by_the_successor() -> None:
    # The alerts topic refuses: the states are stored already.
    out, store, checkpoint, _, alerts = failed_once("alerts")
    assert out.published == []
    store, checkpoint, acked = successor(out)
    assert checkpoint.due(50_000, 60.0)  # an alert waits: flushed at once
    fold(store, checkpoint, "pack-1", history())
    asyncio.run(checkpoint.flush())
    assert out.published == alerts and acked == ["pack-1"]
    assert len(out.written(ALERTS)) == 1
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]


def test_the_same_worker_publishes_what_the_alerts_topic_refused_once_it_is_back() -> None:
    out, store, checkpoint, acked, alerts = failed_once("alerts")
    asyncio.run(checkpoint.flush())
    assert out.published == alerts and acked == ["pack-1"]
    assert len(out.written(ALERTS)) == 1 and len(out.written(BILLING)) == 2
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]


def test_the_outbox_then_the_alerting_state_go_first_the_other_states_after_the_alert() -> None:
    out = Topic()
    store, checkpoint, _ = worker(out)
    fold(store, checkpoint, "pack-1", [*history(), ["usage/0", 99, usage(99, 1, "globex")]])
    asyncio.run(checkpoint.flush())
    assert out.calls[:4] == ["states", "states", "alerts", "states"]
    box, head, rest = out.writes[:3]
    assert box and all(k.startswith(outbox.PREFIX) for k in box)  # the outbox first
    assert head == {b"acme"}  # then the alerting account's state, then the alert
    assert b"globex" in rest  # with the alerts' records deleted
    assert [k for k in rest if k.startswith(outbox.PREFIX)]


def test_the_next_flush_publishes_while_the_one_before_writes_clickhouse() -> None:
    async def run() -> None:
        out = Held("rows")
        store, checkpoint, acked = worker(out)
        fold(store, checkpoint, "pack-1", [["usage/0", 1, usage(1, 1)]])
        first = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()  # the first flush is writing ClickHouse
        fold(store, checkpoint, "pack-2", history())
        second = asyncio.ensure_future(checkpoint.flush())
        for _ in range(20):
            await asyncio.sleep(0)
        assert out.calls[-2:] == ["alerts", "states"]  # published, outbox record deleted
        assert acked == [] and not second.done()
        out.release.set()
        assert await first == 1 and await second == 1
        assert acked == ["pack-1", "pack-2"]  # in order

    asyncio.run(run())


def test_outbox_rows_read_back_as_they_were_written() -> None:
    out = Topic()
    store, checkpoint, _ = worker(out)
    result = fold(store, checkpoint, "pack-1", history())
    rows = {t: result.rows[t] for t in (ALERTS, BILLING)}
    records = outbox.row_records("f1", outbox.by_partition(rows, lambda a: 2))
    assert all(outbox.partition_of(k, v) == 2 for k, v in records.items())
    assert dict(outbox.read(records).rows) == rows
    alerts = outbox.alert_records("f1", result.alerts)
    [back] = outbox.read(alerts).alerts
    assert back == result.alerts[0]


def test_an_account_named_like_an_outbox_key_is_still_an_account() -> None:
    key = outbox.PREFIX + b"1/x/alerts"
    assert not outbox.is_outbox(key, orjson.dumps({"account_id": key.decode()}))
    assert outbox.is_outbox(key, None)  # a tombstone: by its key


def test_a_revoke_after_clickhouse_failed_reads_the_outbox_back_for_kept_partitions() -> None:
    # States and outbox stored, the alert published, the rows not written.
    out, store, checkpoint, acked, _ = failed_once("rows")
    revoke_and_keep(out, store, checkpoint)
    again = fold(store, checkpoint, "pack-1", history())  # redelivered to the same worker
    assert again.applied == 0  # duplicates: their rows come from the outbox
    asyncio.run(checkpoint.flush())
    assert acked == ["pack-1"] and len(out.published) == 1
    assert len(out.written(ALERTS)) == 1 and len(out.written(BILLING)) == 2


def test_a_revoke_after_the_alerts_topic_failed_publishes_from_the_outbox() -> None:
    out, store, checkpoint, acked, _ = failed_once("alerts")
    revoke_and_keep(out, store, checkpoint)
    fold(store, checkpoint, "pack-1", history())
    asyncio.run(checkpoint.flush())
    assert acked == ["pack-1"] and len(out.published) == 1


def test_an_alert_whose_record_could_not_be_deleted_is_not_published_again() -> None:
    out = Topic()
    store, checkpoint, acked = worker(out)
    fold(store, checkpoint, "pack-1", history())
    writes = {"n": 0}
    real = out.write_states

    async def write_states(values: dict[bytes, bytes | None]) -> None:
        writes["n"] += 1
        if writes["n"] == 3:  # outbox, alerting state, then this: the alert's deletion
            raise ConnectionError("state topic unavailable")
        await real(values)

    out.write_states = write_states  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    assert len(out.published) == 1
    revoke_and_keep(out, store, checkpoint)  # the record is read back: published already
    fold(store, checkpoint, "pack-1", history())
    asyncio.run(checkpoint.flush())
    assert acked == ["pack-1"] and len(out.published) == 1
    # ...and its record is deleted now: a later successor publishes nothing either.
    store, checkpoint, _ = successor(out)
    asyncio.run(checkpoint.flush())
    assert len(out.published) == 1


def test_a_state_is_never_stored_without_its_outbox() -> None:
    out = Topic()
    store, checkpoint, _ = worker(out)
    fold(store, checkpoint, "pack-1", history())
    real = out.write_states

    async def partial(values: dict[bytes, bytes | None]) -> None:
        # A write whose state records are acked and whose outbox records are not.
        await real({k: v for k, v in values.items() if not k.startswith(outbox.PREFIX)})
        if any(k.startswith(outbox.PREFIX) for k in values):
            raise ConnectionError("a batch timed out")

    out.write_states = partial  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    assert b"acme" not in out.states  # the outbox is written (and awaited) first
    out.write_states = real  # type: ignore[method-assign]
    store, checkpoint, _ = successor(out)  # the worker died
    fold(store, checkpoint, "pack-1", history())
    asyncio.run(checkpoint.flush())
    assert len(out.published) == 1 and len(out.written(BILLING)) == 2


class SlowForget(Topic):
    """ClickHouse holds the first insert (then refuses it, or takes it); a forget's deletion
    and every insert are recorded in order."""

    def __init__(self, fail_first: bool) -> None:
        super().__init__()
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.first, self.fail_first = True, fail_first
        self.deleted_at: int | None = None

    async def delete_account(self, account: str) -> dict[str, int]:
        self.calls.append("delete")
        self.deleted_at = len(self.rows)  # inserts completed before the deletion
        return {}

    async def forgotten(self, done: list[Any]) -> None:
        self.calls.append("forgotten")

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
        if self.first:
            self.first = False
            self.entered.set()
            await self.release.wait()
            if self.fail_first:
                raise ConnectionError("ClickHouse unavailable")
        return await super().write_rows(rows)


@pytest.mark.parametrize("fail_first", [False, True])
def test_a_forget_waits_for_the_flush_still_writing_the_accounts_older_rows(
        fail_first: bool) -> None:
    from tests.unit.test_forget import forget_item, home

    async def run() -> SlowForget:
        p = home("acme")
        out = SlowForget(fail_first)
        store, checkpoint, _ = worker(out)
        checkpoint.add(fold_step(store, pack(history()), p, 1, POLICY, PartitionClock()),
                       ["pack-1"], p)
        first = asyncio.ensure_future(checkpoint.flush())  # stored; writing ClickHouse
        await out.entered.wait()
        checkpoint.add(fold_step(store, pack([forget_item("account", "acme", "states")]), p,
                                 2, POLICY, PartitionClock()), ["pack-2"], p)
        second = asyncio.ensure_future(checkpoint.flush())
        for _ in range(50):
            await asyncio.sleep(0)
        assert out.deleted_at is None  # not while acme's older rows are being written
        out.release.set()
        await asyncio.gather(first, second, return_exceptions=True)
        await checkpoint.flush()
        return out

    out = asyncio.run(run())
    assert out.deleted_at is not None
    later = [row for rows in out.rows[out.deleted_at:] for data in rows.values()
             for row in data]
    assert not [row for row in later if "acme" in row[:2]]  # nothing of before after it
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]


def test_a_revoke_reads_everything_back_only_when_something_may_be_undelivered() -> None:
    async def run() -> None:
        out = Held("rows")
        store, checkpoint, _ = worker(out)
        fold(store, checkpoint, "pack-1", history())
        flushing = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()
        assert checkpoint.running.total() == 1 and checkpoint.revoked()  # a flush writes
        out.release.set()
        await flushing
        assert not checkpoint.running and not checkpoint.revoked()  # all delivered
        assert await checkpoint.flush() == 0 and not checkpoint.revoked()

    asyncio.run(run())


def test_outbox_records_stay_well_below_a_records_size_limit() -> None:
    out = Topic()
    store, checkpoint, _ = worker(out)
    result = fold(store, checkpoint, "pack-1", history())
    [alert] = result.alerts
    many = [alert] * 1000  # a re-score tick may raise thousands at once
    records = outbox.alert_records("f1", many)
    assert len(records) == 5 and max(map(len, records.values())) < 900_000
    assert len(outbox.read(records).alerts) == 1000
    rows = {ALERTS: result.rows[ALERTS] * 2000, BILLING: result.rows[BILLING] * 1000}
    records = outbox.row_records("f1", outbox.by_partition(rows, lambda a: 0))
    assert max(map(len, records.values())) < 900_000
    assert {t: len(r) for t, r in outbox.read(records).rows.items()} == {ALERTS: 2000,
                                                                         BILLING: 2000}


class FailNth(Topic):
    """The state topic refuses its n-th write (1-based)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.seen = n, 0

    async def write_states(self, values: dict[bytes, bytes | None]) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.calls.append("states")
            raise ConnectionError("state topic unavailable")
        await super().write_states(values)


@pytest.mark.parametrize("how", ["revoke_and_keep", "successor"])
def test_an_alert_in_the_outbox_and_decided_again_is_published_once(how: str) -> None:
    # Step 2 is now two writes: the outbox (acked), then the alerting state (refused).
    out = FailNth(2)
    store, checkpoint, acked = worker(out)
    fold(store, checkpoint, "pack-1", history())
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    assert out.published == [] and b"acme" not in out.states
    if how == "revoke_and_keep":
        revoke_and_keep(out, store, checkpoint)
    else:
        store, checkpoint, acked = successor(out)
    # pack-1 is redelivered; acme's state was never stored, so it folds afresh and raises
    # the same alert that the outbox record also holds.
    again = fold(store, checkpoint, "pack-1", history())
    assert again.alerts
    asyncio.run(checkpoint.flush())
    assert acked == ["pack-1"]
    assert len(out.published) == 1, out.published


class HoldNth(Topic):
    """The n-th state-topic write waits until released (a slow broker)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.seen = n, 0
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def write_states(self, values: dict[bytes, bytes | None]) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.entered.set()
            await self.release.wait()
        await super().write_states(values)


def test_a_read_back_waits_for_a_flush_that_outlived_the_revoke() -> None:
    """The drain timed out while flush A stores (the state topic slow); the kept partition
    is read back only after A: else the read sees A's alert record but not A's state, and
    A, the read-back outbox and the redelivered pack would each publish the alert."""

    async def run() -> tuple[Topic, list[Any]]:
        out = HoldNth(2)  # the outbox is written, the alerting state is held
        store, checkpoint, acked = worker(out)
        fold(store, checkpoint, "pack-1", history())
        a = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()
        assert checkpoint.revoked()  # running == 1: reload_all
        checkpoint.pending.take()
        store.forget()
        store.data.clear()

        async def read_back() -> None:  # as _load: after the flush from before the revoke
            assert await checkpoint.settled(5.0)
            load(out, store, checkpoint)

        reading = asyncio.ensure_future(read_back())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not reading.done()  # waits for A
        out.release.set()
        await a  # A goes on: stores, publishes, writes ClickHouse, acks pack-1 (late)
        await reading  # reads A's state and no alert record (A deleted it)
        # pack-1 was refetched from the committed offset at the assignment
        fold(store, checkpoint, "pack-1", history())
        await checkpoint.flush()
        return out, acked

    out, acked = asyncio.run(run())
    assert len(out.published) == 1, out.published


class Outage(Topic):
    """ClickHouse: the first insert is held, then it and the next one fail; then it is back."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.inserts = 0

    async def delete_account(self, account: str) -> dict[str, int]:
        self.calls.append("delete")
        return {}

    async def forgotten(self, done: list[Any]) -> None:
        self.calls.append("forgotten")

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
        self.inserts += 1
        if self.inserts == 1:
            self.entered.set()
            await self.release.wait()
        if self.inserts <= 2:
            raise ConnectionError("ClickHouse unavailable")
        return await super().write_rows(rows)


def test_rows_after_a_carried_out_forget_survive_when_both_flushes_fail() -> None:
    """Z carries a forget (deletes acme, then its insert fails: the request, carried out,
    goes back to pending). Y took acme's new events after the forget and fails too: its
    rows are the account's new life and must not be filtered as the forgotten one's."""
    from tests.unit.test_forget import forget_item, home

    async def run() -> Outage:
        p = home("acme")
        out = Outage()
        store, checkpoint, acked = worker(out)
        checkpoint.add(fold_step(store, pack([forget_item("account", "acme", "states")]), p,
                                 1, POLICY, PartitionClock()), ["pack-1"], p)
        z = asyncio.ensure_future(checkpoint.flush())  # deletes acme, then writes CH
        await out.entered.wait()
        checkpoint.add(fold_step(store, pack(history()), p, 2, POLICY, PartitionClock()),
                       ["pack-2"], p)  # acme starts afresh after the forget
        y = asyncio.ensure_future(checkpoint.flush())
        for _ in range(50):
            await asyncio.sleep(0)
        assert "alerts" in out.calls  # Y stored and published; waits for Z to write
        out.release.set()
        await asyncio.gather(z, y, return_exceptions=True)
        await checkpoint.flush()  # ClickHouse is back
        assert sorted(acked) == ["pack-1", "pack-2"]
        return out

    out = asyncio.run(run())
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]
    assert sorted(r[1] for r in out.written("billing_events_data")) == ["b1", "b2"]


def test_a_later_flush_leaves_its_packs_to_be_acked_after_those_of_a_failed_one() -> None:
    async def run() -> tuple[list[Any], Any]:
        out = Held("rows")
        store, checkpoint, acked = worker(out)
        fold(store, checkpoint, "pack-1", [["usage/0", 1, usage(1, 1)]])
        first = asyncio.ensure_future(checkpoint.flush())
        await out.entered.wait()  # the first flush writes ClickHouse...
        fold(store, checkpoint, "pack-2", [["usage/0", 2, usage(2, 1, "globex")]])
        second = asyncio.ensure_future(checkpoint.flush())  # ...the second stores meanwhile
        for _ in range(20):
            await asyncio.sleep(0)
        out.fail = "rows"
        out.release.set()
        with pytest.raises(ConnectionError):
            await first
        out.fail = None
        out.hold = ""
        assert await second == 0 and acked == []  # pack-1 waits again: pack-2 not before it
        assert await checkpoint.flush() == 2
        return acked, checkpoint

    acked, checkpoint = asyncio.run(run())
    assert acked == ["pack-1", "pack-2"] and not checkpoint.pending.restored


def test_an_outbox_record_that_cannot_be_read_is_reported_not_raised() -> None:
    out = Topic()
    store, checkpoint, _ = worker(out)
    result = fold(store, checkpoint, "pack-1", history())
    records = {**outbox.row_records("f1", outbox.by_partition(
        {ALERTS: result.rows[ALERTS]}, lambda a: 0)), **outbox.alert_records("f1", result.alerts)}
    bad = {outbox.PREFIX + b"0/f0/x": outbox.MAGIC + b"not json",
           outbox.PREFIX + b"0/f0/y": outbox.MAGIC + b'{"table": "nope", "rows": [[1]]}',
           outbox.PREFIX + b"0/f0/z": outbox.MAGIC + b'{"alerts": [{"alert": {}}]}'}
    found = outbox.read({**records, **bad})
    assert set(found.unreadable) == set(bad)
    assert len(found.rows[ALERTS]) == 1 and len(found.alerts) == 1  # the rest is read
    assert not set(bad) & {*found.row_keys, *found.alert_keys}  # never deleted unread


def test_an_alert_only_flush_publishes_and_leaves_rows_and_acks_to_the_next() -> None:
    # Alerts waiting before the rows are due: the alert and the states go out, ClickHouse
    # waits for the interval (one insert per table, not one per alert).
    out = Topic()
    store, checkpoint, acked = worker(out)
    fold(store, checkpoint, "pack-1", history())
    assert checkpoint.due_for(50_000, 60.0) == "alerts"
    since = checkpoint.pending.since
    decided = checkpoint.latest_alert("acme")  # decided, waiting for the flush
    assert decided is not None
    assert asyncio.run(checkpoint.flush(write=False)) == 0
    assert len(out.published) == 1 and acked == [] and out.rows == []
    # Published, its row not written: an ack right now still names it.
    assert checkpoint.latest_alert("acme") == out.published[0] == decided
    assert checkpoint.latest_alert("globex") is None
    assert out.states.get(b"acme") is not None  # the state is stored with the alert
    # Its outbox records stay until the rows are written.
    assert [k for k in out.compacted() if k.startswith(outbox.PREFIX)]
    assert checkpoint.pending.since == since  # the rows do not wait longer for it
    assert checkpoint.due_for(50_000, 60.0) is None  # nothing but rows waits now
    assert checkpoint.due_for(50_000, 0.0) == "rows"
    fold(store, checkpoint, "pack-2", [["usage/0", 99, usage(99, 0.001, "globex")]])
    assert asyncio.run(checkpoint.flush()) == 2 and acked == ["pack-1", "pack-2"]
    assert checkpoint.latest_alert("acme") is None  # in ClickHouse now
    assert len(out.published) == 1
    assert len(out.written(ALERTS)) == 1
    assert sorted(r[1] for r in out.written(BILLING)) == ["b1", "b2"]
    assert sorted(r[0] for r in out.written(SCORES)) == ["acme", "globex"]
    # Every day the two packs touched, acme's from the states the first flush stored.
    assert {r[0] for r in out.written("account_daily_data")} == {"acme", "globex"}
    assert len(out.written("account_daily_data")) == 23  # acme: 22 days, globex: 1
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]


def test_while_clickhouse_is_backed_off_from_only_alerts_are_due() -> None:
    # The agent passes writable=False until the sink's back-off is over: rows wait for it,
    # alerts decided meanwhile do not (they and their rows' outbox records are stored).
    out = Topic()
    store, checkpoint, acked = worker(out)
    fold(store, checkpoint, "pack-1", [["usage/0", 5, usage(5, 1, "globex")]])
    out.fail = "rows"
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    assert checkpoint.due_for(50_000, 0.0) == "rows"
    assert checkpoint.due_for(1, 60.0, writable=False) is None  # only rows wait
    fold(store, checkpoint, "pack-2", history())
    checkpoint.started -= 1.0  # the failed flush began a second ago
    assert checkpoint.due_for(50_000, 0.0, writable=False) == "alerts"
    assert asyncio.run(checkpoint.flush(write=False)) == 0
    assert len(out.published) == 1 and acked == [] and out.rows == []
    assert [k for k in out.compacted() if k.startswith(outbox.PREFIX)]
    out.fail = None  # ClickHouse is back: the next flush writes everything and acks in order
    assert checkpoint.due_for(50_000, 0.0) == "rows"
    assert asyncio.run(checkpoint.flush()) == 2 and acked == ["pack-1", "pack-2"]
    assert len(out.written(ALERTS)) == 1 and len(out.published) == 1
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]


def test_a_crash_after_an_alert_only_flush_repeats_no_alert_and_loses_no_row() -> None:
    out = Topic()
    store, checkpoint, _ = worker(out)
    fold(store, checkpoint, "pack-1", history())
    asyncio.run(checkpoint.flush(write=False))
    # The worker dies before the rows' flush; the successor reads back the states and the
    # outbox, and the pack (never acked) comes again as duplicates.
    store, checkpoint, acked = successor(out)
    again = fold(store, checkpoint, "pack-1", history())
    assert again.applied == 0 and not again.alerts
    assert asyncio.run(checkpoint.flush()) == 1 and acked == ["pack-1"]
    assert len(out.published) == 1
    assert len(out.written(ALERTS)) == 1
    assert sorted(r[1] for r in out.written(BILLING)) == ["b1", "b2"]
    assert [r[0] for r in out.written(SCORES)] == ["acme"]
    assert not [k for k in out.compacted() if k.startswith(outbox.PREFIX)]
