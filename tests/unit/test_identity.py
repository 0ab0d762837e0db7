"""Identity links and parked events: who an event belongs to when it does not say (pure)."""

from __future__ import annotations

import orjson

from churnsignal.schemas import identity, segment, stripe
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Accepted, Skipped
from churnsignal.stream import packs
from churnsignal.stream.engine import fold
from churnsignal.stream.identity import (
    IdentityState,
    evict,
    expire,
    is_blank,
    link_item,
    resolve,
    settle,
    sweep,
    waiting_bytes,
)
from churnsignal.stream.policy import Limits, Policy
from churnsignal.stream.state import AccountState

NOW = 1_764_000_000.0
TTL = 7 * 86_400.0
# No event-id ring: the account dedups forwards by (identity, sequence) alone, as it must
# for any event older than the ring.
BY_SEQUENCE_ONLY = Policy(limits=Limits(dedup_ids=0))


def _event(n: int, account: str) -> dict[str, object]:
    return {"event_id": f"e{n}", "account_id": account, "type": "dispute_created",
            "occurred_at": "2025-11-24T00:00:00+00:00", "data": {}}


def test_events_wait_for_a_link_then_join_it_in_order() -> None:
    key = identity.stripe_charge("ch_1")
    state = IdentityState(key)
    first = resolve(state, [("billing/0", 5, _event(1, key)), ("billing/0", 6, _event(2, key))],
                    max_parked=10, wall=NOW)
    assert (first.parked, first.forwards) == (2, [])
    linked = resolve(state, [("billing/1", 3, link_item(key, "acme"))], max_parked=10, wall=NOW)
    assert linked.joined == 2
    assert [(t, src, k, d["event_id"], d["account_id"]) for t, src, k, d in linked.forwards] == [
        ("acme", key, 0, "e1", "acme"), ("acme", key, 1, "e2", "acme")]
    later = resolve(state, [("billing/0", 7, _event(3, key))], max_parked=10, wall=NOW)
    assert [(t, k) for t, _, k, _ in later.forwards] == [("acme", 2)]  # straight through now


def test_a_redelivered_pack_changes_nothing_and_state_round_trips() -> None:
    key = identity.segment_user("u1")
    state = IdentityState(key)
    resolve(state, [("usage/0", 1, _event(1, key))], max_parked=10, wall=NOW)
    state = IdentityState.from_bytes(state.to_bytes())
    again = resolve(state, [("usage/0", 1, _event(1, key))], max_parked=10, wall=NOW)
    assert not again.changed and [p[1] for p in state.parked] == [_event(1, key)]


def test_stripe_customer_falls_back_to_its_own_id_and_overflow_is_reported() -> None:
    customer = identity.stripe_customer("cus_9")
    state = IdentityState(customer)
    out = resolve(state, [("billing/0", 1, _event(1, customer))], 10, NOW)
    assert (out.parked, out.forwards) == (1, [])  # waits: a link may be on its way
    assert settle(state, NOW + 30, grace_s=60).forwards == []
    settled = settle(state, NOW + 60, grace_s=60)
    assert [t for t, *_ in settled.forwards] == ["cus_9"] and state.link == "cus_9"
    later = resolve(state, [("billing/0", 2, _event(2, customer))], 10, NOW + 61)
    assert [t for t, *_ in later.forwards] == ["cus_9"]  # no second wait
    user = identity.segment_user("u2")
    out = resolve(IdentityState(user), [("usage/0", i, _event(i, user)) for i in range(3)], 2, NOW)
    assert settle(IdentityState(user), NOW + 1e6).forwards == []  # a user has no fallback
    assert (out.parked, len(out.overflow)) == (2, 1)


def test_stripe_payloads_teach_links_and_route_to_identities() -> None:
    # A subscription with metadata names its account and links its customer to it.
    sub = {"id": "evt_1", "object": "event", "type": "customer.subscription.created",
           "created": int(NOW), "data": {"object": {
               "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
               "metadata": {"account_id": "acme"}, "items": {"data": []}}}}
    assert stripe.links(sub) == [(identity.stripe_customer("cus_1"), "acme")]
    # An invoice without metadata goes to its customer's identity and links its charge.
    invoice = {"id": "evt_2", "object": "event", "type": "invoice.payment_failed",
               "created": int(NOW), "data": {"object": {
                   "id": "in_1", "object": "invoice", "customer": "cus_1", "charge": "ch_1",
                   "amount_due": 5000, "currency": "usd", "attempt_count": 1,
                   "next_payment_attempt": int(NOW) + 86400}}}
    result = decode(orjson.dumps(invoice), DecodeOptions(), NOW)
    assert isinstance(result, Accepted)
    assert result.event.account_id == identity.stripe_customer("cus_1")
    assert result.links == ((identity.stripe_charge("ch_1"), identity.stripe_customer("cus_1")),)
    # A dispute names only its charge: it waits on the charge's identity.
    dispute = {"id": "evt_3", "object": "event", "type": "charge.dispute.created",
               "created": int(NOW), "data": {"object": {
                   "id": "dp_1", "object": "dispute", "charge": "ch_1", "amount": 5000,
                   "currency": "usd"}}}
    result = decode(orjson.dumps(dispute), DecodeOptions(), NOW)
    assert isinstance(result, Accepted)
    assert result.event.account_id == identity.stripe_charge("ch_1")
    # customer.updated is not a type churnsignal scores, but its metadata links the customer
    customer = {"id": "evt_4", "object": "event", "type": "customer.updated", "created": int(NOW),
                "data": {"object": {"id": "cus_2", "object": "customer",
                                    "metadata": {"account_id": "globex"}}}}
    result = decode(orjson.dumps(customer), DecodeOptions(), NOW)
    assert isinstance(result, Skipped)
    assert result.links == ((identity.stripe_customer("cus_2"), "globex"),)


def test_segment_group_identify_and_track_teach_user_links() -> None:
    group = {"type": "group", "messageId": "m1", "userId": "u1", "groupId": "acme",
             "anonymousId": "a1", "timestamp": "2025-11-24T00:00:00Z"}
    assert segment.links(group) == [(identity.segment_user("u1"), "acme"),
                                    (identity.segment_anonymous("a1"), "acme")]
    ident = {"type": "identify", "messageId": "m2", "userId": "u2", "anonymousId": "a2",
             "traits": {"company": {"id": "globex"}}, "timestamp": "2025-11-24T00:00:00Z"}
    assert segment.links(ident) == [(identity.segment_user("u2"), "globex"),
                                    (identity.segment_anonymous("a2"), "globex")]
    track = {"type": "track", "messageId": "m3", "userId": "u3", "event": "Report Viewed",
             "timestamp": "2025-11-24T00:00:00Z"}
    result = decode(orjson.dumps(track), DecodeOptions(), NOW)
    assert isinstance(result, Accepted)
    assert result.event.account_id == identity.segment_user("u3") and result.links == ()


def _usage(n: int, key: str) -> dict[str, object]:
    return {"event_id": f"u{n}", "account_id": key, "type": "feature_used", "user_id": "u1",
            "occurred_at": "2025-11-24T00:00:00+00:00", "data": {"feature": "api"}}


def _receive(account: AccountState | None, forwards: list[tuple[str, str, int, dict[str, object]]]
             ) -> tuple[AccountState, int, int]:
    """What the account does with forwarded items: (state, applied, skipped as duplicates)."""
    items = [(source, seq, packs.event_of(data)) for _, source, seq, data in forwards]
    out = fold(account, "acme", items, NOW, BY_SEQUENCE_ONLY)
    return out.state, out.applied, out.duplicates


def test_an_event_waits_at_most_the_ttl_and_a_never_joined_identity_is_tombstoned() -> None:
    key = identity.segment_user("u1")
    state = IdentityState(key)
    resolve(state, [("usage/0", 1, _event(1, key))], 10, NOW)
    resolve(state, [("usage/1", 7, _event(2, key))], 10, NOW + 100)
    state = IdentityState.from_bytes(state.to_bytes())  # the origin survives the store
    assert not expire(state, NOW + TTL - 1, TTL).changed
    first = expire(state, NOW + TTL, TTL)
    assert first.expired == [("usage/0", 1, _event(1, key))]  # source and offset for the DLQ
    assert (first.key, first.expired_by, first.tombstone, first.changed) == (
        key, "ttl", False, True)  # e2 still waits: the key stays
    last = expire(state, NOW + 100 + TTL, TTL)
    assert last.expired == [("usage/1", 7, _event(2, key))] and last.tombstone
    assert last.forwards == [] and state == IdentityState(key) and is_blank(state)


def test_a_joined_identity_is_kept_compact_and_never_tombstoned() -> None:
    key = identity.segment_user("u1")
    state = IdentityState(key)
    resolve(state, [("usage/0", 1, _event(1, key))], 10, NOW)
    assert waiting_bytes(state.to_bytes())
    resolve(state, [("usage/0", 2, link_item(key, "acme"))], 10, NOW)
    raw = state.to_bytes()
    # No events and nothing empty: link, next sequence and the sources' high-waters.
    assert orjson.loads(raw) == {"identity": key, "next": 1, "link": "acme",
                                 "hw": {"usage/0": 2}}
    assert len(raw) < 100 and not waiting_bytes(raw) and not is_blank(state)
    later = NOW + 100 * TTL
    assert not expire(state, later, TTL).changed
    assert sweep([state], later, 60, TTL, max_identities=0).resolutions == []
    assert IdentityState.from_bytes(raw) == state


def test_a_key_or_event_cannot_fake_the_waiting_marker() -> None:
    key = identity.segment_user('x"parked":1')
    state = IdentityState(key)
    resolve(state, [("usage/0", 1, link_item(key, "acme"))], 10, NOW)
    assert not waiting_bytes(state.to_bytes())


def test_records_written_before_the_origin_was_kept_still_read() -> None:
    key = identity.segment_user("u1")
    old = orjson.dumps({"identity": key, "link": None, "next": 0, "hw": {"usage/0": 1},
                        "parked": [[NOW, _event(1, key)]]})
    state = IdentityState.from_bytes(old)
    assert expire(state, NOW + TTL, TTL).expired == [(None, -1, _event(1, key))]


def test_a_stripe_customer_takes_its_fallback_instead_of_expiring() -> None:
    customer = identity.stripe_customer("cus_9")
    state = IdentityState(customer)
    resolve(state, [("billing/0", 1, _event(1, customer))], 10, NOW)
    out = expire(state, NOW + 30, ttl_s=30)  # even when the TTL is shorter than the grace
    assert [t for t, *_ in out.forwards] == ["cus_9"] and out.expired == []
    assert not out.tombstone and state.link == "cus_9"


def test_the_count_bound_expires_the_identities_waiting_longest() -> None:
    states = []
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        key = identity.segment_user(name)
        states.append(IdentityState(key))
        resolve(states[-1], [("usage/0", i, _event(i, key))], 10, NOW + i)
    tied = IdentityState(identity.segment_user("0"))  # as old as "a": ties go by key
    resolve(tied, [("usage/0", 9, _event(9, tied.key))], 10, NOW)
    customer = IdentityState(identity.stripe_customer("cus_1"))
    resolve(customer, [("billing/0", 1, _event(1, customer.key))], 10, NOW - 1)
    joined = IdentityState(identity.segment_user("j"))
    resolve(joined, [("usage/0", 1, link_item(joined.key, "acme"))], 10, NOW - 9)
    result = sweep([*states, tied, customer, joined], NOW + 10, grace_s=60, ttl_s=TTL,
                   max_identities=3)
    gone = {r.key: r for r in result.resolutions}
    assert set(gone) == {customer.key, tied.key, states[0].key, states[1].key}
    assert [t for t, *_ in gone[customer.key].forwards] == ["cus_1"]  # its fallback
    assert all(gone[s.key].tombstone and gone[s.key].expired_by == "count"
               for s in (tied, states[0], states[1]))
    assert result.waiting == 3 and [s.key for s in states if s.parked] == [
        s.key for s in states[2:]]
    assert evict(states, 3) == []  # within the bound: nothing more


def test_time_then_count_in_one_sweep_give_one_resolution_per_identity() -> None:
    key = identity.segment_user("u1")
    state = IdentityState(key)
    resolve(state, [("usage/0", 1, _event(1, key))], 10, NOW)
    resolve(state, [("usage/0", 2, _event(2, key))], 10, NOW + TTL)
    newer = IdentityState(identity.segment_user("u2"))
    resolve(newer, [("usage/0", 3, _event(3, newer.key))], 10, NOW + TTL + 1)
    result = sweep([state, newer], NOW + TTL + 2, ttl_s=TTL, max_identities=1)
    [res] = result.resolutions
    assert [e["event_id"] for _, _, e in res.expired] == ["e1", "e2"]
    assert (res.key, res.expired_by, res.tombstone, result.waiting) == (key, "count", True, 1)


def test_a_sequence_never_restarts_below_what_the_account_has_taken() -> None:
    key = identity.segment_user("u1")
    state = IdentityState(key)
    first_pack = [("usage/0", 1, _usage(1, key)), ("usage/0", 2, _usage(2, key))]
    resolve(state, first_pack, 10, NOW)
    linked = resolve(state, [("usage/1", 5, link_item(key, "acme"))], 10, NOW)
    account, applied, skipped = _receive(None, linked.forwards)
    assert (applied, skipped) == (2, 0)
    # Compacted: stored, swept long after (kept: it joined), read back as after a rebalance.
    assert sweep([state], NOW + 10 * TTL, ttl_s=TTL).resolutions == []
    state = IdentityState.from_bytes(state.to_bytes())
    more = resolve(state, [("usage/0", 3, _usage(3, key)), ("usage/2", 1, _usage(4, key))],
                   10, NOW + 10 * TTL)
    assert [seq for _, _, seq, _ in more.forwards] == [2, 3]
    account, applied, skipped = _receive(account, more.forwards)
    assert (applied, skipped) == (2, 0)
    # The same forwards again (the identity's pack redelivered before its ack): none twice.
    account, applied, skipped = _receive(account, [*linked.forwards, *more.forwards])
    assert (applied, skipped) == (0, 4) and account.seq == 4
    # Why a joined identity is never deleted: a new one would start again at 0, and the
    # account would silently skip its next event as a duplicate.
    fresh = IdentityState(key)
    resolve(fresh, [("usage/1", 6, link_item(key, "acme"))], 10, NOW)
    lost = resolve(fresh, [("usage/0", 4, _usage(5, key))], 10, NOW)
    assert _receive(account, lost.forwards)[1:] == (0, 1)


def test_a_tombstoned_identity_that_comes_back_starts_at_zero_safely() -> None:
    key = identity.segment_user("u1")
    state = IdentityState(key)
    resolve(state, [("usage/0", 1, _usage(1, key))], 10, NOW)
    assert expire(state, NOW + TTL, TTL).tombstone  # nothing was ever forwarded from it
    again = IdentityState(key)  # the key was deleted: a new identity under it
    resolve(again, [("usage/0", 2, _usage(2, key))], 10, NOW + TTL)
    linked = resolve(again, [("usage/1", 1, link_item(key, "acme"))], 10, NOW + TTL)
    assert [seq for _, _, seq, _ in linked.forwards] == [0]
    assert _receive(None, linked.forwards)[1:] == (1, 0)
