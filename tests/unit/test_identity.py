"""Identity links and parked events: who an event belongs to when it does not say (pure)."""

from __future__ import annotations

import orjson

from churnsignal.schemas import identity, segment, stripe
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Accepted, Skipped
from churnsignal.stream.identity import IdentityState, link_item, resolve, settle

NOW = 1_764_000_000.0


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
    assert not again.changed and [e for _, e in state.parked] == [_event(1, key)]


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
