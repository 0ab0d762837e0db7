"""Decoding: provider payloads as documented, and anything else never raises."""

from __future__ import annotations

import time

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Accepted, Rejected, Skipped
from churnsignal.schemas.stripe import monthly_cents
from churnsignal.tools.synthetic import stripe_event, stripe_subscription, zendesk_ticket

NOW = 1_764_000_000.0
OPTS = DecodeOptions()


def test_canonical_event_is_accepted() -> None:
    raw = orjson.dumps({"event_id": "e1", "account_id": "acme", "type": "feature_used",
                        "occurred_at": "2025-11-24T10:00:00+00:00", "data": {"feature": "api"}})
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Accepted)
    assert result.event.data.feature == "api"


def test_stripe_subscription_update_with_cancel_at_period_end() -> None:
    sub = stripe_subscription("acme", "active", seats=5, unit_amount=4900,
                              cancel_at_period_end=True)
    raw = stripe_event("customer.subscription.updated", sub, NOW - 60, "evt_1",
                       previous={"cancel_at_period_end": False})
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Accepted)
    e = result.event
    assert (e.type, e.account_id, e.event_id) == ("subscription_updated", "acme", "evt_1")
    assert e.data.cancel_at_period_end is True
    assert e.data.mrr_cents == 24_500 and e.data.seats == 5


def test_mrr_is_normalised_per_month() -> None:
    yearly = {"items": {"data": [{"quantity": 2, "price": {
        "unit_amount": 120_000, "recurring": {"interval": "year", "interval_count": 1}}}]}}
    assert monthly_cents(yearly) == (20_000, 2)


def test_invoice_account_from_subscription_details_metadata() -> None:
    raw = stripe_event("invoice.payment_failed", {
        "id": "in_1", "object": "invoice", "customer": "cus_9", "attempt_count": 2,
        "next_payment_attempt": int(NOW + 86400), "amount_due": 500, "currency": "usd",
        "subscription_details": {"metadata": {"account_id": "acme"}}}, NOW - 5, "evt_2")
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Accepted)
    assert result.event.account_id == "acme"
    assert result.event.data.next_attempt_at is not None


def test_unused_stripe_type_is_skipped_not_dead_lettered() -> None:
    raw = stripe_event("customer.created", {"id": "cus_1", "object": "customer"}, NOW, "evt_3")
    assert decode(raw, OPTS, NOW) == Skipped("stripe_unused:customer.created")


def test_segment_track_uses_group_id_and_message_id() -> None:
    raw = orjson.dumps({"type": "track", "event": "Logged In", "userId": "u1",
                        "messageId": "m-1", "timestamp": "2025-11-24T10:00:00Z",
                        "context": {"groupId": "acme"}})
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Accepted)
    assert (result.event.type, result.event.account_id, result.event.user_id) == (
        "session", "acme", "u1")


def test_zendesk_reopen_is_recognised() -> None:
    raw = zendesk_ticket("acme", 7, "status_changed", NOW - 10, "z1", previous="solved",
                         current="open")
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Accepted)
    assert result.event.type == "ticket_reopened"


def test_rejections_have_reasons() -> None:
    cases = {
        b"{": "not_json",
        b"[1,2]": "not_object",
        b'{"hello": 1}': "unknown_source",
        b'{"event_id":"e","account_id":"a","type":"bogus","occurred_at":"2025-01-01T00:00:00Z"}':
            "unknown_type",
        b'{"event_id":"e","account_id":"a","type":"session","occurred_at":"2025-01-01T00:00:00"}':
            "invalid",  # naive timestamp
        b'{"event_id":"e","account_id":"a","type":"session","occurred_at":"2999-01-01T00:00:00Z"}':
            "future_timestamp",
        b"x" * 300_000: "too_large",
        b'{"event_id":"e","account_id":"a","type":"session","occurred_at":"2001-01-01T00:00:00Z"}':
            "too_old",
    }
    for raw, reason in cases.items():
        result = decode(raw, OPTS, time.time())
        assert isinstance(result, Rejected) and result.reason == reason, (raw[:60], result)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "id", "object", "data", "event_id", "account_id",
                                       "occurred_at", "messageId", "context", "ticket",
                                       "detail", "created", "userId"]), children, max_size=6),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(orjson.dumps)))
def test_decoder_never_raises(raw: bytes) -> None:
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Accepted | Skipped | Rejected)
