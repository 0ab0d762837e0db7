"""Folding packs (stream.fold), the state store and the checkpoint's order, without Kafka."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from churnsignal.stream import fold as fold_module
from churnsignal.stream import packs, patches
from churnsignal.stream.checkpoint import Checkpoint
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.engine import apply_batch, rescore
from churnsignal.stream.fold import BILLING, fold_step
from churnsignal.stream.policy import Policy
from churnsignal.stream.state import DAY, AccountState
from churnsignal.stream.store import MemoryStateStore

POLICY = Policy()
NOW = 1_764_000_000.0


def usage(n: int, age_days: float, account: str = "acme") -> dict[str, Any]:
    return {"event_id": f"e{n}", "account_id": account, "type": "feature_used",
            "user_id": f"u{n % 3}", "schema_version": 1,
            "occurred_at": datetime.fromtimestamp(NOW - age_days * DAY, tz=UTC).isoformat(),
            "data": {"feature": f"f{n % 4}", "name": "Report Exported", "count": 1}}


def pack(items: list[list[Any]], now: float = NOW) -> dict[str, Any]:
    return packs.decode(packs.encode(now, items))


def state_bytes(store: MemoryStateStore, account: str) -> bytes:
    state = store.get(account)
    assert state is not None
    return state.to_bytes()


def poisoned(monkeypatch: pytest.MonkeyPatch, poison: str) -> None:
    """A fold that changes the state and then fails on one event id, as a bug would."""
    real = fold_module.apply_batch

    def apply(state: AccountState | None, account: str, items: Any, wall: float,
              policy: Policy) -> Any:
        out = real(state, account, items, wall, policy)
        if any(event.event_id == poison for _, _, event in items):
            raise OverflowError("date value out of range")
        return out

    monkeypatch.setattr(fold_module, "apply_batch", apply)


@pytest.mark.interpreted_only
def test_a_record_that_cannot_be_folded_fails_alone_and_leaves_no_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    earlier = [["usage.events/0", n, usage(n, 20 - n)] for n in range(1, 6)]
    step = [["usage.events/0", 6, usage(6, 3)], ["usage.events/1", 7, usage(7, 2)],
            ["usage.events/0", 8, usage(8, 1)]]
    # What the state must be: the earlier pack, then the step without the poisoned record.
    clean = MemoryStateStore(4)
    fold_step(clean, pack(earlier), 0, 10, POLICY, PartitionClock())
    fold_step(clean, pack([step[0], step[2]]), 0, 11, POLICY, PartitionClock())

    poisoned(monkeypatch, "e7")
    store = MemoryStateStore(4)
    fold_step(store, pack(earlier), 0, 10, POLICY, PartitionClock())  # dirty: not stored yet
    result = fold_step(store, pack(step), 0, 11, POLICY, PartitionClock())
    assert [(f.reason, f.source, f.offset, f.data["event_id"]) for f in result.failures] == [
        ("processing_error", "usage.events/1", 7, "e7")]
    assert "OverflowError" in result.failures[0].detail
    assert result.applied == 2
    assert state_bytes(store, "acme") == state_bytes(clean, "acme")


@pytest.mark.interpreted_only
def test_a_failed_fold_of_a_stored_state_goes_back_to_the_stored_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStateStore(4)
    fold_step(store, pack([["usage.events/0", 1, usage(1, 5)]]), 0, 1, POLICY, PartitionClock())
    store.stored(store.take_dirty())  # a checkpoint: the state is stored, nothing dirty
    before = state_bytes(store, "acme")
    poisoned(monkeypatch, "e2")
    result = fold_step(store, pack([["usage.events/0", 2, usage(2, 1)]]), 0, 2, POLICY,
                       PartitionClock())
    assert len(result.failures) == 1 and result.applied == 0
    assert state_bytes(store, "acme") == before and not store.dirty


@pytest.mark.interpreted_only
def test_other_accounts_of_the_pack_are_folded_as_usual(monkeypatch: pytest.MonkeyPatch) -> None:
    poisoned(monkeypatch, "e1")
    store = MemoryStateStore(4)
    result = fold_step(store, pack([["u/0", 1, usage(1, 1, "acme")],
                                    ["u/0", 2, usage(2, 1, "globex")]]), 0, 1, POLICY,
                       PartitionClock())
    assert [f.data["account_id"] for f in result.failures] == ["acme"]
    assert store.get("acme") is None  # never seen
    globex = store.get("globex")
    assert globex is not None and globex.seq == 1


def test_clone_copies_every_mutable_field() -> None:
    state = apply_batch(None, "acme", [("u/0", n, packs.event_of(usage(n, n % 5)))
                                       for n in range(20)], NOW, POLICY).state
    state.failed_payments, state.reopened, state.slow_resolutions = [1.0], [2.0], [3.0]
    state.open_tickets, state.mrr_peak = {"t": 1}, [[1.0, 2.0]]
    copy = state.clone()
    assert copy == state and copy.to_bytes() == state.to_bytes()
    for name in (f.name for f in dataclasses.fields(AccountState)):
        value = getattr(state, name)
        if isinstance(value, list | dict):
            assert getattr(copy, name) is not value, name
    next(iter(copy.days.values()))[0] += 1
    assert copy != state


def test_billing_events_older_than_the_horizon_become_rows_and_never_state() -> None:
    old = {"event_id": "evt_old", "account_id": "acme", "type": "subscription_deleted",
           "schema_version": 1, "occurred_at": "2019-05-01T00:00:00+00:00",
           "data": {"status": "canceled", "previous_mrr_cents": 4900,
                    "cancellation_reason": "payment_failed"}}
    orphan = {**old, "event_id": "evt_orphan", "account_id": "~segment:user:u9"}
    customer = {**old, "event_id": "evt_cus", "account_id": "~stripe:customer:cus_1"}
    store = MemoryStateStore(4)
    result = fold_step(store, pack([["billing.events/0", 1, old, packs.HISTORY],
                                    ["billing.events/0", 2, orphan, packs.HISTORY],
                                    ["billing.events/0", 3, customer, packs.HISTORY]]),
                       0, 1, POLICY, PartitionClock())
    rows = result.rows[BILLING]
    assert [(r[0], r[1], r[4], r[7], r[13], r[14]) for r in rows] == [
        ("acme", "evt_old", "canceled", 4900, True, 0),
        ("cus_1", "evt_cus", "canceled", 4900, True, 0)]  # a Stripe customer is its account
    assert [(f.reason, f.offset) for f in result.failures] == [("unattributed_history", 2)]
    assert result.history == 2 and not store.cache and not store.dirty


@dataclass
class Refused:
    table: str
    row: tuple[object, ...]
    error: str


class Recorder:
    """Checkpoint outputs that record what was written, in order; one step may fail."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: str | None = None
        self.refuse: list[Refused] = []
        self.letters: list[Any] = []
        self.states: dict[bytes, bytes | None] = {}

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            raise ConnectionError(f"{name} unavailable")

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
        self._call("rows")
        return self.refuse

    async def dead_letter(self, letters: list[Any]) -> None:
        self._call("dlq")
        self.letters += letters

    async def forward(self, forwards: Any) -> None:
        self._call("forward")

    async def publish(self, alerts: list[Any]) -> None:
        self._call("alerts")

    async def write_states(self, values: dict[bytes, bytes | None]) -> None:
        self._call("states")
        self.states.update(values)


@pytest.mark.interpreted_only
def test_a_checkpoint_writes_in_order_and_acks_only_what_is_durable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    poisoned(monkeypatch, "e2")
    store = MemoryStateStore(4)
    out = Recorder()
    acked: list[Any] = []

    async def ack(events: list[Any]) -> None:
        acked.extend(events)

    checkpoint = Checkpoint(store, out, "ingested", 4, ack)
    result = fold_step(store, pack([["usage.events/0", 1, usage(1, 1)],
                                    ["usage.events/3", 2, usage(2, 1)]]), 2, 40, POLICY,
                       PartitionClock())
    checkpoint.add(result, ["pack-40"], 2)
    # The state topic is down: the fold's dead letter went first (its event is in no state
    # stored), then nothing else; the packs stay unacked, the state is written again.
    out.fail = "states"
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    assert out.calls == ["dlq", "states"] and acked == []
    assert store.dirty == {"acme"}  # written again by the next flush
    # the dead letter: the failed event alone, with its source
    [letter] = out.letters
    state_letter = dict(letter.headers())
    assert letter.reason == "processing_error"
    assert state_letter["dlq_topic"] == b"usage.events" and state_letter["dlq_partition"] == b"3"
    assert state_letter["dlq_offset"] == b"2" and state_letter["dlq_step"] == b"state"
    assert b'"event_id":"e2"' in letter.value
    assert set(state_letter) >= {"dlq_reason", "dlq_detail", "dlq_timestamp"}

    # Then ClickHouse refuses two rows for good: they go to the DLQ with their table, after
    # the states (stored first) and the rows; the pack is acked.
    out.fail, out.calls = None, []
    out.refuse = [Refused("account_scores_data", ("acme", "x"), "Value out of range"),
                  Refused("alerts_data", ("alert-1", "acme", "escalated"), "Bad band")]
    assert asyncio.run(checkpoint.flush()) == 1
    assert out.calls == ["states", "rows", "dlq"] and acked == ["pack-40"]
    assert b"acme" in out.states and not store.dirty
    refused = [d for d in out.letters if d.reason == "sink_rejected"]
    assert [dict(d.headers())["dlq_table"] for d in refused] == [b"account_scores_data",
                                                                 b"alerts_data"]
    assert [d.key for d in refused] == [b"acme", b"acme"]  # the account, whatever the table


def test_every_private_attribute_churnsignal_patches_is_still_there() -> None:
    assert patches.check() == []


def test_an_identity_that_never_joins_expires_to_the_dlq_and_is_tombstoned() -> None:
    from churnsignal.stream.fold import IdentityLimits

    key = "~segment:user:u9"
    partition = packs.partition_for(key, 4)
    store = MemoryStateStore(4)
    out = Recorder()

    async def ack(events: list[Any]) -> None:
        pass

    checkpoint = Checkpoint(store, out, "ingested", 4, ack)
    limits = IdentityLimits(ttl_s=3600)
    parked = fold_step(store, pack([["usage.events/2", 5, usage(5, 0.1, key)]]), partition, 1,
                       POLICY, PartitionClock(), limits)
    checkpoint.add(parked, ["pack-1"], partition)
    asyncio.run(checkpoint.flush())
    assert out.states[key.encode()] is not None and store.may_wait(key)

    tick = fold_step(store, packs.decode(packs.encode_tick(NOW + 7200)), partition, 2, POLICY,
                     PartitionClock(), limits)
    [res] = tick.identities
    assert res.tombstone and [e[2]["event_id"] for e in res.expired] == ["e5"]
    checkpoint.add(tick, ["tick-2"], partition)
    asyncio.run(checkpoint.flush())
    [letter] = out.letters
    headers = dict(letter.headers())
    assert letter.reason == "unattributed_expired" and headers["dlq_step"] == b"identity"
    assert headers["dlq_topic"] == b"usage.events" and headers["dlq_offset"] == b"5"
    assert out.states[key.encode()] is None  # the tombstone
    assert key.encode() not in store.data and key not in store.cache


def test_a_tick_in_slices_rescores_as_the_whole_tick_does() -> None:
    from churnsignal.stream.fold import SCORES, tick_steps

    def stored_accounts() -> MemoryStateStore:
        store = MemoryStateStore(1)
        items = [["usage.events/0", n, usage(n, 40 - n % 30, f"acct-{n % 2500}")]
                 for n in range(5000)]
        fold_step(store, pack(items), 0, 1, POLICY, PartitionClock())
        # read back, as a restarted worker holds them (a tick then writes the score rows
        # of the accounts whose score or band moved)
        loaded = MemoryStateStore(1)
        loaded.load({k: v for k, v in store.take_dirty().items() if v is not None})
        return loaded

    def states(store: MemoryStateStore) -> dict[str, bytes]:
        return {k: state_bytes(store, k) for k in store.keys_in(0)}

    wall = NOW + 20 * DAY  # silence: scores move
    tick = packs.decode(packs.encode_tick(wall))
    # The reference, independent of the tick's code: every account re-scored at the wall.
    reference = stored_accounts()
    changed = sum(rescore(state, wall, POLICY).score_changed
                  for k in reference.keys_in(0) if (state := reference.get(k)) is not None)
    whole_store, sliced_store = stored_accounts(), stored_accounts()
    whole = fold_step(whole_store, tick, 0, 2, POLICY, PartitionClock())
    parts = list(tick_steps(sliced_store, tick, 0, POLICY, PartitionClock(), size=1000))
    assert len(parts) == 3
    assert changed > 1000  # enough changed for every slice to matter
    sliced_rows = [row for part in parts for row in part.rows[SCORES]]
    assert len(sliced_rows) == changed and sliced_rows == whole.rows[SCORES]
    assert len([a for part in parts for a in part.alerts]) == len(whole.alerts)
    assert states(sliced_store) == states(reference) == states(whole_store)
    assert whole_store.take_dirty() == sliced_store.take_dirty()


def test_steps_group_a_partitions_packs_in_order_up_to_a_size_ticks_alone() -> None:
    from churnsignal.stream.fold import steps

    # (partition, name); "t" marks a tick
    batch = [(0, "a1"), (1, "b1"), (0, "a2"), (0, "a3"), (1, "t"), (1, "b2"), (0, "a4"),
             (0, "a5")]
    groups = steps(batch, lambda e: e[0], lambda e: e[1] == "t")
    assert [[e[1] for e in g] for g in groups] == [
        ["a1", "a2", "a3", "a4", "a5"], ["b1"], ["t"], ["b2"]]
    capped = steps(batch, lambda e: e[0], lambda e: e[1] == "t", max_packs=2)
    assert [[e[1] for e in g] for g in capped] == [
        ["a1", "a2"], ["b1"], ["a3", "a4"], ["t"], ["b2"], ["a5"]]
    # each partition's packs still come in their order, whatever the grouping
    for partition in (0, 1):
        assert [e for g in capped for e in g if e[0] == partition] == [
            e for e in batch if e[0] == partition]


def test_a_score_row_is_written_where_its_snapshot_changes_and_again_on_redelivery() -> None:
    """A score row when what it says (score in whole points, band, reasons, MRR, status,
    plan, policy) differs from the row before; a redelivered pack writes the current one
    again; a state read back writes one with its next batch."""
    from churnsignal.stream.fold import SCORES
    from churnsignal.stream.rows import snapshot_of

    def said(row: tuple[Any, ...]) -> tuple[Any, ...]:
        return round(row[2]), row[3], tuple(row[4]), row[5], row[6], row[7], row[9]

    def billing(n: int, kind: str, age_days: float, mrr: int) -> dict[str, Any]:
        return {"event_id": f"b{n}", "account_id": "acme", "type": kind, "schema_version": 1,
                "occurred_at": datetime.fromtimestamp(NOW - age_days * DAY, tz=UTC).isoformat(),
                "data": {"status": "active", "mrr_cents": mrr}}

    # live: one event a pack, over 40 days, the plan changing half way
    items: list[list[Any]] = [["billing.events/0", 0, billing(0, "subscription_created", 41,
                                                              9_900)]]
    for n in range(1, 61):
        items.append(["usage.events/0", n, usage(n, 40 - n * 0.66)])
        if n == 30:
            items.append(["billing.events/0", n, billing(n, "subscription_updated", 20, 12_900)])
    store = MemoryStateStore(4)
    written: list[list[Any]] = []
    for i, item in enumerate(items):
        written.append(fold_step(store, pack([item]), 0, i, POLICY, PartitionClock()).rows[
            SCORES])
    # The reference, folded apart: what each pack's snapshot is, and where it changes.
    reference, state = [], None
    for source, offset, data in items:
        out = apply_batch(state, "acme", [(source, offset, packs.event_of(data))], NOW, POLICY)
        state = out.state
        score_, band, codes, mrr, status, plan, policy, _ = snapshot_of(out)
        reference.append((score_, band, codes, mrr, status or "", plan or "", policy))
    changed = [i == 0 or reference[i] != reference[i - 1] for i in range(len(items))]
    assert [len(rows) for rows in written] == [int(c) for c in changed]
    assert 3 <= sum(changed) < len(items) - 10  # most packs move no whole point
    assert [said(rows[0]) for rows in written if rows] == [
        r for r, c in zip(reference, changed, strict=True) if c]
    assert any(c and reference[i][:3] == reference[i - 1][:3] for i, c in enumerate(changed)
               if i)  # e.g. the MRR alone
    # A redelivered pack (a duplicate): the current snapshot again.
    again = fold_step(store, pack([items[-1]]), 0, 99, POLICY, PartitionClock())
    assert again.duplicates == 1 and [said(r) for r in again.rows[SCORES]] == [reference[-1]]
    # Read back (a restart): the next batch writes a row; a tick that moves nothing does not.
    loaded = MemoryStateStore(4)
    loaded.load({k: v for k, v in store.take_dirty().items() if v is not None})
    tick = fold_step(loaded, packs.decode(packs.encode_tick(NOW)), 0, 100, POLICY,
                     PartitionClock())
    assert tick.batches == 1 and tick.rows[SCORES] == []
    after = fold_step(loaded, pack([["usage.events/0", 61, usage(61, 0.1)]]), 0, 101, POLICY,
                      PartitionClock())
    assert after.applied == 1 and len(after.rows[SCORES]) == 1


def test_a_shadow_policy_s_own_move_writes_a_snapshot_and_a_redelivery_keeps_reasons() -> None:
    """A shadow policy's score (whole points) and band are part of the snapshot; a pack
    redelivered writes the snapshot again with its reasons, not without them."""
    from churnsignal.stream.fold import SCORES
    from churnsignal.stream.rows import snapshot_of
    from churnsignal.stream.scoring import score
    from tests.unit.test_model import model

    # a model on the usage rate, which moves while the rules' score stays put
    shadow = Policy(version="shadow-x", model=model(["events_28d"], [-0.3], intercept=0.0))
    failed = {"event_id": "pf1", "account_id": "acme", "type": "payment_failed",
              "schema_version": 1,
              "occurred_at": datetime.fromtimestamp(NOW - 30 * DAY, tz=UTC).isoformat(),
              "data": {"invoice_id": "in_1", "amount_cents": 4_900, "next_attempt_at":
                       datetime.fromtimestamp(NOW - 27 * DAY, tz=UTC).isoformat()}}
    items: list[list[Any]] = [["billing.events/0", 0, failed]]  # a reason to keep
    items += [["usage.events/0", n, usage(n, 30 - n ** 1.5 * 0.06)]  # more and more use
              for n in range(1, 61)]
    store = MemoryStateStore(4)
    written = [fold_step(store, pack([item]), 0, i, POLICY, PartitionClock(),
                         shadow=shadow).rows[SCORES] for i, item in enumerate(items)]
    reference, state = [], None
    for source, offset, data in items:
        out = apply_batch(state, "acme", [(source, offset, packs.event_of(data))], NOW, POLICY)
        state = out.state
        reference.append(snapshot_of(out, score(state, state.scored_at, shadow)))
    changed = [i == 0 or reference[i] != reference[i - 1] for i in range(len(items))]
    assert [len(rows) for rows in written] == [int(c) for c in changed]
    assert any(c and reference[i][:-1] == reference[i - 1][:-1]
               for i, c in enumerate(changed) if i)  # the shadow's move alone
    last = [rows[0] for rows in written if rows][-1]
    assert last[4] and last[-1] == "shadow-x"  # reasons, and the shadow's name
    again = fold_step(store, pack([items[-1]]), 0, 99, POLICY, PartitionClock(), shadow=shadow)
    [row] = again.rows[SCORES]
    assert again.duplicates == 1 and row[4] == last[4] and row[2:4] == last[2:4]


def test_ticks_write_a_snapshot_where_it_changes_on_a_state_that_knows_its_last_row() -> None:
    """Silence moves a score tick after tick: a row at each tick whose snapshot differs from
    the one before, none at the others (the state was not read back: it knows its row)."""
    from churnsignal.stream.fold import SCORES
    from churnsignal.stream.rows import snapshot_of

    items = [["usage.events/0", n, usage(n, 30 - n * 0.5)] for n in range(40)]
    store = MemoryStateStore(1)
    assert len(fold_step(store, pack(items), 0, 0, POLICY, PartitionClock()).rows[SCORES]) == 1
    out = apply_batch(None, "acme", [(s, o, packs.event_of(d)) for s, o, d in items], NOW,
                      POLICY)
    reference, written = [snapshot_of(out)], []
    for k in range(1, 41):
        wall = NOW + k * DAY / 2
        tick = fold_step(store, packs.decode(packs.encode_tick(wall)), 0, k, POLICY,
                         PartitionClock())
        written.append(len(tick.rows[SCORES]))
        reference.append(snapshot_of(rescore(out.state, wall, POLICY)))
    assert written == [int(reference[k] != reference[k - 1]) for k in range(1, 41)]
    assert 2 <= sum(written) < 30
