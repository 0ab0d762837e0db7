"""Account attributes from Segment group traits, through a real `churnsignal worker` process
on the broker, with its embedded ClickHouse and real signed-webhook receivers on loopback.

The policy maps the group traits ``tier`` and ``csm_owner`` to the attributes ``tier`` and
``csm``. Two accounts send a Segment group call each (enterprise and free), then escalate on
support tickets (each open ticket is worth 10 points). Their alerts on ``churn.alerts``
carry the attributes (schema version 3); a destination routed by ``attributes: {tier:
[enterprise]}`` receives the enterprise account's alert only, one without routes receives
both; ``alerts_data`` has the plan and the attributes; the group calls counted as no
activity. And a table made before the columns existed gains them on migration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from churnsignal.app.embedded import free_port
from churnsignal.schemas.alerts import Alert
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.stream.policy import Signals
from churnsignal.stream.rows import alert_row
from tests.integration.helpers import (
    Worker,
    clickhouse_query,
    consume_all,
    metric,
    new_env,
    produce,
)
from tests.integration.test_ack_routing import alerts
from tests.integration.test_alertmanager_notify import BINARY, firing, running_alertmanager
from tests.integration.test_notify_delivery import SECRET, Receiver

pytestmark = [pytest.mark.integration]

ENTERPRISE = "acct-ent"
FREE = "acct-free"


def write_policy(path: Path) -> None:
    signals: dict[str, Any] = {name: {"weight": 0} for name in Signals.model_fields}
    signals["support_burden"] = {"weight": 100, "start": 0, "full": 10}  # 10 points a ticket
    path.write_text(yaml.safe_dump({
        "version": "traits-test",
        "signals": signals,
        "alerting": {"cooldown_hours": 0},
        "accounts": {"traits": {"tier": "tier", "csm": "csm_owner"}},
        "notify": {
            "destinations": {
                "cs-all": {"kind": "webhook", "url_env": "CS_ALL_URL", "secret_env": "CS_SECRET"},
                "enterprise": {"kind": "webhook", "url_env": "CS_ENT_URL",
                               "secret_env": "CS_SECRET"},
            },
            "routes": [
                {"to": ["cs-all"]},
                {"to": ["enterprise"], "attributes": {"tier": ["enterprise", "premium"]}},
            ],
        },
    }))


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def group_call(account: str, traits: dict[str, Any]) -> bytes:
    """A Segment group call as analytics.js sends it."""
    return orjson.dumps({"type": "group", "messageId": f"grp-{account}", "userId": f"u-{account}",
                         "groupId": account, "traits": traits, "timestamp": now_iso(),
                         "context": {"library": {"name": "analytics.js", "version": "2.11.1"}}})


def canonical(account: str, n: int, type_: str, data: dict[str, Any]) -> bytes:
    return json.dumps({"event_id": f"{account}-{n}", "account_id": account, "type": type_,
                       "occurred_at": now_iso(), "data": data}).encode()


def wait(worker: Worker, what: str, check: Any, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited: {worker.log()[-3000:]}")
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} not within {timeout}s; {worker.log()[-3000:]}")


def test_group_traits_reach_alerts_routes_and_clickhouse(broker: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        # a real Alertmanager too where it is installed (.ci/run installs it): the labels
        am = stack.enter_context(running_alertmanager(tmp_path)) if BINARY else None
        run(broker, tmp_path, am)


def run(broker: str, tmp_path: Path, am: str | None) -> None:
    env = new_env(broker, tmp_path)
    policy = tmp_path / "policy.yaml"
    write_policy(policy)
    everything = Receiver(free_port()).start()
    enterprise = Receiver(free_port()).start()
    worker = Worker(env, {
        "CHURNSIGNAL_POLICY_FILE": str(policy), "CS_ALL_URL": everything.url,
        "CS_ENT_URL": enterprise.url, "CS_SECRET": SECRET,
        "CHURNSIGNAL_NOTIFY__RETRY_BASE_S": "0.2", "CHURNSIGNAL_NOTIFY__RETRY_MAX_S": "1",
        **({"CHURNSIGNAL_NOTIFY__ALERTMANAGER_URL": am} if am else {})})
    t = env.topics
    try:
        worker.wait_ready()
        asyncio.run(produce(env.broker, [
            (t["billing"], ENTERPRISE.encode(), canonical(ENTERPRISE, 0, "subscription_created", {
                "status": "active", "plan": "scale", "mrr_cents": 250_000})),
            (t["usage"], None, group_call(ENTERPRISE, {
                "name": "Acme", "tier": "enterprise", "csm_owner": "ana@example.com",
                "employees": 120})),
            (t["usage"], None, group_call(FREE, {"name": "Globex", "tier": "free"})),
        ]))
        # topics are read independently: the attributes and the plan are in the state first
        wait(worker, "the attributes", lambda: worker.account(ENTERPRISE).get("attributes") == {
            "csm": "ana@example.com", "tier": "enterprise"} and worker.account(
            ENTERPRISE).get("plan") == "scale" and worker.account(FREE).get("attributes") == {
            "tier": "free"})
        for account in (ENTERPRISE, FREE):
            seen = worker.account(account)
            assert seen["last_active"] == 0.0 and seen["band"] == "low", seen  # not activity
        asyncio.run(produce(env.broker, [
            (t["support"], account.encode(),
             canonical(account, i, "ticket_opened", {"ticket_id": f"t{i}"}))
            for account in (ENTERPRISE, FREE) for i in range(1, 7)]))  # 60 points: high
        wait(worker, "both escalations", lambda: len(alerts(everything)) == 2)
        wait(worker, "the routed delivery", lambda: len(alerts(enterprise)) == 1)
        time.sleep(1)  # the free account's alert, skipped there, is not delivered late either
        by_account = {a["account_id"]: a for a in alerts(everything)}
        ent, free = by_account[ENTERPRISE], by_account[FREE]
        assert (ent["kind"], ent["band"], ent["schema_version"]) == ("escalated", "high", 3)
        assert ent["attributes"] == {"csm": "ana@example.com", "tier": "enterprise"}
        assert ent["plan"] == "scale"
        assert free["attributes"] == {"tier": "free"} and free["plan"] is None
        [routed] = alerts(enterprise)
        assert routed["alert_id"] == ent["alert_id"]
        metrics = worker.metrics()
        assert metric(metrics, "churnsignal_notify_delivered_total", destination="enterprise",
                      outcome="skipped") == 1
        assert metric(metrics, "churnsignal_notify_delivered_total", destination="enterprise",
                      outcome="delivered") == 1
        # churn.alerts itself: the alert as the delivery read it
        published = [Alert.model_validate_json(r.value)
                     for r in asyncio.run(consume_all(env.broker, t["alerts"]))]
        assert {a.account_id: a.attributes for a in published} == {
            ENTERPRISE: {"csm": "ana@example.com", "tier": "enterprise"}, FREE: {"tier": "free"}}
        if am is not None:  # the attributes are labels Alertmanager's routes can match on
            wait(worker, "the alert in Alertmanager", lambda: firing(am, ENTERPRISE), 40)
            [fired] = firing(am, ENTERPRISE)
            assert (fired["labels"]["tier"], fired["labels"]["csm"]) == (
                "enterprise", "ana@example.com")
            assert fired["annotations"]["plan"] == "scale"
            wait(worker, "the free account in Alertmanager", lambda: firing(am, FREE), 40)
            assert firing(am, FREE)[0]["labels"]["tier"] == "free"
        assert worker.stop() == 0
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        everything.close()
        enterprise.close()

    rows = clickhouse_query(worker.dsn(), "SELECT account_id, plan, attributes FROM alerts "
                            "ORDER BY account_id")
    assert rows == [[ENTERPRISE, "scale", {"csm": "ana@example.com", "tier": "enterprise"}],
                    [FREE, "", {"tier": "free"}]]
    # the group calls are in no daily count: the subscription and the tickets are the day's
    # only events
    daily = clickhouse_query(worker.dsn(), "SELECT account_id, events, usage_events, "
                             "billing_events, support_events FROM account_daily "
                             "ORDER BY account_id")
    assert daily == [[ENTERPRISE, 7, 0, 1, 6], [FREE, 6, 0, 0, 6]]
    # and in no billing_events row: only the subscription is there
    billing = clickhouse_query(worker.dsn(), "SELECT account_id, type FROM billing_events")
    assert billing == [[ENTERPRISE, "subscription_created"]]


OLD_ALERTS_DATA = """CREATE TABLE alerts_data (
    alert_id String, account_id String, kind LowCardinality(String),
    band LowCardinality(String), previous_band LowCardinality(String), score Float32,
    reasons Array(LowCardinality(String)), plays Array(LowCardinality(String)),
    mrr_at_risk_cents Int64, trigger_event_id String,
    triggered_at DateTime64(3, 'UTC'), emitted_at DateTime64(3, 'UTC'),
    policy_version LowCardinality(String)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(emitted_at) ORDER BY (account_id, alert_id)"""


@pytest.mark.offline
async def test_an_alerts_table_from_before_gains_plan_and_attributes(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'ch'}"
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=dsn)
    client.command(OLD_ALERTS_DATA)
    client.command("INSERT INTO alerts_data VALUES ('old', 'acct-old', 'escalated', 'high', "
                   "'low', 60, ['support_burden'], ['support_escalation'], 0, '', "
                   "'2026-01-01 00:00:00', '2026-01-01 00:00:00', 'p1')")
    client.close()
    alert = Alert(alert_id="new", account_id="acct-new", kind="escalated", score=80,
                  band="critical", previous_band="low", reasons=[], mrr_at_risk_cents=100,
                  triggered_at=1.767e9, emitted_at=1.767e9, policy_version="p2", plan="scale",
                  attributes={"tier": "enterprise"})
    sink = ClickHouseSink(dsn)
    try:
        assert await sink.write({"alerts_data": [alert_row(alert)]}) == []  # migrates first
        rows = sink.query("SELECT alert_id, plan, attributes FROM alerts ORDER BY alert_id")
        assert [list(r) for r in rows.result_rows] == [
            ["new", "scale", {"tier": "enterprise"}], ["old", "", {}]]
    finally:
        sink.close()
