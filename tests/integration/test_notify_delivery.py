"""Alert delivery through a real broker, a real `churnsignal notify` process (SIGKILLed and
restarted) and real HTTP receivers on loopback.

No real Slack, PagerDuty or receiver service is reachable from here (no network beyond the
package registries): local receivers stand in for them and check every payload against the
documented schemas (Slack Block Kit, PagerDuty Events API v2, Standard Webhooks, verified with
the `standardwebhooks` library)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from standardwebhooks.webhooks import Webhook

from churnsignal.app.embedded import EMBEDDED_REBALANCE_S, PARENT_PID_ENV, free_port
from churnsignal.schemas.alerts import Alert, AlertReason
from churnsignal.tools.demo import stop_process
from tests.integration.helpers import Env, consume_all, metric, new_env, produce

pytestmark = [pytest.mark.integration]

SECRET = "whsec_" + base64.b64encode(b"churnsignal-test-secret-0123456789").decode()


# --- real things the tests drive -----------------------------------------------------------

@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1:``port``, started and stopped by the test; ``answer``
    picks each response's status (and body) from the request."""

    port: int
    answer: Callable[[Hit], tuple[int, bytes]] = lambda hit: (200, b"ok")
    hits: list[Hit] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hit = Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body, 0)
                status, out = receiver.answer(hit)
                hit.status = status
                receiver.hits.append(hit)
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class Notify:
    """A real `churnsignal notify` process (or `worker` with command="worker")."""

    def __init__(self, env: Env, extra: dict[str, str], log: Path, command: str = "notify"
                 ) -> None:
        self.port = free_port()
        self.log_path = log
        environ = {**os.environ, **env.env(), "KAFKA_BOOTSTRAP_SERVERS": env.broker,
                   "CHURNSIGNAL_STATE_DIR": str(env.state_dir),
                   "CHURNSIGNAL_WEB_PORT": str(self.port),
                   "CHURNSIGNAL_KAFKA__REBALANCE_TIMEOUT_S": str(EMBEDDED_REBALANCE_S),
                   "CHURNSIGNAL_KAFKA__SESSION_TIMEOUT_S": str(EMBEDDED_REBALANCE_S),
                   "CHURNSIGNAL_TOPICS__UNDELIVERABLE": f"{env.app_id}.undeliverable",
                   "CHURNSIGNAL_LOG_FORMAT": "json", PARENT_PID_ENV: str(os.getpid()),
                   **extra}
        out = open(log, "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen([sys.executable, "-m", "churnsignal", command],
                                     env=environ, stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited {self.proc.returncode}: {self.log()}")
            try:
                if check():
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"{what} not within {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no commit, no goodbye to the group
        self.proc.wait(30)

    def stop(self) -> int:
        return stop_process(self.proc)


def make_alert(n: int, account: str, kind: str = "escalated", band: str = "critical",
               previous: str = "medium") -> Alert:
    return Alert(alert_id=f"{account}-{n:03d}", account_id=account, kind=kind, score=81.5,
                 band=band, previous_band=previous,
                 mrr_at_risk_cents=24_500 if kind == "escalated" else 0,
                 trigger_event_id=f"evt_{n}", triggered_at=time.time(), emitted_at=time.time(),
                 policy_version="default",
                 reasons=[AlertReason(code="payment_failed_final", value=4, contribution=50,
                                      kind="involuntary", play="card_update",
                                      detail="Payment failed after 4 attempts")])


def publish(env: Env, alerts: list[Alert]) -> None:
    asyncio.run(produce(env.broker, [(env.topics["alerts"], a.account_id.encode(),
                                      a.model_dump_json().encode()) for a in alerts]))


def hook_env(url: str) -> dict[str, str]:
    return {"CHURNSIGNAL_NOTIFY__WEBHOOK_URL": url, "CHURNSIGNAL_NOTIFY__WEBHOOK_SECRET": SECRET,
            "CHURNSIGNAL_NOTIFY__RETRY_BASE_S": "0.2", "CHURNSIGNAL_NOTIFY__RETRY_MAX_S": "1"}


# --- the tests -------------------------------------------------------------------------------

def test_every_alert_arrives_signed_in_order_through_an_outage_and_a_sigkill(
        broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    accounts = ["acc-a", "acc-b", "acc-c", "acc-d"]
    first = [make_alert(i, a) for i in (1, 2) for a in accounts]
    later = [make_alert(3, a, "deescalated", "low", "critical") for a in accounts]
    expected = first + later
    receiver = Receiver(free_port())  # not started: the receiver is down
    publish(env, first)
    notify = Notify(env, hook_env(receiver.url), tmp_path / "notify-1.log")
    try:
        notify.wait("retries while the receiver is down", lambda: metric(
            notify.metrics(), "churnsignal_notify_retried_total", destination="webhook") >= 3)
        # a receiver that does not answer slows nobody: the process stays healthy and ready
        assert notify.get("/healthz")[0] == 200
        assert notify.get("/readyz")[0] == 200, notify.get("/readyz")
        assert metric(notify.metrics(), "churnsignal_notify_delivered_total") == 0
        notify.wait("the lag metric", lambda: metric(
            notify.metrics(), "churnsignal_notify_lag", destination="webhook") == len(first), 10)
        assert metric(notify.metrics(), "churnsignal_notify_oldest_age_seconds",
                      destination="webhook") > 0
        notify.kill()
        publish(env, later)  # alerts go on firing while nothing delivers
        notify = Notify(env, hook_env(receiver.url), tmp_path / "notify-2.log")
        notify.wait("retries after the restart", lambda: metric(
            notify.metrics(), "churnsignal_notify_retried_total", destination="webhook") >= 1)
        # the receiver comes back, refusing each alert's first attempt with a 503
        seen: set[str] = set()

        def flaky(hit: Hit) -> tuple[int, bytes]:
            msg_id = hit.headers.get("webhook-id", "")
            if msg_id not in seen:
                seen.add(msg_id)
                return 503, b"warming up"
            return 204, b""

        receiver.answer = flaky
        receiver.start()
        ids = {a.alert_id for a in expected}
        notify.wait("every alert delivered", lambda: {
            h.headers["webhook-id"] for h in receiver.hits if h.status == 204} >= ids)
        notify.wait("the lag metric back to 0", lambda: metric(
            notify.metrics(), "churnsignal_notify_lag", destination="webhook") == 0, 10)
        metrics = notify.metrics()
        assert notify.stop() == 0, notify.log()
    finally:
        if notify.proc.poll() is None:
            notify.kill()
        receiver.close()

    verifier = Webhook(SECRET)
    by_id: dict[str, list[Hit]] = {}
    for hit in receiver.hits:
        doc = verifier.verify(hit.body, hit.headers)  # every attempt is signed, and verifies
        assert hit.headers["webhook-id"] == doc["data"]["alert_id"]
        assert doc["type"] == f"churn.alert.{doc['data']['kind']}"
        by_id.setdefault(hit.headers["webhook-id"], []).append(hit)
    assert set(by_id) == ids  # every alert, nothing else
    for msg_id, hits in by_id.items():
        assert len(hits) >= 2  # the 503, then the delivery: the same id and body each time
        assert len({h.body for h in hits}) == 1, msg_id
    # in order per account: each account's alerts were accepted in the order they fired
    accepted = [json.loads(h.body)["data"] for h in receiver.hits if h.status == 204]
    for account in accounts:
        got = [a["alert_id"] for a in accepted if a["account_id"] == account]
        assert list(dict.fromkeys(got)) == [a.alert_id for a in expected
                                            if a.account_id == account]
    assert metric(metrics, "churnsignal_notify_delivered_total", destination="webhook",
                  outcome="delivered") == len(expected)
    assert metric(metrics, "churnsignal_notify_retried_total", destination="webhook") >= len(
        expected)
    assert metric(metrics, "churnsignal_notify_undeliverable_total") == 0


def test_a_refused_alert_is_posted_once_then_undeliverable(broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    alerts = [make_alert(i, "acc-r") for i in (1, 2, 3)]
    refused = alerts[1].alert_id

    def answer(hit: Hit) -> tuple[int, bytes]:
        if hit.headers["webhook-id"] == refused:
            return 400, b'{"error": "unknown plan field"}'
        return 200, b"ok"

    receiver = Receiver(free_port(), answer).start()
    publish(env, alerts)
    notify = Notify(env, hook_env(receiver.url), tmp_path / "notify.log")
    try:
        notify.wait("all three answered", lambda: len(receiver.hits) >= 3)
        time.sleep(2)  # a refused alert is never retried: no more requests come
        metrics = notify.metrics()
        assert notify.stop() == 0, notify.log()
    finally:
        receiver.close()
    assert [h.headers["webhook-id"] for h in receiver.hits] == [a.alert_id for a in alerts]
    assert [h.status for h in receiver.hits] == [200, 400, 200]
    [dead] = asyncio.run(consume_all(broker, f"{env.app_id}.undeliverable", 1))
    assert Alert.model_validate_json(dead.value) == alerts[1]  # as it was on the topic
    assert dead.key == b"acc-r"
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["undeliverable_destination"] == "webhook"
    assert headers["undeliverable_status"] == "400"
    assert headers["undeliverable_body"] == '{"error": "unknown plan field"}'
    assert headers["undeliverable_topic"] == env.topics["alerts"]
    assert metric(metrics, "churnsignal_notify_undeliverable_total", destination="webhook") == 1
    assert metric(metrics, "churnsignal_notify_delivered_total", destination="webhook",
                  outcome="delivered") == 2


# Slack Block Kit, as documented (https://api.slack.com/reference/block-kit/blocks and
# .../composition-objects): the blocks and limits churnsignal uses.
_TEXT = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
         "properties": {"type": {"enum": ["plain_text", "mrkdwn"]},
                        "text": {"type": "string", "minLength": 1, "maxLength": 3000},
                        "emoji": {"type": "boolean"}, "verbatim": {"type": "boolean"}}}
_PLAIN = {**_TEXT, "properties": {**_TEXT["properties"], "type": {"const": "plain_text"}}}
SLACK_SCHEMA = {
    "type": "object", "required": ["text", "blocks"],
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "blocks": {"type": "array", "maxItems": 50, "items": {"oneOf": [
            {"type": "object", "required": ["type", "text"], "additionalProperties": False,
             "properties": {"type": {"const": "header"}, "block_id": {"type": "string"},
                            "text": {**_PLAIN, "properties": {**_PLAIN["properties"], "text": {
                                "type": "string", "minLength": 1, "maxLength": 150}}}}},
            {"type": "object", "required": ["type"], "additionalProperties": False,
             "anyOf": [{"required": ["text"]}, {"required": ["fields"]}],
             "properties": {"type": {"const": "section"}, "block_id": {"type": "string"},
                            "text": _TEXT, "fields": {"type": "array", "maxItems": 10,
                                                      "items": {**_TEXT, "properties": {
                                                          **_TEXT["properties"], "text": {
                                                              "type": "string", "maxLength":
                                                              2000}}}}}},
            {"type": "object", "required": ["type", "elements"], "additionalProperties": False,
             "properties": {"type": {"const": "actions"}, "elements": {
                 "type": "array", "maxItems": 25, "items": {
                     "type": "object", "required": ["type", "text"],
                     "additionalProperties": False, "properties": {
                         "type": {"const": "button"},
                         "text": {**_PLAIN, "properties": {**_PLAIN["properties"], "text": {
                             "type": "string", "maxLength": 75}}},
                         "url": {"type": "string", "maxLength": 3000, "pattern": "^https?://"},
                         "action_id": {"type": "string", "maxLength": 255}}}}}},
            {"type": "object", "required": ["type", "elements"], "additionalProperties": False,
             "properties": {"type": {"const": "context"}, "elements": {
                 "type": "array", "maxItems": 10, "items": _TEXT}}},
        ]}}}}

# PagerDuty Events API v2 (https://developer.pagerduty.com/api-reference/368ae3d938c9e-send-an-event-to-pager-duty)
PAGERDUTY_SCHEMA = {
    "type": "object", "required": ["routing_key", "event_action"],
    "additionalProperties": False,
    "properties": {
        "routing_key": {"type": "string", "minLength": 32, "maxLength": 32},
        "event_action": {"enum": ["trigger", "acknowledge", "resolve"]},
        "dedup_key": {"type": "string", "maxLength": 255},
        "payload": {"type": "object", "required": ["summary", "source", "severity"],
                    "additionalProperties": False, "properties": {
                        "summary": {"type": "string", "minLength": 1, "maxLength": 1024},
                        "source": {"type": "string", "minLength": 1},
                        "severity": {"enum": ["critical", "error", "warning", "info"]},
                        "timestamp": {"type": "string", "format": "date-time"},
                        "component": {"type": "string"}, "group": {"type": "string"},
                        "class": {"type": "string"}, "custom_details": {"type": "object"}}},
        "images": {"type": "array"},
        "links": {"type": "array", "items": {"type": "object", "required": ["href"],
                                             "properties": {"href": {"type": "string"},
                                                            "text": {"type": "string"}}}},
        "client": {"type": "string"}, "client_url": {"type": "string"},
    },
    "allOf": [
        {"if": {"properties": {"event_action": {"const": "trigger"}}},
         "then": {"required": ["payload"]}},
        {"if": {"properties": {"event_action": {"enum": ["acknowledge", "resolve"]}}},
         "then": {"required": ["dedup_key"]}},
    ]}


def test_slack_and_pagerduty_payloads_match_their_documented_schemas(
        broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    problems: list[str] = []

    def check(schema: dict[str, Any], reply: bytes, status: int) -> Callable[[Hit], tuple[
            int, bytes]]:
        def answer(hit: Hit) -> tuple[int, bytes]:
            try:
                jsonschema.validate(json.loads(hit.body), schema,
                                    format_checker=jsonschema.FormatChecker())
            except (jsonschema.ValidationError, ValueError) as exc:
                problems.append(str(exc)[:500])
                return 400, b"invalid_payload"  # as the services answer a bad payload
            return status, reply
        return answer

    slack = Receiver(free_port(), check(SLACK_SCHEMA, b"ok", 200)).start()
    pagerduty = Receiver(free_port(), lambda hit: check(PAGERDUTY_SCHEMA, json.dumps({
        "status": "success", "message": "Event processed",
        "dedup_key": json.loads(hit.body).get("dedup_key")}).encode(), 202)(hit)).start()
    account = "acc-<pay>&co"
    alerts = [make_alert(1, account), make_alert(2, account, "deescalated", "high", "critical"),
              make_alert(3, account, "deescalated", "low", "high")]
    publish(env, alerts)
    notify = Notify(env, {
        "CHURNSIGNAL_NOTIFY__SLACK_WEBHOOK_URL": slack.url,
        "CHURNSIGNAL_NOTIFY__PAGERDUTY_ROUTING_KEY": "R0123456789abcdef0123456789abcde",
        "CHURNSIGNAL_NOTIFY__PAGERDUTY_URL": f"http://127.0.0.1:{pagerduty.port}/v2/enqueue",
        "CHURNSIGNAL_NOTIFY__ACCOUNT_URL": "https://crm.example.com/accounts/{account_id}",
    }, tmp_path / "notify.log")
    try:
        notify.wait("three messages each", lambda: len(slack.hits) >= 3 and len(
            pagerduty.hits) >= 3)
        assert notify.stop() == 0, notify.log()
    finally:
        slack.close()
        pagerduty.close()
    assert problems == []
    assert [h.status for h in slack.hits] == [200] * 3
    assert [h.status for h in pagerduty.hits] == [202] * 3
    assert all(h.headers["content-type"] == "application/json" for h in slack.hits + pagerduty.hits)
    first = json.loads(slack.hits[0].body)
    text = json.dumps(first)
    # Slack's control characters are escaped in mrkdwn (plain_text shows text as it is)
    assert first["blocks"][0]["text"]["text"].startswith("acc-<pay>&co ")
    assert "<pay>" not in json.dumps([first["text"], first["blocks"][1:]])
    for part in ("acc-&lt;pay&gt;&amp;co", "critical", "82 / 100", "$245.00", "card_update",
                 "Payment failed after 4 attempts",
                 "https://crm.example.com/accounts/acc-%3Cpay%3E%26co"):
        assert part in text, part
    events = [json.loads(h.body) for h in pagerduty.hits]
    assert [e["event_action"] for e in events] == ["trigger", "trigger", "resolve"]
    assert len({e["dedup_key"] for e in events}) == 1  # one incident per account
    assert [e["payload"]["severity"] for e in events[:2]] == ["critical", "error"]
    assert events[0]["links"][0]["href"].endswith("acc-%3Cpay%3E%26co")
