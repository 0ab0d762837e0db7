"""The gateway's pure checks: credentials, bodies, Segment normalisation, webhook keys."""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import time
import zlib

import orjson
import pytest
import stripe
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from churnsignal.gateway import segment_api, verify, webhooks
from churnsignal.gateway.body import BodyError, decode_content, json_object
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Rejected

NOW = 1_796_000_000.0
BODY = b'{"id":"evt_1","object":"event","type":"invoice.paid","data":{"object":{}}}'


# -- Stripe: headers made by stripe-python's own helper -----------------------------------

def stripe_header(body: bytes, secret: str, at: float) -> str:
    return stripe.WebhookSignature.generate_signature_header(body.decode(), secret,
                                                             timestamp=int(at))


def test_stripe_signature_from_the_stripe_library_is_accepted_with_any_configured_secret() -> None:
    header = stripe_header(BODY, "whsec_new", NOW)
    assert verify.stripe_signature(header, BODY, [b"whsec_old", b"whsec_new"], NOW, 300) is None
    # and stripe-python agrees it is authentic
    stripe.WebhookSignature.verify_header(BODY.decode(), header, "whsec_new", 0)


def test_stripe_signature_any_of_several_v1_signatures_counts() -> None:
    good = stripe_header(BODY, "whsec_a", NOW)
    t, v1 = good.split(",")
    header = f"{t},v1={'0' * 64},{v1},v0=deadbeef"
    assert verify.stripe_signature(header, BODY, [b"whsec_a"], NOW, 300) is None


@pytest.mark.parametrize(("header", "status", "code"), [
    (None, 401, "missing_credentials"),
    ("", 401, "missing_credentials"),
    ("t=1796000000", 403, "invalid_signature"),
    ("v1=abc", 403, "invalid_signature"),
    ("garbage", 403, "invalid_signature"),
])
def test_stripe_missing_or_malformed_header_refused(header: str | None, status: int,
                                                     code: str) -> None:
    refusal = verify.stripe_signature(header, BODY, [b"whsec_a"], NOW, 300)
    assert refusal is not None and (refusal.status, refusal.code) == (status, code)


def test_stripe_forged_wrong_secret_tampered_body_and_stale_refused() -> None:
    forged = stripe_header(BODY, "whsec_attacker", NOW)
    assert verify.stripe_signature(forged, BODY, [b"whsec_a"], NOW, 300).code == "invalid_signature"  # type: ignore[union-attr]
    good = stripe_header(BODY, "whsec_a", NOW)
    tampered = BODY.replace(b"invoice.paid", b"invoice.payment_failed")
    assert verify.stripe_signature(good, tampered, [b"whsec_a"], NOW, 300) is not None
    stale = stripe_header(BODY, "whsec_a", NOW - 301)
    refusal = verify.stripe_signature(stale, BODY, [b"whsec_a"], NOW, 300)
    assert refusal is not None and refusal.code == "stale_signature"
    future = stripe_header(BODY, "whsec_a", NOW + 301)
    assert verify.stripe_signature(future, BODY, [b"whsec_a"], NOW, 300) is not None
    assert verify.stripe_signature(stale, BODY, [b"whsec_a"], NOW, 0) is None  # 0: no window


def test_routes_without_secrets_refuse_everything() -> None:
    header = stripe_header(BODY, "whsec_a", NOW)
    refusal = verify.stripe_signature(header, BODY, [], NOW, 300)
    assert refusal is not None and refusal.status == 401 and "STRIPE_WEBHOOK_SECRETS" in refusal.message
    assert verify.segment_write_key("Basic " + base64.b64encode(b"k:").decode(), None, []) is not None
    assert verify.intercom_signature("sha1=00", BODY, []) is not None
    assert verify.zendesk_signature("x", "2026-01-01T00:00:00Z", BODY, [], NOW, 300) is not None


# -- Zendesk and Intercom, signed as their docs say ---------------------------------------

def zendesk_sig(secret: bytes, ts: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(secret, ts.encode() + body, hashlib.sha256).digest()).decode()


def test_zendesk_signature() -> None:
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW))
    sig = zendesk_sig(b"zsecret", ts, BODY)
    assert verify.zendesk_signature(sig, ts, BODY, [b"other", b"zsecret"], NOW, 300) is None
    assert verify.zendesk_signature(sig, ts, BODY + b" ", [b"zsecret"], NOW, 300).status == 403  # type: ignore[union-attr]
    assert verify.zendesk_signature(None, ts, BODY, [b"zsecret"], NOW, 300).status == 401  # type: ignore[union-attr]
    assert verify.zendesk_signature(sig, None, BODY, [b"zsecret"], NOW, 300).status == 401  # type: ignore[union-attr]
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 3600))
    stale = verify.zendesk_signature(zendesk_sig(b"zsecret", old, BODY), old, BODY, [b"zsecret"],
                                     NOW, 300)
    assert stale is not None and stale.code == "stale_signature"
    # a timestamp that is not a time cannot be checked for staleness: refused
    assert verify.zendesk_signature(zendesk_sig(b"zsecret", "soon", BODY), "soon", BODY,
                                    [b"zsecret"], NOW, 300) is not None


def test_intercom_signature() -> None:
    sig = "sha1=" + hmac.new(b"client-secret", BODY, hashlib.sha1).hexdigest()
    assert verify.intercom_signature(sig, BODY, [b"client-secret"]) is None
    assert verify.intercom_signature(sig.upper().replace("SHA1", "sha1"), BODY,
                                     [b"client-secret"]) is None  # hex case does not matter
    assert verify.intercom_signature(sig, BODY + b"x", [b"client-secret"]).status == 403  # type: ignore[union-attr]
    assert verify.intercom_signature("sha256=" + sig[5:], BODY, [b"client-secret"]) is not None
    assert verify.intercom_signature(None, BODY, [b"client-secret"]).status == 401  # type: ignore[union-attr]


def test_segment_write_key_basic_user_or_body() -> None:
    keys = [b"wk_old", b"wk_new"]
    basic = "Basic " + base64.b64encode(b"wk_new:").decode()
    assert verify.segment_write_key(basic, None, keys) is None
    assert verify.segment_write_key(None, "wk_old", keys) is None
    assert verify.segment_write_key(None, None, keys).status == 401  # type: ignore[union-attr]
    wrong = "Basic " + base64.b64encode(b"nope:").decode()
    refusal = verify.segment_write_key(wrong, None, keys)
    assert refusal is not None and refusal.status == 403 and "nope" not in refusal.message
    assert verify.basic_user("Basic !!!") is None
    assert verify.basic_user("Bearer abc") is None


# -- bodies ---------------------------------------------------------------------------------

def test_gzip_bodies_inflate_within_the_limit_and_bombs_stop_there() -> None:
    raw = b'{"batch": []}'
    assert decode_content(gzip.compress(raw), "gzip", 100) == raw
    assert decode_content(raw, None, 100) == raw
    bomb = gzip.compress(b"0" * 10_000_000)
    with pytest.raises(BodyError) as exc:
        decode_content(bomb, "gzip", 500_000)
    assert exc.value.status == 413
    with pytest.raises(BodyError) as exc:
        decode_content(b"not gzip", "gzip", 100)
    assert exc.value.status == 400
    with pytest.raises(BodyError) as exc:
        decode_content(gzip.compress(raw)[:-6], "gzip", 100)
    assert exc.value.code == "bad_encoding"
    with pytest.raises(BodyError) as exc:
        decode_content(raw, "br", 100)
    assert exc.value.status == 415
    assert decode_content(zlib.compress(raw), "deflate", 100) == raw


@pytest.mark.parametrize(("raw", "code"), [(b"", "empty"), (b"{", "not_json"), (b"[1]", "not_object")])
def test_json_object_says_why(raw: bytes, code: str) -> None:
    with pytest.raises(BodyError) as exc:
        json_object(raw)
    assert exc.value.status == 400 and exc.value.code == code


# -- Segment normalisation --------------------------------------------------------------------

OPTS = DecodeOptions(max_age_s=float("inf"))


def test_clock_skew_corrected_the_way_segment_does() -> None:
    # the device clock is 1 h fast: it says the event happened at 05:00:00 and sent at 05:00:10
    message = {"type": "track", "userId": "u1", "event": "Report Exported",
               "messageId": "m1", "timestamp": "2026-12-06T05:00:00Z"}
    received = segment_api.parse_time("2026-12-06T04:00:12Z")
    assert received is not None
    out = segment_api.normalise(message, received, "2026-12-06T05:00:10.000Z")
    assert out["originalTimestamp"] == "2026-12-06T05:00:00Z"
    assert out["timestamp"] == "2026-12-06T04:00:02.000Z"  # receivedAt - (sentAt - original)
    assert out["receivedAt"] == "2026-12-06T04:00:12.000Z"
    assert out["sentAt"] == "2026-12-06T05:00:10.000Z"
    # without sentAt the time is kept as given; without any time it is receivedAt
    assert segment_api.normalise(message, received, None)["timestamp"] == "2026-12-06T05:00:00Z"
    bare = segment_api.normalise({"type": "track", "userId": "u", "event": "e"}, received, None)
    assert bare["timestamp"] == bare["receivedAt"]


def test_missing_message_id_is_stable_across_resends() -> None:
    message = {"type": "track", "userId": "u1", "event": "e", "timestamp": "2026-12-06T04:00:00Z"}
    first = segment_api.normalise(message, NOW, "2026-12-06T04:00:01Z")
    again = segment_api.normalise(message, NOW + 30, "2026-12-06T04:00:31Z")
    assert first["messageId"] == again["messageId"]
    assert first["messageId"].startswith("segment-")


def test_check_accepts_segment_calls_and_keys_them_by_account() -> None:
    track = {"userId": "u1", "event": "Logged In", "context": {"groupId": "acme"},
             "messageId": "m1", "writeKey": "wk_secret"}
    record = segment_api.check(track, 32_768, time.time(), None, OPTS, call="track")
    assert isinstance(record, segment_api.Record)
    assert record.key == b"acme"
    value = orjson.loads(record.value)
    assert value["type"] == "track" and "receivedAt" in value
    assert "writeKey" not in value and b"wk_secret" not in record.value  # never on a topic
    group = segment_api.check({"type": "group", "userId": "u1", "groupId": "g1"}, 32_768,
                              time.time(), None, OPTS)
    assert isinstance(group, segment_api.Record) and group.key == b"g1"
    anon = segment_api.check({"type": "page", "anonymousId": "a1", "name": "Home"}, 32_768,
                             time.time(), None, OPTS)
    assert isinstance(anon, segment_api.Record) and anon.key == b"a1"


@pytest.mark.parametrize(("message", "reason"), [
    (5, "not_object"),
    ({"type": "track", "event": "x"}, "invalid"),  # no user
    ({"type": "track", "userId": "u"}, "invalid"),  # no event
    ({"type": "group", "userId": "u"}, "invalid"),  # no groupId
    ({"type": "alias", "userId": "u"}, "invalid"),  # no previousId
    ({"type": "launch", "userId": "u"}, "invalid"),
    ({"type": "track", "userId": "u", "event": "x", "properties": {"p": "x" * 40_000}}, "too_large"),
    ({"type": "track", "userId": "u", "event": "x", "timestamp": "2999-01-01T00:00:00Z"},
     "future_timestamp"),
])
def test_check_refuses_what_segment_or_the_worker_would(message: object, reason: str) -> None:
    result = segment_api.check(message, 32_768, time.time(), None, OPTS)
    assert isinstance(result, segment_api.Invalid) and result.reason == reason


def test_batch_level_context_is_a_default_and_batch_must_be_a_list() -> None:
    messages, sent = segment_api.messages_of(
        {"batch": [{"type": "track", "userId": "u", "event": "e", "context": {"ip": "1"}}],
         "context": {"groupId": "acme", "ip": "0"}, "sentAt": "2026-01-01T00:00:00Z"}, None)
    assert messages[0]["context"] == {"groupId": "acme", "ip": "1"}
    assert sent == "2026-01-01T00:00:00Z"
    with pytest.raises(ValueError):
        segment_api.messages_of({"batch": {}}, None)


# -- webhook keys ------------------------------------------------------------------------------

def test_webhook_keys_name_the_account_else_the_provider_id() -> None:
    sub = {"object": "event", "type": "customer.subscription.updated",
           "data": {"object": {"object": "subscription", "customer": "cus_1",
                               "metadata": {"account_id": "acme"}}}}
    assert webhooks.stripe_key(sub) == "acme"
    sub["data"]["object"]["metadata"] = {}  # type: ignore[index]
    assert webhooks.stripe_key(sub) == "cus_1"
    assert webhooks.stripe_key({"data": {"object": {"object": "customer", "id": "cus_9"}}}) == "cus_9"
    assert webhooks.zendesk_key({"type": "zen:event-type:ticket.created",
                                 "detail": {"organization_id": "77", "requester_id": "5"}}) == "77"
    assert webhooks.zendesk_key({"type": "zen:event-type:ticket.created",
                                 "detail": {"organization_id": "0", "requester_id": "5"}}) == "5"
    note = {"type": "notification_event", "topic": "conversation.user.created",
            "data": {"item": {"type": "conversation", "id": "c1",
                              "contacts": {"contacts": [{"id": "ct1"}]}}}}
    assert webhooks.intercom_key(note) == "ct1"
    note["data"]["item"]["company"] = {"id": "ic_1", "company_id": "acme"}  # type: ignore[index]
    assert webhooks.intercom_key(note) == "acme"


def test_thin_stripe_events_are_recognised() -> None:
    assert webhooks.thin_stripe_event({"object": "v2.core.event",
                                       "type": "v1.billing.meter.error_report_triggered"})
    assert not webhooks.thin_stripe_event({"object": "event"})


# -- property: whatever a sender posts, check() answers with a value, never an exception, and
# what it lets through is never rejected by the worker ---------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
_times = st.sampled_from(["2026-12-06T04:00:00Z", "2026-12-06T04:00:00.123+02:00", "yesterday",
                          "", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"]) | _scalars
_messages = st.fixed_dictionaries(
    {}, optional={"type": st.sampled_from(["track", "identify", "group", "page", "screen",
                                           "alias", "launch"]) | _scalars,
                  "userId": st.text(max_size=10) | _scalars, "anonymousId": _scalars,
                  "event": st.text(max_size=10) | _scalars, "groupId": _scalars,
                  "previousId": _scalars, "messageId": _scalars, "timestamp": _times,
                  "originalTimestamp": _times, "sentAt": _times, "writeKey": st.just("wk_leak"),
                  "properties": _json, "context": _json, "traits": _json}) | _json


@hsettings(max_examples=400, deadline=None)
@given(message=_messages, sent_at=_times,
       call=st.none() | st.sampled_from(["track", "page", "group", "identify"]))
def test_check_never_raises_and_what_passes_the_worker_accepts(message: object, sent_at: object,
                                                              call: str | None) -> None:
    now = time.time()
    result = segment_api.check(message, 32_768, now, sent_at, OPTS, call)
    if isinstance(result, segment_api.Record):
        assert not isinstance(decode(result.value, OPTS, now, "segment"), Rejected)
        assert b"wk_leak" not in result.value
    else:
        assert result.reason in ("not_object", "too_large", "invalid", "future_timestamp",
                                 "not_json", "unknown_source", "source_mismatch")
        assert b"wk_leak" not in result.value
