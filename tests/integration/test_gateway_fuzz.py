"""Schemathesis against the OpenAPI description the gateway serves (/openapi.json): generated
requests to every route, Segment calls with a valid write key, webhooks both unsigned and
correctly signed (so the fuzz reaches past the signature check). No 5xx, answers conform to the
description, and nothing on a source topic is what the worker would reject."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import orjson
import pytest
import requests
import schemathesis
import stripe
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from churnsignal.gateway.openapi import document
from tests.integration.helpers import Env, new_env
from tests.integration.test_gateway import (
    INTERCOM_SECRET,
    STRIPE_SECRET,
    ZENDESK_SECRET,
    GatewayProcess,
    basic,
    not_rejected_by_the_worker,
    post_raw,
    records,
    zendesk_headers,
)

# serial: schemathesis gives every operation's test one node id, and pytest-xdist schedules by
# node id, so under it one operation would run instead of all.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]

schema = schemathesis.openapi.from_dict(document())
# Two of Schemathesis's checks contradict the API it fuzzes, by design: a batch with invalid
# messages is accepted (200) and each invalid one dead-lettered, and fields the gateway does not
# read (a writeKey of the wrong type beside valid Basic auth) are ignored, as Segment's API does;
# and a schema-valid message may still be refused (a call needs a userId *or* an anonymousId,
# which the description does not say). Every other check runs: no 5xx, documented status codes,
# content types and headers.
SEGMENT_SEMANTICS = [negative_data_rejection, positive_data_acceptance]
SENT = {"signed": 0, "accepted": 0}


@pytest.fixture(scope="module")
def fuzzed(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, GatewayProcess]]:
    tmp = tmp_path_factory.mktemp("gateway-fuzz")
    env = new_env(broker, tmp)
    gateway = GatewayProcess(env, broker, tmp)
    try:
        gateway.wait_ready()
        # the served description is the one fuzzed here
        status, _, body = post_raw(gateway.url, "/openapi.json", None, method="GET")
        assert status == 200 and orjson.loads(body) == document()
        yield env, gateway
    finally:
        assert gateway.stop() == 0, gateway.log()[-3000:]


def _signed(provider: str, body: bytes) -> dict[str, str]:
    if provider == "stripe":
        return {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(
            body.decode(), STRIPE_SECRET, timestamp=int(time.time())),
            "Content-Type": "application/json"}
    if provider == "zendesk":
        return zendesk_headers(body, ZENDESK_SECRET)
    return {"X-Hub-Signature": "sha1=" + hmac.new(INTERCOM_SECRET.encode(), body,
                                                  hashlib.sha1).hexdigest(),
            "Content-Type": "application/json"}


@schema.parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_fuzz_routes(case: schemathesis.Case, fuzzed: tuple[Env, GatewayProcess]) -> None:
    _, gateway = fuzzed
    path = case.operation.path
    headers = basic() if path.startswith("/v1/") else None
    response = case.call(base_url=gateway.url, headers=headers, timeout=30)
    assert response.status_code < 500, (path, response.status_code, response.text[:300])
    case.validate_response(response, headers=headers, excluded_checks=SEGMENT_SEMANTICS)
    if response.status_code == 200 and path.startswith("/v1/"):
        SENT["accepted"] += 1
    if path.startswith("/webhooks/") and isinstance(case.body, dict):
        provider = path.rsplit("/", 1)[1]
        body = json.dumps(case.body).encode()  # the stdlib writes any integer, as a sender may
        signed = requests.post(gateway.url + path, data=body, headers=_signed(provider, body),
                               timeout=30)
        assert signed.status_code in (200, 400), (path, signed.status_code, signed.text[:300])
        assert signed.status_code == 200 or signed.json()["code"] in (
            "not_object", "thin_event_unsupported", "not_json", "empty")
        SENT["signed"] += 1


# Runs after test_fuzz_routes (pytest keeps the file's order) on the topics it filled.
def test_nothing_the_worker_would_reject_reached_a_source_topic(
        fuzzed: tuple[Env, GatewayProcess], broker: str) -> None:
    env, _ = fuzzed
    assert SENT["signed"] > 0 and SENT["accepted"] > 0, SENT  # the fuzz got past the checks
    pinned = {"usage": "segment", "billing": "stripe", "support": ("zendesk", "intercom")}
    written = 0
    for kind, source in pinned.items():
        for rec in records(broker, env.topics[kind]):
            written += 1
            assert not_rejected_by_the_worker(rec.value, source), rec.value[:300]
    assert written > 0
