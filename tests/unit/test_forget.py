"""Forgetting an account or a user: the fold, the store and the checkpoint, without Kafka."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from churnsignal.app.forget import ForgetReport, request_body
from churnsignal.schemas import identity, intercom
from churnsignal.stream import packs
from churnsignal.stream.checkpoint import Checkpoint
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.fold import SCORES, fold_step
from churnsignal.stream.identity import IdentityState
from churnsignal.stream.state import USERS, id_hash
from churnsignal.stream.store import MemoryStateStore
from tests.unit.test_fold import NOW, POLICY, Recorder, pack, usage

PARTITIONS = 4


def forget_item(kind: str, subject: str, phase: str) -> list[Any]:
    body = request_body(kind, subject, PARTITIONS, f"r-{kind}-{phase}", phase, NOW)  # type: ignore[arg-type]
    return packs.control_item(packs.FORGET, body)


def home(key: str) -> int:
    return packs.partition_for(key, PARTITIONS)


def checkpointed(store: MemoryStateStore) -> None:
    """As a flush would: the changed states become the stored bytes."""
    store.stored(store.take_dirty())


def events(store: MemoryStateStore, account: str) -> int:
    state = store.get(account)
    return 0 if state is None else state.seq


def test_a_forget_drops_what_came_before_it_and_what_comes_after_starts_afresh() -> None:
    p = home("acme")
    store = MemoryStateStore(PARTITIONS)
    fold_step(store, pack([["u/0", n, usage(n, 3)] for n in range(1, 4)]), p, 1, POLICY,
              PartitionClock())
    checkpointed(store)  # stored history, as after earlier flushes
    result = fold_step(store, pack([
        ["u/0", 4, usage(4, 1)],  # in the pipeline before the request: forgotten too
        forget_item("account", "acme", "states"),
        ["u/0", 5, usage(5, 0.5)],  # after it: a new state
    ]), p, 2, POLICY, PartitionClock())
    assert events(store, "acme") == 1
    assert [row[0] for row in result.rows[SCORES]] == ["acme"]  # the new state's only
    [done] = result.forgotten
    assert (done.account, done.states, done.partition) == ("acme", 1, p)
    # the tombstone is not written: the new state replaces it on the state topic
    assert store.take_dirty().keys() == {b"acme"}


def test_a_deleted_key_reads_as_unknown_until_its_tombstone_is_stored() -> None:
    p = home("acme")
    store = MemoryStateStore(PARTITIONS)
    fold_step(store, pack([["u/0", 1, usage(1, 1)]]), p, 1, POLICY, PartitionClock())
    checkpointed(store)
    fold_step(store, pack([forget_item("account", "acme", "states")]), p, 2, POLICY,
              PartitionClock())
    assert store.get("acme") is None and store.peek("acme") is None
    assert "acme" not in store.keys_in(p)
    values = store.take_dirty()
    assert values == {b"acme": None}
    assert store.get("acme") is None  # while the tombstone is on its way
    store.stored(values)
    assert b"acme" not in store.data and not store.gone
    # A rebalance before the ack: the stored bytes are the truth again (the request is
    # redelivered and carried out by the next owner).
    fold_step(store, pack([["u/0", 2, usage(2, 1)]]), p, 3, POLICY, PartitionClock())
    checkpointed(store)
    fold_step(store, pack([forget_item("account", "acme", "states")]), p, 4, POLICY,
              PartitionClock())
    store.forget()
    assert events(store, "acme") == 1


def test_forgetting_twice_is_harmless() -> None:
    p = home("acme")
    store = MemoryStateStore(PARTITIONS)
    fold_step(store, pack([["u/0", 1, usage(1, 1)]]), p, 1, POLICY, PartitionClock())
    first = fold_step(store, pack([forget_item("account", "acme", "states")]), p, 2, POLICY,
                      PartitionClock())
    second = fold_step(store, pack([forget_item("account", "acme", "states")]), p, 3, POLICY,
                       PartitionClock())
    assert first.forgotten[0].states == 1 and second.forgotten[0].states == 0
    assert second.forgotten[0].account == "acme"  # its rows are looked for again
    # Only the home partition deletes the account (others only confirm).
    other = (p + 1) % PARTITIONS
    elsewhere = fold_step(store, pack([forget_item("account", "acme", "states")]), other, 4,
                          POLICY, PartitionClock())
    assert elsewhere.forgotten[0].account is None


def _identity(store: MemoryStateStore, key: str, link: str | None, parked: int = 0) -> None:
    state = IdentityState(key, link, next=3, hw={"u/0": 7})
    state.parked = [[NOW, {"event_id": f"p{i}"}, "u/0", i] for i in range(parked)]
    store.put_identity(state)


def _phase(store: MemoryStateStore, kind: str, subject: str, phase: str) -> list[Any]:
    done = []
    for p in range(PARTITIONS):
        result = fold_step(store, pack([forget_item(kind, subject, phase)]), p, 1, POLICY,
                           PartitionClock())
        done.extend(result.forgotten)
    return done


def test_an_account_forgets_the_identities_linking_to_it() -> None:
    store = MemoryStateStore(PARTITIONS)
    user, anon = identity.segment_user("u1"), identity.segment_anonymous("a1")
    customer, other = identity.stripe_customer("cus_1"), identity.segment_user("u2")
    _identity(store, user, "acme")
    _identity(store, customer, "acme")
    _identity(store, anon, user)  # a visitor of the user: the user's, not the account's
    _identity(store, other, "globex")
    checkpointed(store)
    done = _phase(store, "account", "acme", "identities")
    assert sum(d.identities for d in done) == 2 and len(done) == PARTITIONS
    assert store.peek_identity(user) is None and store.peek_identity(customer) is None
    assert store.peek_identity(anon) is not None and store.peek_identity(other) is not None


def test_a_user_forgets_its_keys_visitors_and_waiting_events_and_its_traces() -> None:
    store = MemoryStateStore(PARTITIONS)
    user, anon, zendesk = (identity.segment_user("u1"), identity.segment_anonymous("a1"),
                           identity.zendesk_user("u1"))
    _identity(store, user, "acme")
    _identity(store, anon, user)
    _identity(store, zendesk, None, parked=2)  # a ticket waiting for its organisation
    _identity(store, identity.segment_user("u2"), "acme")
    # acme has seen u1 directly and through its identity's forwards
    fold_step(store, pack([["u/0", 1, {**usage(1, 0.2), "user_id": "u1"}],
                           ["u/0", 2, {**usage(2, 0.1), "user_id": "u2"}],
                           [user, 2, {**usage(3, 0.1), "user_id": "u1"}]]),
              home("acme"), 1, POLICY, PartitionClock())
    checkpointed(store)
    state = store.get("acme")
    assert state is not None and user in state.hw
    day = max(state.day_users)
    assert state.days[day][USERS] == 2

    done = _phase(store, "user", "u1", "identities")
    assert sum(d.identities for d in done) == 3 and sum(d.parked for d in done) == 2
    assert all(store.peek_identity(k) is None for k in (user, anon, zendesk))
    assert store.peek_identity(identity.segment_user("u2")) is not None

    done = _phase(store, "user", "u1", "states")
    assert sum(d.scrubbed for d in done) == 1 and not any(d.account for d in done)
    state = store.get("acme")
    assert state is not None and user not in state.hw
    assert id_hash("u1") & 0xFFFFFFFF not in state.day_users[day]
    assert id_hash("u2") & 0xFFFFFFFF in state.day_users[day]
    assert state.days[day][USERS] == 2  # an aggregate: it stays
    # The user's new identity restarts its sequence at 0 and is not skipped as a duplicate.
    fold_step(store, pack([[user, 0, {**usage(9, 0.05), "user_id": "u1"}]]), home("acme"), 2,
              POLICY, PartitionClock())
    assert events(store, "acme") == 4


def test_a_user_forgets_its_intercom_contact_as_it_does_its_segment_user() -> None:
    """An Intercom contact is a person like a Segment user: `forget user` deletes its key
    (``~intercom:contact:<id>``, with the conversations waiting under it for a company),
    linked or not, and its forwarding high-water in the account it was linked to."""
    store = MemoryStateStore(PARTITIONS)
    contact, waiting = intercom.contact_key("c1"), intercom.contact_key("c2")
    assert contact == "~intercom:contact:c1"
    _identity(store, contact, "acme")
    _identity(store, waiting, None, parked=3)  # conversations waiting for c2's company
    _identity(store, intercom.contact_key("c3"), "acme")
    fold_step(store, pack([[contact, 2, {**usage(1, 0.2), "user_id": "c1"}]]), home("acme"), 1,
              POLICY, PartitionClock())
    checkpointed(store)
    state = store.get("acme")
    assert state is not None and contact in state.hw

    done = _phase(store, "user", "c1", "identities")
    assert sum(d.identities for d in done) == 1 and sum(d.parked for d in done) == 0
    assert store.peek_identity(contact) is None
    assert store.peek_identity(waiting) is not None  # another person's
    done = _phase(store, "user", "c2", "identities")
    assert sum(d.identities for d in done) == 1 and sum(d.parked for d in done) == 3
    assert store.peek_identity(waiting) is None
    assert store.peek_identity(intercom.contact_key("c3")) is not None

    done = _phase(store, "user", "c1", "states")
    assert sum(d.scrubbed for d in done) == 1
    state = store.get("acme")
    assert state is not None and contact not in state.hw
    assert id_hash("c1") & 0xFFFFFFFF not in state.day_users[max(state.day_users)]


class ForgetRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, list[Any]]] = []
        self.confirmed: list[Any] = []

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
        self.rows.append({t: list(r) for t, r in rows.items() if r})
        return await super().write_rows(rows)

    async def delete_account(self, account: str) -> dict[str, int]:
        self._call("delete")
        return {"account_daily_data": 3}

    async def forgotten(self, done: list[Any]) -> None:
        self._call("forgotten")
        self.confirmed.extend(done)


def test_the_checkpoint_deletes_rows_first_confirms_last_and_deletes_once() -> None:
    p = home("acme")
    store = MemoryStateStore(PARTITIONS)
    out = ForgetRecorder()
    acked: list[Any] = []

    async def ack(events: list[Any]) -> None:
        acked.extend(events)

    checkpoint = Checkpoint(store, out, "ingested", PARTITIONS, ack)
    before = fold_step(store, pack([["u/0", 1, usage(1, 1)], ["u/0", 2, usage(2, 1, "globex")]]),
                       p, 1, POLICY, PartitionClock())
    checkpoint.add(before, ["pack-1"], p)
    forgotten = fold_step(store, pack([forget_item("account", "acme", "states"),
                                       ["u/0", 3, usage(3, 0.5)]]), p, 2, POLICY,
                          PartitionClock())
    checkpoint.add(forgotten, ["pack-2"], p)
    out.fail = "forgotten"
    with pytest.raises(ConnectionError):
        asyncio.run(checkpoint.flush())
    assert out.calls == ["delete", "states", "rows", "forgotten"] and acked == []
    # acme's rows from before the request never reach ClickHouse; the new state's do
    scores = [row[0] for row in out.rows[0][SCORES]]
    assert sorted(scores) == ["acme", "globex"]
    daily = {row[0]: row[2] for row in out.rows[0]["account_daily_data"]}
    assert daily == {"acme": 1, "globex": 1}

    out.fail, out.calls = None, []
    assert asyncio.run(checkpoint.flush()) == 2
    # not deleted again: that would take the new state's rows written by the first attempt
    assert out.calls == ["rows", "forgotten"] and acked == ["pack-1", "pack-2"]
    assert [(d.account, d.rows, d.states) for d in out.confirmed] == [
        ("acme", {"account_daily_data": 3}, 1)]


def test_the_command_sums_up_the_confirmations() -> None:
    report = ForgetReport("r1", "account", "acme")
    report.add({"identities": 2, "parked": 1})
    report.add({"states": 1, "rows": {"alerts_data": 2, "account_daily_data": 3}})
    assert report.as_dict()["rows_total"] == 5 and report.confirmations == 2
    text = "\n".join(report.lines())
    assert "account state      1 deleted" in text and "5 deleted" in text
    user = request_body("user", "u1", PARTITIONS, "r2", "identities", NOW)
    assert user["keys"] == [identity.segment_user("u1"), identity.segment_anonymous("u1"),
                            identity.zendesk_user("u1"), intercom.contact_key("u1")]
    with pytest.raises(Exception, match="not an account id"):
        request_body("account", "~segment:user:u1", PARTITIONS, "r3", "states", NOW)


def test_no_clickhouse_table_holds_anything_per_user() -> None:
    """Why `forget user` deletes no ClickHouse row: no table has a user column (the daily
    active_users is a count)."""
    import re

    from churnsignal.sinks import ddl

    tables = [s for s in ddl.statements() if s.lstrip().startswith("CREATE TABLE")]
    columns = {name for s in tables
               for name in re.findall(r"(?:\(|,)\s*(\w+) [A-Z]", s.split(") ENGINE")[0])}
    assert "account_id" in columns and "active_users" in columns
    assert [c for c in columns if "user" in c or "anonymous" in c or "requester" in c] == [
        "active_users"]
