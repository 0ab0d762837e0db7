"""`churnsignal gateway` as a real process on a real broker, driven by the real clients:
segment-analytics-python and rudder-sdk-python (gzip on and off), Stripe events signed by
stripe-python's own helper, Zendesk and Intercom signed as their docs say."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import stripe

from churnsignal.app.embedded import PARENT_PID_ENV, free_port
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Rejected
from churnsignal.tools.demo import stop_process
from tests.integration.helpers import Env, consume_all, metric, new_env

pytestmark = [pytest.mark.integration]

WRITE_KEY = "wk_test_" + "a" * 16
STRIPE_SECRET = "whsec_test_current"
ZENDESK_SECRET = "zendesk-signing-secret"
INTERCOM_SECRET = "intercom-client-secret"


class GatewayProcess:
    """A real `churnsignal gateway` process (python -m churnsignal gateway)."""

    def __init__(self, env: Env, broker: str, log_dir: Path,
                 extra: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{self.port}.log"
        variables = {
            **os.environ, **env.env(),
            "KAFKA_BOOTSTRAP_SERVERS": broker,
            "CHURNSIGNAL_STATE_DIR": str(env.state_dir),
            "CHURNSIGNAL_LOG_FORMAT": "text",
            "CHURNSIGNAL_GATEWAY__HOST": "127.0.0.1",
            "CHURNSIGNAL_GATEWAY__PORT": str(self.port),
            "CHURNSIGNAL_GATEWAY__SEGMENT_WRITE_KEYS": json.dumps(["wk_rotated_out", WRITE_KEY]),
            "CHURNSIGNAL_GATEWAY__STRIPE_WEBHOOK_SECRETS": json.dumps(["whsec_old", STRIPE_SECRET]),
            "CHURNSIGNAL_GATEWAY__ZENDESK_SIGNING_SECRETS": json.dumps([ZENDESK_SECRET]),
            "CHURNSIGNAL_GATEWAY__INTERCOM_CLIENT_SECRETS": json.dumps([INTERCOM_SECRET]),
            "CHURNSIGNAL_GATEWAY__RETRY_AFTER_S": "1",
            "CHURNSIGNAL_GATEWAY__PRODUCE_TIMEOUT_S": "3",
            PARENT_PID_ENV: str(os.getpid()),
            **(extra or {}),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen([sys.executable, "-m", "churnsignal", "gateway"],
                                     env=variables, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}: {self.log()[-3000:]}")
            status, _, _ = post_raw(self.url, "/readyz", None, method="GET")
            if status == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"gateway not ready in {timeout}s: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.proc)


def post_raw(url: str, path: str, body: bytes | None, headers: dict[str, str] | None = None,
             method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url + path, data=body, method=method,  # noqa: S310
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, OSError):
        return 0, {}, b""


def basic(key: str = WRITE_KEY) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode(),
            "Content-Type": "application/json"}


def records(broker: str, topic: str) -> list[Any]:
    return asyncio.run(consume_all(broker, topic, idle_s=1.5))


def headers_of(record: Any) -> dict[str, bytes]:
    return dict(record.headers or ())


def not_rejected_by_the_worker(value: bytes, source: Any) -> bool:
    return not isinstance(decode(value, DecodeOptions(max_age_s=float("inf")), time.time(),
                                 source), Rejected)


@pytest.fixture(scope="module")
def world(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, GatewayProcess]]:
    tmp = tmp_path_factory.mktemp("gateway")
    env = new_env(broker, tmp)
    gateway = GatewayProcess(env, broker, tmp)
    try:
        gateway.wait_ready()
        yield env, gateway
    finally:
        assert gateway.stop() == 0, gateway.log()[-3000:]
        assert WRITE_KEY not in gateway.log() and STRIPE_SECRET not in gateway.log()


# -- the SDKs -------------------------------------------------------------------------------

def send_with_sdk(sdk: str, url: str, gzip_on: bool, run: str, n_tracks: int,
                  write_key: str = WRITE_KEY) -> tuple[list[str], list[Any]]:
    """n_tracks track calls plus an identify and a group call through the SDK's own queue,
    consumer thread and retries; returns (the messageIds of the track calls, errors)."""
    if sdk == "segment":
        from segment.analytics.client import Client
    else:
        from rudderstack.analytics.client import Client  # type: ignore[no-redef]
    errors: list[Any] = []
    client = Client(write_key, host=url, gzip=gzip_on, upload_interval=0.05,
                    on_error=lambda exc, batch: errors.append(exc))
    ids = []
    for i in range(n_tracks):
        message_id = f"{run}-{i}"
        ids.append(message_id)
        client.track(user_id=f"user-{i % 3}", event="Report Exported" if i % 2 else "Logged In",
                     properties={"run": run, "i": i}, context={"groupId": f"acct-{run}"},
                     message_id=message_id)
    client.identify(user_id="user-0", traits={"company": {"id": f"acct-{run}"}, "run": run},
                    message_id=f"{run}-identify")
    client.group(user_id="user-1", group_id=f"acct-{run}", traits={"run": run},
                 message_id=f"{run}-group")
    client.flush()
    client.join()
    return ids, errors


@pytest.mark.parametrize(("sdk", "gzip_on"), [("segment", False), ("segment", True),
                                              ("rudder", False), ("rudder", True)])
def test_sdks_write_one_record_per_call_to_usage_events(
        world: tuple[Env, GatewayProcess], broker: str, sdk: str, gzip_on: bool) -> None:
    env, gateway = world
    run = f"{sdk}-{'gz' if gzip_on else 'plain'}-{uuid.uuid4().hex[:6]}"
    ids, errors = send_with_sdk(sdk, gateway.url, gzip_on, run, n_tracks=25)
    assert errors == []
    mine = []
    for rec in records(broker, env.topics["usage"]):
        value = orjson.loads(rec.value)
        if value.get("messageId", "").startswith(run):
            mine.append((rec, value))
    per_id = Counter(v["messageId"] for _, v in mine)
    assert set(per_id) == {*ids, f"{run}-identify", f"{run}-group"}
    assert all(n == 1 for n in per_id.values()), per_id
    for rec, value in mine:
        assert rec.key == f"acct-{run}".encode()  # the account, so its events stay in order
        headers = headers_of(rec)
        assert headers["source"] == b"segment"
        assert headers["request-id"] and headers["received-at"]
        assert value["receivedAt"] and value["timestamp"] and value["originalTimestamp"]
        assert "writeKey" not in value and WRITE_KEY.encode() not in rec.value
        assert not_rejected_by_the_worker(rec.value, "segment")


def test_wrong_write_key_is_refused_and_the_sdk_gives_up_without_writing(
        world: tuple[Env, GatewayProcess], broker: str) -> None:
    env, gateway = world
    run = f"badkey-{uuid.uuid4().hex[:6]}"
    _, errors = send_with_sdk("segment", gateway.url, False, run, 3, write_key="wk_wrong")
    assert errors and all(getattr(e, "status", None) == 403 for e in errors)
    assert not [r for r in records(broker, env.topics["usage"]) if run.encode() in r.value]


# -- refusals and the dead-letter topic -----------------------------------------------------

def test_refusals_say_why_and_nothing_refused_reaches_a_source_topic(
        world: tuple[Env, GatewayProcess], broker: str) -> None:
    env, gateway = world
    run = f"refuse-{uuid.uuid4().hex[:6]}"
    track = {"userId": "u1", "event": "Clicked", "properties": {"run": run}}
    body = orjson.dumps(track)
    assert post_raw(gateway.url, "/v1/track", body, {"Content-Type": "application/json"})[0] == 401
    assert post_raw(gateway.url, "/v1/track", body, basic("wk_wrong"))[0] == 403
    status, _, answer = post_raw(gateway.url, "/v1/track", b"{not json " + run.encode(), basic())
    assert status == 400 and orjson.loads(answer)["code"] == "not_json"
    status, _, answer = post_raw(gateway.url, "/v1/track", b"not gzip", {**basic(),
                                                                        "Content-Encoding": "gzip"})
    assert status == 400 and orjson.loads(answer)["code"] == "bad_encoding"
    big = orjson.dumps({**track, "properties": {"run": run, "pad": "x" * 33_000}})
    assert post_raw(gateway.url, "/v1/track", big, basic())[0] == 413
    huge_batch = orjson.dumps({"batch": [{**track, "messageId": f"{run}-{i}",
                                          "properties": {"run": run, "pad": "y" * 20_000}}
                                         for i in range(30)]})
    assert post_raw(gateway.url, "/v1/batch", huge_batch, basic())[0] == 413
    assert post_raw(gateway.url, "/v1/batch", gzip.compress(huge_batch),
                    {**basic(), "Content-Encoding": "gzip"})[0] == 413  # limit applies inflated
    status, _, answer = post_raw(gateway.url, "/v1/track", orjson.dumps({"event": "no user"}),
                                 basic())
    assert status == 400 and "userId" in orjson.loads(answer)["message"]
    # writeKey in the body instead of Basic auth
    status, _, answer = post_raw(gateway.url, "/v1/track",
                                 orjson.dumps({**track, "writeKey": WRITE_KEY,
                                               "messageId": f"{run}-bodykey"}),
                                 {"Content-Type": "application/json"})
    assert (status, orjson.loads(answer)) == (200, {"success": True})

    # a batch: the valid messages are accepted, each invalid one dead-lettered with its reason
    batch = {"batch": [
        {"type": "track", "userId": "u1", "event": "ok", "messageId": f"{run}-ok",
         "properties": {"run": run}},
        {"type": "track", "event": "no user", "messageId": f"{run}-nouser", "properties": {"run": run}},
        {"type": "launch", "userId": "u1", "messageId": f"{run}-badtype", "properties": {"run": run}},
        {"type": "track", "userId": "u1", "event": "big", "messageId": f"{run}-big",
         "properties": {"run": run, "pad": "z" * 33_000}},
    ]}
    status, headers, answer = post_raw(gateway.url, "/v1/batch", orjson.dumps(batch),
                                       {**basic(), "X-Request-Id": f"req-{run}"})
    assert status == 200 and orjson.loads(answer) == {"success": True, "dead_lettered": 3}
    assert headers["X-Request-Id"] == f"req-{run}"

    usage = [r for r in records(broker, env.topics["usage"]) if run.encode() in r.value]
    assert sorted(orjson.loads(r.value)["messageId"] for r in usage) == [f"{run}-bodykey", f"{run}-ok"]
    dlq = [r for r in records(broker, env.topics["dlq"]) if run.encode() in r.value]
    reasons = {orjson.loads(r.value)["messageId"]: headers_of(r) for r in dlq}
    assert set(reasons) == {f"{run}-nouser", f"{run}-badtype", f"{run}-big"}
    assert reasons[f"{run}-big"]["dlq_reason"] == b"too_large"
    assert reasons[f"{run}-nouser"]["dlq_reason"] == b"invalid"
    for h in reasons.values():
        assert h["dlq_step"] == b"gateway" and h["dlq_topic"] == b"/v1/batch"
        assert h["dlq_request_id"] == f"req-{run}".encode() and h["dlq_source"] == b"segment"
        assert h["dlq_detail"]


# -- webhooks ---------------------------------------------------------------------------------

def stripe_event(run: str, account: str | None = "acme-stripe") -> bytes:
    metadata = {"account_id": account} if account else {}
    return orjson.dumps({
        "id": f"evt_{run}", "object": "event", "type": "customer.subscription.updated",
        "api_version": "2024-06-20", "created": int(time.time()), "livemode": False,
        "data": {"object": {"id": "sub_1", "object": "subscription", "customer": "cus_42",
                            "status": "active", "metadata": metadata,
                            "cancel_at_period_end": True, "items": {"data": []}}}},
        option=orjson.OPT_INDENT_2)  # the exact bytes, whitespace and all, are kept


def stripe_headers(body: bytes, secret: str = STRIPE_SECRET, at: float | None = None) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=int(at if at is not None else time.time()))
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


def test_stripe_webhook_signed_by_stripe_python_is_written_byte_for_byte(
        world: tuple[Env, GatewayProcess], broker: str) -> None:
    env, gateway = world
    run = uuid.uuid4().hex[:8]
    body = stripe_event(run)
    status, _, answer = post_raw(gateway.url, "/webhooks/stripe", body, stripe_headers(body))
    assert (status, orjson.loads(answer)) == (200, {"received": True})
    customer_only = stripe_event(run + "c", account=None)
    assert post_raw(gateway.url, "/webhooks/stripe", customer_only,
                    stripe_headers(customer_only))[0] == 200

    refused = {
        "forged": stripe_headers(stripe_event(run + "f"), secret="whsec_attacker"),
        "stale": stripe_headers(stripe_event(run + "s"), at=time.time() - 301),
        "missing": {"Content-Type": "application/json"},
    }
    bodies = {"forged": stripe_event(run + "f"), "stale": stripe_event(run + "s"),
              "missing": stripe_event(run + "m")}
    for name, headers in refused.items():
        status, _, answer = post_raw(gateway.url, "/webhooks/stripe", bodies[name], headers)
        assert status == (401 if name == "missing" else 403), name
        assert orjson.loads(answer)["success"] is False
    # a signed body that is tampered with after signing
    tampered_headers = stripe_headers(stripe_event(run + "t"))
    assert post_raw(gateway.url, "/webhooks/stripe", stripe_event(run + "t").replace(b"active", b"paused"),
                    tampered_headers)[0] == 403
    thin = orjson.dumps({"id": f"evt_thin_{run}", "object": "v2.core.event",
                         "type": "v1.billing.meter.error_report_triggered",
                         "related_object": {"id": "mtr_1", "type": "billing.meter"}})
    status, _, answer = post_raw(gateway.url, "/webhooks/stripe", thin, stripe_headers(thin))
    assert status == 400 and "thin" in orjson.loads(answer)["message"]

    billing = [r for r in records(broker, env.topics["billing"]) if run.encode() in r.value]
    assert sorted(r.value for r in billing) == sorted([body, customer_only])
    keys = {orjson.loads(r.value)["id"]: r.key for r in billing}
    assert keys == {f"evt_{run}": b"acme-stripe", f"evt_{run}c": b"cus_42"}
    assert all(headers_of(r)["source"] == b"stripe" for r in billing)


def zendesk_headers(body: bytes, secret: str = ZENDESK_SECRET, at: float | None = None) -> dict[str, str]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at if at is not None else time.time()))
    sig = base64.b64encode(hmac.new(secret.encode(), ts.encode() + body, hashlib.sha256).digest())
    return {"X-Zendesk-Webhook-Signature": sig.decode(),
            "X-Zendesk-Webhook-Signature-Timestamp": ts, "Content-Type": "application/json"}


def intercom_headers(body: bytes, secret: str = INTERCOM_SECRET) -> dict[str, str]:
    return {"X-Hub-Signature": "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest(),
            "Content-Type": "application/json"}


def test_zendesk_and_intercom_webhooks(world: tuple[Env, GatewayProcess], broker: str) -> None:
    env, gateway = world
    run = uuid.uuid4().hex[:8]
    now_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    zen = orjson.dumps({
        "type": "zen:event-type:ticket.created", "account_id": 1, "id": f"zen-{run}",
        "time": now_iso, "zendesk_event_version": "2022-11-06", "subject": "zen:ticket:35436",
        "detail": {"id": "35436", "organization_id": "8899", "requester_id": "12",
                   "status": "OPEN", "priority": "HIGH", "created_at": now_iso,
                   "updated_at": now_iso}, "event": {}})
    note = orjson.dumps({
        "type": "notification_event", "app_id": "abc", "id": f"notif_{run}",
        "topic": "conversation.user.created", "created_at": int(time.time()),
        "data": {"type": "notification_event_data", "item": {
            "type": "conversation", "id": "777", "state": "open",
            "company": {"id": "ic_1", "company_id": "acme-intercom"},
            "contacts": {"type": "contact.list", "contacts": [{"type": "contact", "id": "ct_9"}]}}}})
    assert post_raw(gateway.url, "/webhooks/zendesk", zen, zendesk_headers(zen))[0] == 200
    assert post_raw(gateway.url, "/webhooks/intercom", note, intercom_headers(note))[0] == 200
    # forged, stale and missing
    forged_zen = zen.replace(b"8899", b"6666")
    assert post_raw(gateway.url, "/webhooks/zendesk", forged_zen, zendesk_headers(zen))[0] == 403
    assert post_raw(gateway.url, "/webhooks/zendesk", forged_zen,
                    zendesk_headers(forged_zen, at=time.time() - 3600))[0] == 403
    assert post_raw(gateway.url, "/webhooks/zendesk", forged_zen, {})[0] == 401
    forged_note = note.replace(b"acme-intercom", b"evil-corp")
    assert post_raw(gateway.url, "/webhooks/intercom", forged_note,
                    intercom_headers(forged_note, "wrong"))[0] == 403
    assert post_raw(gateway.url, "/webhooks/intercom", forged_note, {})[0] == 401
    # signed, but nothing the worker can read: dead-lettered, answered 200 (a retry would
    # bring the same bytes)
    odd = orjson.dumps({"type": "notification_event", "topic": "conversation.user.created",
                        "id": f"notif_odd_{run}", "data": {"item": {"company": {"id": "x"}}}})
    status, _, answer = post_raw(gateway.url, "/webhooks/intercom", odd, intercom_headers(odd))
    assert status == 200 and orjson.loads(answer)["dead_lettered"] == "invalid"

    support = [r for r in records(broker, env.topics["support"]) if run.encode() in r.value]
    assert sorted(r.value for r in support) == sorted([zen, note])
    assert {r.key for r in support} == {b"8899", b"acme-intercom"}
    assert {headers_of(r)["source"] for r in support} == {b"zendesk", b"intercom"}
    assert not_rejected_by_the_worker(note, ("zendesk", "intercom"))
    dlq = [r for r in records(broker, env.topics["dlq"]) if f"notif_odd_{run}".encode() in r.value]
    assert len(dlq) == 1 and headers_of(dlq[0])["dlq_topic"] == b"/webhooks/intercom"
    assert dlq[0].value == odd


def test_probes_and_metrics(world: tuple[Env, GatewayProcess]) -> None:
    _, gateway = world
    batch = {"batch": [{"type": "track", "event": "no user", "messageId": "metrics-1"}]}
    assert post_raw(gateway.url, "/v1/batch", orjson.dumps(batch), basic())[0] == 200
    assert post_raw(gateway.url, "/v1/batch", orjson.dumps(batch), basic("wk_wrong"))[0] == 403
    event = stripe_event("metrics")
    assert post_raw(gateway.url, "/webhooks/stripe", event, stripe_headers(event))[0] == 200
    status, _, body = post_raw(gateway.url, "/readyz", None, method="GET")
    assert status == 200 and orjson.loads(body)["ready"] is True
    assert post_raw(gateway.url, "/healthz", None, method="GET")[0] == 200
    status, _, body = post_raw(gateway.url, "/metrics", None, method="GET")
    assert status == 200 and b"churnsignal_gateway_requests_total" in body
    text = body.decode()
    assert metric(text, "churnsignal_gateway_dead_lettered_total", route="/v1/batch",
                  reason="invalid") >= 1
    assert metric(text, "churnsignal_gateway_refused_total", code="invalid_write_key") >= 1
    assert metric(text, "churnsignal_gateway_requests_total", route="/webhooks/stripe",
                  status="200") >= 1
    assert metric(text, "churnsignal_gateway_records_total") >= 2
    status, _, body = post_raw(gateway.url, "/openapi.json", None, method="GET")
    assert status == 200 and "/v1/batch" in orjson.loads(body)["paths"]


def test_requests_in_flight_are_bounded(broker: str, tmp_path: Path) -> None:
    """With max_inflight=1, a request still uploading its body holds the one slot: the next
    is answered 503 + Retry-After at once (nothing buffered), and the first completes."""
    import socket

    env = new_env(broker, tmp_path)
    gateway = GatewayProcess(env, broker, tmp_path, {"CHURNSIGNAL_GATEWAY__MAX_INFLIGHT": "1"})
    try:
        gateway.wait_ready()
        body = orjson.dumps({"userId": "slow", "event": "Slow Upload", "messageId": "slow-1"})
        head = (f"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Authorization: {basic()['Authorization']}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as slow:
            slow.sendall(head + body[:10])  # the handler waits for the rest
            time.sleep(0.5)
            status, headers, answer = post_raw(
                gateway.url, "/v1/track",
                orjson.dumps({"userId": "u", "event": "e", "messageId": "fast-1"}), basic())
            assert status == 503 and headers["Retry-After"] == "1"
            assert orjson.loads(answer)["code"] == "overloaded"
            slow.sendall(body[10:])
            reply = b""
            while chunk := slow.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        # over the limit by its Content-Length: refused before reading the body
        status, _, _ = post_raw(gateway.url, "/v1/batch", b"x" * (600 * 1024), basic())
        assert status == 413
    finally:
        assert gateway.stop() == 0
    values = [orjson.loads(r.value)["messageId"] for r in records(broker, env.topics["usage"])]
    assert values == ["slow-1"]
