"""Acknowledge, snooze and routing through a real `churnsignal worker` process on the broker,
with its embedded ClickHouse and real signed-webhook receivers on loopback.

One account is driven through bands with support tickets (a policy where each open ticket is
worth 10 points): it alerts, is acked, dips and comes back to the same band without alerting,
alerts on the band above; is snoozed, comes back quietly, and alerts once the snooze ends.
Two named destinations from the policy file receive what their routes say: one everything,
the other only critical enterprise accounts (and the de-escalations that follow them). The
acks and snoozes are rows in ClickHouse, beside their alerts."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from standardwebhooks.webhooks import Webhook

from churnsignal.app.embedded import free_port
from churnsignal.stream.policy import Signals
from tests.integration.helpers import Env, Worker, clickhouse_query, metric, new_env, produce
from tests.integration.test_notify_delivery import SECRET, Receiver

pytestmark = [pytest.mark.integration]

TOKEN = "test-token-0123456789abcdef"
ACCOUNT = "acct-ack"


def write_policy(path: Path, secret_file: Path) -> None:
    signals: dict[str, Any] = {name: {"weight": 0} for name in Signals.model_fields}
    signals["support_burden"] = {"weight": 100, "start": 0, "full": 10}  # 10 points a ticket
    path.write_text(yaml.safe_dump({
        "version": "ack-test",
        "signals": signals,
        "alerting": {"cooldown_hours": 0},
        "notify": {
            "destinations": {
                "cs-all": {"kind": "webhook", "url_env": "CS_ALL_URL", "secret_env": "CS_SECRET"},
                "ent-critical": {"kind": "webhook", "url_env": "CS_ENT_URL",
                                 "secret_file": str(secret_file)},
            },
            "routes": [
                {"to": ["cs-all"]},
                {"to": ["ent-critical"], "bands": ["critical"], "plans": ["enterprise"],
                 "min_mrr_at_risk": 1000},
            ],
        },
    }))


class Driver:
    """Events for the account, and the worker's API with the bearer token."""

    def __init__(self, env: Env, worker: Worker) -> None:
        self.env = env
        self.worker = worker
        self.n = 0

    def send(self, *events: tuple[str, str, dict[str, Any]]) -> None:
        messages = []
        for topic, type_, data in events:
            self.n += 1
            messages.append((self.env.topics[topic], ACCOUNT.encode(), json.dumps({
                "event_id": f"e{self.n}", "account_id": ACCOUNT, "type": type_,
                "occurred_at": datetime.now(UTC).isoformat(), "data": data}).encode()))
        asyncio.run(produce(self.env.broker, messages))

    def tickets(self, type_: str, *ids: int) -> None:
        self.send(*[("support", type_, {"ticket_id": f"t{i}"}) for i in ids])

    def call(self, method: str, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.worker.port}{path}",
                                         method=method, data=b"" if method == "POST" else None)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def account(self) -> dict[str, Any]:
        status, body = self.call("GET", f"/api/accounts/{ACCOUNT}")
        return body if status == 200 else {}

    def wait(self, what: str, check: Any, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.worker.log()[-3000:]}")
            if check():
                return
            time.sleep(0.3)
        raise AssertionError(f"{what} not within {timeout}s; account {self.account()}; "
                             f"{self.worker.log()[-3000:]}")


def alerts(receiver: Receiver) -> list[dict[str, Any]]:
    """Each alert once (first delivery), verified as signed by churnsignal."""
    seen: dict[str, dict[str, Any]] = {}
    for hit in receiver.hits:
        doc = Webhook(SECRET).verify(hit.body, hit.headers)
        seen.setdefault(doc["data"]["alert_id"], doc["data"])
    return list(seen.values())


def shape(received: list[dict[str, Any]]) -> list[str]:
    return [f"{a['kind']}:{a['band']}" for a in received]


def test_ack_and_snooze_quiet_repeats_and_routes_pick_destinations(
        broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    secret_file = tmp_path / "ent_whsec"
    secret_file.write_text(SECRET)
    policy = tmp_path / "policy.yaml"
    write_policy(policy, secret_file)
    everything = Receiver(free_port()).start()
    critical = Receiver(free_port()).start()
    worker = Worker(env, {
        "CHURNSIGNAL_POLICY_FILE": str(policy), "CHURNSIGNAL_API_TOKEN": TOKEN,
        "CS_ALL_URL": everything.url, "CS_ENT_URL": critical.url, "CS_SECRET": SECRET,
        "CHURNSIGNAL_NOTIFY__RETRY_BASE_S": "0.2", "CHURNSIGNAL_NOTIFY__RETRY_MAX_S": "1"})
    d = Driver(env, worker)
    try:
        worker.wait_ready()
        # /api/* auth applies to the new views; bad parameters are a 400 naming them
        assert d.call("POST", f"/api/accounts/{ACCOUNT}/ack", token=None)[0] == 401
        assert d.call("POST", f"/api/accounts/{ACCOUNT}/ack", token="wrong")[0] == 401
        status, body = d.call("POST", f"/api/accounts/{ACCOUNT}/snooze")
        assert (status, body["parameter"]) == (400, "until")
        status, body = d.call("POST", f"/api/accounts/{ACCOUNT}/ack?until=2030-01-01T00:00:00Z")
        assert (status, body["parameter"]) == (400, "until")

        d.send(("billing", "subscription_created", {"status": "active", "plan": "enterprise",
                                                    "mrr_cents": 250_000}))
        # topics are read independently: the plan is in the state before any alert
        d.wait("the subscription", lambda: d.account().get("plan") == "enterprise")
        d.tickets("ticket_opened", 1, 2, 3, 4, 5, 6)  # 60 points: high
        d.wait("the escalation to high", lambda: shape(alerts(everything)) == ["escalated:high"])
        first = alerts(everything)[0]
        assert first["plan"] == "enterprise" and first["schema_version"] == 3

        status, ack = d.call("POST", f"/api/accounts/{ACCOUNT}/ack?by=ana%40example.com"
                                     "&note=on%20it")
        assert status == 202, ack
        assert ack["alert_id"] == first["alert_id"]  # the latest alert, found in ClickHouse
        d.wait("the ack folded", lambda: d.account().get("ack_band") == "high")

        d.tickets("ticket_solved", 1, 2)  # 40: medium, told (it resolves incidents)
        d.wait("the dip", lambda: shape(alerts(everything))[1:] == ["deescalated:medium"])
        d.tickets("ticket_opened", 7, 8)  # back to 60: high again, quiet
        d.wait("back at high", lambda: d.account().get("band") == "high")
        time.sleep(3)  # a re-score tick (2 s) or two: still nothing
        assert shape(alerts(everything)) == ["escalated:high", "deescalated:medium"]

        d.tickets("ticket_opened", 9, 10)  # 80: critical, above what was acked
        d.wait("the escalation to critical", lambda: len(alerts(everything)) == 3)
        third = alerts(everything)[2]
        assert (third["kind"], third["band"], third["previous_band"]) == (
            "escalated", "critical", "medium")
        assert d.account().get("ack_band") is None  # the ack is over

        snooze_end = time.time() + 20
        until = datetime.fromtimestamp(snooze_end, tz=UTC).isoformat().replace(
            "+00:00", "Z")
        status, snooze = d.call("POST", f"/api/accounts/{ACCOUNT}/snooze?until={until}")
        assert status == 202 and snooze["alert_id"] == third["alert_id"], snooze
        d.wait("the snooze folded", lambda: d.account().get("ack_band") == "critical")
        d.tickets("ticket_solved", 9, 10)  # 60: high, told
        d.wait("the second dip", lambda: shape(alerts(everything))[3:] == ["deescalated:high"])
        d.tickets("ticket_opened", 11, 12)  # 80: critical again, quiet while snoozed
        d.wait("back at critical", lambda: d.account().get("band") == "critical")
        time.sleep(2)
        assert len(alerts(everything)) == 4
        assert time.time() < snooze_end - 1  # the quiet was the snooze's, not its end's
        # the snooze ends: the re-score tick finds the account still critical and alerts
        d.wait("the alert after the snooze", lambda: len(alerts(everything)) == 5, 40)
        fifth = alerts(everything)[4]
        assert (fifth["kind"], fifth["band"]) == ("escalated", "critical")
        assert fifth["emitted_at"] >= snooze_end - 1
        # routing: the enterprise-critical destination got the critical escalations and the
        # de-escalation in between (its incident's update), nothing from before
        d.wait("routed deliveries", lambda: len(alerts(critical)) == 3)
        assert [a["alert_id"] for a in alerts(critical)] == [
            a["alert_id"] for a in alerts(everything)[2:]]
        metrics = worker.metrics()
        assert metric(metrics, "churnsignal_notify_delivered_total", destination="ent-critical",
                      outcome="skipped") == 2
        assert metric(metrics, "churnsignal_notify_delivered_total", destination="cs-all",
                      outcome="delivered") == 5
        assert worker.stop() == 0
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        everything.close()
        critical.close()

    rows = clickhouse_query(worker.dsn(), "SELECT account_id, action, alert_id, band, by, note, "
                            "until IS NULL FROM alert_actions ORDER BY at")
    assert rows == [[ACCOUNT, "ack", first["alert_id"], "high", "ana@example.com", "on it", 1],
                    [ACCOUNT, "snooze", third["alert_id"], "critical", "", "", 0]]
    beside = clickhouse_query(worker.dsn(), "SELECT alert_id, action FROM alert_outcomes "
                              "ORDER BY triggered_at")
    assert beside == [[first["alert_id"], "ack"], [third["alert_id"], "snooze"],
                      [fifth["alert_id"], ""]]
