"""Decoding: provider payloads as documented, and anything else never raises."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from churnsignal.schemas import identity, segment, stripe, zendesk
from churnsignal.schemas._util import MAX_EPOCH, MIN_EPOCH, epoch_to_iso
from churnsignal.schemas.decode import REJECT_REASONS, SKIP_REASONS, DecodeOptions, decode
from churnsignal.schemas.results import Accepted, Rejected, Skipped
from churnsignal.schemas.stripe import MAX_CENTS, monthly_cents
from churnsignal.tools.synthetic import (
    segment_track,
    stripe_event,
    stripe_subscription,
    zendesk_ticket,
)

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
    assert decode(raw, OPTS, NOW) == Skipped("stripe_unused")


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


# --- 1. numbers beyond the platform's range are values, never exceptions --------------------

def _subscription_event(**changes: object) -> dict[str, Any]:
    sub = stripe_subscription("acme", "active", seats=5, unit_amount=4900)
    event: dict[str, Any] = orjson.loads(
        stripe_event("customer.subscription.updated", sub, NOW - 60, "evt_9"))
    for path, value in changes.items():
        node = event
        *parents, leaf = path.split("__")
        for step in parents:
            node = node[int(step)] if isinstance(node, list) else node[step]
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return event


def _raw(payload: dict[str, Any], **raw_leaves: str) -> bytes:
    """JSON bytes with some leaves replaced by raw literals no Python value encodes to."""
    data = orjson.dumps(payload)
    for marker, literal in raw_leaves.items():
        data = data.replace(orjson.dumps(marker), literal.encode())
    return data


@pytest.mark.parametrize("value", [2**62, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -1e308,
                                   253_402_300_800, 1.5e15, True, "1700000000", [1], {"a": 1}])
def test_period_end_beyond_the_platform_is_unknown_not_a_crash(value: object) -> None:
    result = decode(orjson.dumps(_subscription_event(data__object__current_period_end=value)),
                    OPTS, NOW)
    assert isinstance(result, Accepted), result
    assert result.event.data.current_period_end is None
    assert result.event.data.mrr_cents == 24_500


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "123456789012345678901234567890",
                                     "18446744073709551616"])
def test_raw_numbers_beyond_a_double_or_64_bits(literal: str) -> None:
    payload = _subscription_event(data__object__current_period_end="@@x@@")
    result = decode(_raw(payload, **{"@@x@@": literal}), OPTS, NOW)
    # orjson refuses infinities (not_json) and reads integers beyond 64 bits as doubles
    if literal.endswith("e400"):
        assert isinstance(result, Rejected) and result.reason == "not_json", result
    else:
        assert isinstance(result, Accepted) and result.event.data.current_period_end is None


@pytest.mark.parametrize("created", [2**62, 1e308, -(2**63), True, "2025-11-24", None])
def test_an_event_time_beyond_the_platform_is_a_clear_rejection(created: object) -> None:
    result = decode(orjson.dumps(_subscription_event(created=created)), OPTS, NOW)
    assert isinstance(result, Rejected) and result.reason == "invalid", result
    assert "created" in result.detail and "not a Unix time" in result.detail


def test_epoch_to_iso_bounds() -> None:
    assert epoch_to_iso(0) == "1970-01-01T00:00:00+00:00"
    assert epoch_to_iso(MAX_EPOCH) == "9999-12-31T23:59:59+00:00"
    assert epoch_to_iso(MIN_EPOCH) == "0001-01-01T00:00:00+00:00"
    for bad in (MAX_EPOCH + 1, MIN_EPOCH - 1, 2**62, 10**30, float("inf"), float("-inf"),
                float("nan"), 1e308, True, False, None, "0", [0]):
        assert epoch_to_iso(bad) is None, bad


@pytest.mark.parametrize("item", [
    {"quantity": 1e308}, {"quantity": 2**62}, {"quantity": -1}, {"quantity": 2.5},
    {"quantity": "5"}, {"quantity": [5]},
    {"price": {"unit_amount": 1e308, "recurring": {"interval": "month"}}},
    {"price": {"unit_amount": 100, "recurring": {"interval": "month", "interval_count": "2"}}},
    {"price": {"unit_amount": 100, "recurring": {"interval": "month", "interval_count": 2**62}}},
    {"price": {"unit_amount": 100, "recurring": {"interval": ["month"]}}},
    "not an item",
])
def test_unreadable_items_make_mrr_unknown_not_wrong(item: object) -> None:
    base = {"price": {"unit_amount": 4900, "recurring": {"interval": "month"}}, "quantity": 2}
    merged = {**base, **item} if isinstance(item, dict) else item
    mrr, _seats = monthly_cents({"items": {"data": [merged]}})
    assert mrr is None or 0 <= mrr <= MAX_CENTS
    if isinstance(item, dict) and "quantity" in item:
        assert mrr is None


def test_monthly_cents_with_odd_but_valid_items() -> None:
    assert monthly_cents({"items": {"data": [{"price": {"unit_amount": 4900, "recurring": {
        "interval": "month"}}, "quantity": 0}]}}) == (0, 0)
    assert monthly_cents({"items": {"data": [{"plan": {"amount": 1200, "interval": "year"}}]}}
                         ) == (100, 1)  # legacy plan, quantity absent (metered): one unit
    assert monthly_cents({"items": {"data": [{"price": {"unit_amount": 1000, "recurring": {
        "interval": "month"}}, "quantity": 1}]}, "discount": {"coupon": {"percent_off": 150}}}
    )[0] is None


@pytest.mark.parametrize("field,value", [
    ("attempt_count", 2**62), ("attempt_count", True), ("attempt_count", -1),
    ("amount_due", 1e308), ("amount_due", -5), ("amount_due", 2**64 - 1),
    ("next_payment_attempt", 2**62), ("currency", "dollars"), ("currency", ["usd"]),
])
def test_invoice_numbers_out_of_range_become_unknown(field: str, value: object) -> None:
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_9", "attempt_count": 2,
               "next_payment_attempt": int(NOW + 86400), "amount_due": 500, "currency": "usd",
               "subscription_details": {"metadata": {"account_id": "acme"}}, field: value}
    result = decode(stripe_event("invoice.payment_failed", invoice, NOW - 5, "evt_2"), OPTS, NOW)
    assert isinstance(result, Accepted), result
    data = result.event.data
    assert {"attempt_count": data.attempt_count, "amount_due": data.amount_cents,
            "next_payment_attempt": data.next_attempt_at, "currency": data.currency}[field] is None


@pytest.mark.parametrize("month,year", [(13, 2026), (True, 2026), (8, 2**62), (8, 0), (8, 1e308),
                                        ("8", 2026)])
def test_card_expiry_out_of_range_is_unknown(month: object, year: object) -> None:
    card = {"id": "card_1", "object": "card", "customer": "cus_1", "exp_month": month,
            "exp_year": year, "metadata": {"account_id": "acme"}}
    result = decode(stripe_event("customer.source.expiring", card, NOW - 5, "evt_c"), OPTS, NOW)
    assert isinstance(result, Accepted) and result.event.data.expires_at is None, result


def test_deep_nesting_where_a_string_is_expected_is_not_a_crash() -> None:
    deep = "[" * 1000 + "1" + "]" * 1000  # parses (orjson allows 1024); str() of it would not
    raws = [
        _raw({"type": "track", "event": "@@x@@", "userId": "u1", "messageId": "m1",
              "timestamp": "2025-11-24T10:00:00Z"}, **{"@@x@@": deep}),
        _raw(orjson.loads(zendesk_ticket("acme", 7, "status_changed", NOW - 10, "z1")) | {
            "event": "@@x@@"}, **{"@@x@@": deep}),
        _raw({"ticket": {"id": 7, "organization_id": "acme", "status": "@@x@@",
                         "updated_at": "2025-11-24T10:00:00Z"}}, **{"@@x@@": deep}),
        _raw({"event_id": "e", "account_id": "a", "type": "@@x@@"}, **{"@@x@@": deep}),
    ]
    for raw in raws:
        result = decode(raw, OPTS, NOW)
        assert isinstance(result, Accepted | Skipped | Rejected), result
        assert not isinstance(result, Rejected) or result.reason in REJECT_REASONS


@pytest.mark.parametrize("exc", [OverflowError("int too large"), OSError(75, "too large"),
                                 RecursionError("maximum recursion depth"), MemoryError(),
                                 ZeroDivisionError("division by zero"), IndexError("0"),
                                 UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate"),
                                 RuntimeError("anything at all")])
@pytest.mark.interpreted_only
def test_any_exception_from_an_adapter_is_rejected_with_its_class(
        exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_args: object) -> dict[str, Any]:
        raise exc

    for module in (stripe, segment, zendesk):
        monkeypatch.setattr(module, "to_canonical", explode)
    raws = {"stripe": stripe_event("invoice.paid", {"id": "in_1", "object": "invoice",
                                                    "customer": "cus_1"}, NOW, "evt_1"),
            "segment": segment_track("acme", "u1", "Logged In", NOW, "m1"),
            "zendesk": zendesk_ticket("acme", 7, "created", NOW, "z1")}
    for source, raw in raws.items():
        result = decode(raw, OPTS, NOW)
        assert isinstance(result, Rejected) and result.reason == "invalid", result
        assert result.detail.startswith(f"{source} payload: {type(exc).__name__}")


@pytest.mark.interpreted_only
def test_an_exception_whose_message_fails_is_still_a_rejection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    def explode(*_args: object) -> dict[str, Any]:
        raise Unprintable

    monkeypatch.setattr(segment, "to_canonical", explode)
    result = decode(segment_track("acme", "u1", "Logged In", NOW, "m1"), OPTS, NOW)
    assert result == Rejected("invalid", "segment payload: Unprintable: (no message)")


def test_a_timestamp_at_the_edge_of_datetime_is_not_a_crash() -> None:
    # Year 1 at +14:00 is before 0001-01-01 UTC: datetime.fromtimestamp of it raises.
    raw = orjson.dumps({"event_id": "e", "account_id": "a", "type": "session",
                        "occurred_at": "0001-01-01T00:00:00+14:00"})
    assert decode(raw, OPTS, NOW) == Skipped("too_old")
    raw = orjson.dumps({"event_id": "e", "account_id": "a", "type": "session",
                        "occurred_at": "9999-12-31T23:59:59-14:00"})
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Rejected) and result.reason == "future_timestamp"


def test_reason_sets() -> None:
    assert "too_old" not in REJECT_REASONS and "too_old" in SKIP_REASONS
    assert REJECT_REASONS.isdisjoint(SKIP_REASONS)


def test_unused_types_give_bounded_skip_reasons() -> None:
    for kind in ("customer.created", "x" * 10_000, "customer.subscription.updated2"):
        raw = stripe_event(kind, {"id": "cus_1", "object": "customer"}, NOW, "evt_3")
        assert decode(raw, OPTS, NOW) == Skipped("stripe_unused")


# --- 2. what the providers' documentation prints is accepted ---------------------------------

def _track(**fields: object) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "track", "event": "Logged In", "userId": "u1",
                           "timestamp": "2025-11-24T10:00:00.123Z", "context": {"groupId": "acme"},
                           "sentAt": "2025-11-24T10:00:01.000Z",
                           "receivedAt": "2025-11-24T10:00:01.500Z"}
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not None}


def test_segment_without_message_id_gets_a_stable_content_id() -> None:
    first = decode(orjson.dumps(_track()), OPTS, NOW)
    assert isinstance(first, Accepted)
    assert first.event.event_id.startswith("segment-")
    assert decode(orjson.dumps(_track()), OPTS, NOW) == first
    # resent later, relayed with other transport fields, or with keys in another order
    resent = _track(sentAt="2025-11-24T11:00:00Z", receivedAt="2025-11-24T11:00:01Z",
                    version=2, channel="server", writeKey="abc", _metadata={"bundled": []})
    assert decode(orjson.dumps(resent), OPTS, NOW) == first
    assert decode(orjson.dumps(dict(reversed(list(_track().items())))), OPTS, NOW) == first
    # another event, user or time is another id
    for other in (_track(event="Logged Out"), _track(userId="u2"),
                  _track(timestamp="2025-11-24T10:00:00.124Z"), _track(properties={"a": 1})):
        result = decode(orjson.dumps(other), OPTS, NOW)
        assert isinstance(result, Accepted) and result.event.event_id != first.event.event_id


def test_segment_message_id_wins_when_given() -> None:
    result = decode(orjson.dumps(_track(messageId="m-42")), OPTS, NOW)
    assert isinstance(result, Accepted) and result.event.event_id == "m-42"


def test_segment_spec_example_forms() -> None:
    # analytics.js example from the spec's track page: anonymousId, no userId, originalTimestamp
    track = {"anonymousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895", "event": "Course Clicked",
             "context": {"library": {"name": "analytics.js", "version": "2.11.1"},
                         "traits": {"company": {"id": 42, "name": "Initech"}}},
             "integrations": {}, "messageId": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
             "properties": {"title": "Intro to Analytics"}, "type": "track", "version": "1.1",
             "originalTimestamp": "2025-11-24T19:11:01.152Z"}
    result = decode(orjson.dumps(track), OPTS, NOW)
    assert isinstance(result, Accepted), result
    assert result.event.account_id == "42"  # context.traits.company.id, a number
    assert result.event.occurred_at.isoformat() == "2025-11-24T19:11:01.152000+00:00"
    # context.traits.groupId, a numeric userId, no properties, only receivedAt
    result = decode(orjson.dumps({"type": "page", "userId": 97980, "name": "Home",
                                  "context": {"traits": {"groupId": "globex"}},
                                  "receivedAt": "2025-11-24T10:00:00Z"}), OPTS, NOW)
    assert isinstance(result, Accepted), result
    assert (result.event.account_id, result.event.user_id, result.event.type) == (
        "globex", "97980", "session")
    # a body as posted to the HTTP Tracking API's /v1/track: no type
    result = decode(orjson.dumps({"event": "Report Exported", "userId": "123",
                                  "timestamp": "2025-11-24T10:00:00Z"}), OPTS, NOW)
    assert isinstance(result, Accepted), result
    assert (result.event.type, result.event.account_id) == ("export", identity.segment_user("123"))


def test_segment_identify_and_group_with_anonymous_ids_link() -> None:
    group = {"anonymousId": "507f191e810c19729de860ea", "groupId": "0e8c78ea9d97a7b8185e8632",
             "traits": {"name": "Initech"}, "type": "group", "version": "1.1",
             "timestamp": "2015-02-23T22:28:55.111Z"}
    result = decode(orjson.dumps(group), OPTS, NOW)
    assert result == Skipped("segment_unused", (
        (identity.segment_anonymous("507f191e810c19729de860ea"), "0e8c78ea9d97a7b8185e8632"),))


def test_segment_message_too_deep_to_hash_without_message_id_is_rejected() -> None:
    raw = _raw(_track(properties="@@x@@"), **{"@@x@@": "[" * 300 + "]" * 300})
    result = decode(raw, OPTS, NOW)
    assert isinstance(result, Rejected) and result.reason == "invalid"
    assert "messageId" in result.detail


def _zendesk(kind: str, detail: dict[str, Any], event: dict[str, Any] | None = None,
             subject: str = "zen:ticket:7") -> bytes:
    return orjson.dumps({"type": f"zen:event-type:{kind}", "account_id": 12514403,
                         "id": f"evt-{kind}", "time": "2025-11-24T10:00:00Z",
                         "zendesk_event_version": "2022-11-06", "subject": subject,
                         "detail": detail, "event": event or {}})


@pytest.mark.parametrize("kind", ["user.created", "user.active_changed", "organization.created",
                                  "article.published", "community_post.created",
                                  "agent.state_changed", "messaging_ticket.message_added",
                                  "ticket.marked_as_spam", "ticket.soft_deleted",
                                  "ticket.csat_requested"])
def test_every_zendesk_event_type_is_zendesk(kind: str) -> None:
    result = decode(_zendesk(kind, {"id": "1", "requester_id": "2", "organization_id": "3"}),
                    OPTS, NOW)
    assert isinstance(result, Skipped) and result.reason == "zendesk_unused", result
    pinned = decode(_zendesk(kind, {"id": "1"}), OPTS, NOW, "zendesk")
    assert isinstance(pinned, Skipped), pinned


def test_zendesk_ticket_without_organization_waits_for_its_requester() -> None:
    detail = {"id": "7", "status": "OPEN", "priority": "HIGH", "requester_id": "9001",
              "organization_id": None, "updated_at": "2025-11-24T10:00:00Z"}
    result = decode(_zendesk("ticket.created", detail), OPTS, NOW)
    assert isinstance(result, Accepted), result
    assert result.event.account_id == identity.zendesk_user("9001") == "~zendesk:user:9001"
    assert identity.fallback_account(result.event.account_id) is None  # a person is no account
    assert result.links == ()
    # the same for a ticket object
    ticket = {"ticket": {"id": 7, "status": "open", "requester_id": 9001,
                         "created_at": "2025-11-24T09:00:00Z",
                         "updated_at": "2025-11-24T10:00:00Z"}}
    result = decode(orjson.dumps(ticket), OPTS, NOW)
    assert isinstance(result, Accepted) and result.event.account_id == "~zendesk:user:9001"
    # neither organization nor requester: nothing to wait for
    del detail["requester_id"]
    assert decode(_zendesk("ticket.created", detail), OPTS, NOW) == Skipped("unattributed")


def test_zendesk_payloads_naming_user_and_organization_link_them() -> None:
    user = {"created_at": "2025-11-24T05:27:58Z", "email": "jenny@example.com",
            "external_id": "", "default_group_id": "0", "id": "6596848315901",
            "organization_id": "6607619104125", "role": "end-user",
            "updated_at": "2025-11-24T05:33:18Z"}
    link = (identity.zendesk_user("6596848315901"), "6607619104125")
    result = decode(_zendesk("user.active_changed", user, {"current": False, "previous": True},
                             "zen:user:6596848315901"), OPTS, NOW)
    assert result == Skipped("zendesk_unused", (link,))
    assert decode(_zendesk("user.created", {**user, "organization_id": "0"}), OPTS, NOW) == (
        Skipped("zendesk_unused"))  # "0": no organization
    ticket = {"id": "7", "status": "OPEN", "requester_id": "6596848315901",
              "organization_id": "6607619104125"}
    result = decode(_zendesk("ticket.comment_added", ticket), OPTS, NOW)
    assert isinstance(result, Accepted) and result.links == (link,)
    assert result.event.account_id == "6607619104125"
    obj = {"ticket": {"id": 7, "status": "open", "requester_id": 6596848315901,
                      "organization_id": 6607619104125, "updated_at": "2025-11-24T10:00:00Z"}}
    result = decode(orjson.dumps(obj), OPTS, NOW)
    assert isinstance(result, Accepted) and result.links == (link,)


@pytest.mark.parametrize("score,csat", [("good", "good"), ("BAD", "bad"), ("Good", "good")])
def test_zendesk_csat_received_is_a_satisfaction_rating(score: str, csat: str) -> None:
    detail = {"id": "7", "status": "SOLVED", "requester_id": "9001", "organization_id": "acme"}
    event = {"satisfaction_score": {"score": score, "comment": "Slow."}}
    result = decode(_zendesk("ticket.csat_received", detail, event), OPTS, NOW)
    assert isinstance(result, Accepted), result
    assert (result.event.type, result.event.data.csat, result.event.account_id) == (
        "satisfaction_rating", csat, "acme")


@pytest.mark.parametrize("event", [{"satisfaction_score": {"score": "offered"}},
                                   {"satisfaction_score": "bad"}, {}, {"score": "bad"}])
def test_zendesk_csat_without_a_rating_is_skipped(event: dict[str, Any]) -> None:
    detail = {"id": "7", "status": "SOLVED", "requester_id": "9001", "organization_id": "acme"}
    assert decode(_zendesk("ticket.csat_received", detail, event), OPTS, NOW) == Skipped(
        "zendesk_unrated", ((identity.zendesk_user("9001"), "acme"),))


def test_zendesk_ticket_id_from_the_subject_when_detail_has_none() -> None:
    result = decode(_zendesk("ticket.created", {"organization_id": "acme"},
                             subject="zen:ticket:35436"), OPTS, NOW)
    assert isinstance(result, Accepted) and result.event.data.ticket_id == "35436"


# --- 3. events older than the horizon are history -------------------------------------------

OLD = NOW - 100 * 86_400


def test_old_billing_event_is_skipped_with_its_facts() -> None:
    sub = stripe_subscription("acme", "active", seats=5, unit_amount=4900)
    result = decode(stripe_event("customer.subscription.updated", sub, OLD, "evt_old"), OPTS, NOW)
    assert isinstance(result, Skipped) and result.reason == "too_old", result
    assert result.event is not None and result.event.type == "subscription_updated"
    assert result.event.data.mrr_cents == 24_500 and result.event.account_id == "acme"
    assert result.links == ((identity.stripe_customer("cus_acme"), "acme"),)


def test_old_support_event_is_skipped_with_its_facts() -> None:
    result = decode(zendesk_ticket("acme", 7, "created", OLD, "z-old"), OPTS, NOW)
    assert isinstance(result, Skipped) and result.reason == "too_old", result
    assert result.event is not None and result.event.type == "ticket_opened"


def test_old_usage_event_is_skipped_without_it() -> None:
    result = decode(segment_track("acme", "u1", "Logged In", OLD, "m-old"), OPTS, NOW)
    assert result == Skipped("too_old")
    canonical = orjson.dumps({"event_id": "e", "account_id": "a", "type": "session",
                              "occurred_at": "2001-01-01T00:00:00Z"})
    assert decode(canonical, OPTS, NOW) == Skipped("too_old")
