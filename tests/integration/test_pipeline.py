"""End to end through a real broker, a real `churnsignal worker` process and real ClickHouse."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.helpers import (
    WebhookReceiver,
    Worker,
    clickhouse_query,
    consume_all,
    metric,
    new_env,
    produce,
)
from tests.scenarios import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _alerts_by_account(records: list[Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        alert = orjson.loads(rec.value)
        out[alert["account_id"]].append(alert)
    return out


def test_pipeline_alerts_dead_letters_and_clickhouse_totals_survive_restart_and_replay(
        broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    topics = env.topics
    now = time.time()
    s = Scenario(now)
    # healthy: steady use for 40 days, up to now
    s.steady("healthy-1", days=40, per_day=6)
    s.ticket("healthy-1", 3, 4242)
    # declining: steady for 33 days, then almost nothing; its last event is fresh (live)
    s.steady("decline-1", days=33, per_day=8, until_days_ago=7)
    s.usage("decline-1", 3.0)
    s.usage("decline-1", 0.01)
    # scheduled cancellation: healthy usage, then Stripe says it cancels at period end
    s.subscription("cancel-1", 40)
    s.steady("cancel-1", days=40, per_day=6)
    s.subscription("cancel-1", 0.001, cancel=True, kind="customer.subscription.updated")
    # payment: Stripe retries, then gives up (phase 1); paid later (phase 2)
    s.subscription("pay-1", 40)
    s.steady("pay-1", days=40, per_day=6)
    s.payment_failed("pay-1", 0.003, attempt=1, final=False)
    s.payment_failed("pay-1", 0.002, attempt=4, final=True)
    # silent: steady use, then nothing for 15 days; only the re-score timer can see it
    s.steady("silent-1", days=30, per_day=5, until_days_ago=15)
    duplicate = s.usage("healthy-1", 0.02)
    messages = [(topics[kind], key, value) for kind, key, value in s.messages]
    messages.append((topics["usage"], b"healthy-1", duplicate))  # a producer retry
    bad = [b"not json at all", b'{"event_id":"x","account_id":"a","type":"nope",'
           b'"occurred_at":"2026-01-01T00:00:00Z"}', b'{"event_id":"y","type":"session",'
           b'"occurred_at":"2026-01-01T00:00:00Z","account_id":""}', b"[" * 300_000]
    messages += [(topics["usage"], None, b) for b in bad]
    unused = (b'{"id":"evt_u","object":"event","type":"customer.created","created":1700000000,'
              b'"data":{"object":{"id":"cus_1","object":"customer"}}}')
    messages.append((topics["billing"], None, unused))
    accepted = len(s.messages)  # the duplicate, the bad ones and the unused type are not

    hook = WebhookReceiver(fail_first=2)  # alerts are also POSTed; the first two get a 503
    worker = Worker(env, extra={"CHURNSIGNAL_WEBHOOK__URL": hook.url,
                                "CHURNSIGNAL_WEBHOOK__RETRY_MAX_S": "0.2"})
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, messages))
        worker.wait_applied(accepted)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            by_account = _alerts_by_account(asyncio.run(consume_all(broker, topics["alerts"], 1)))
            if {"decline-1", "cancel-1", "pay-1", "silent-1"} <= set(by_account):
                break
            time.sleep(1)
        # phase 2: the payment goes through
        s.messages.clear()
        s.invoice_paid("pay-1", 0.0001)
        s.usage("healthy-1", 5.0)  # a five-day-old event that arrives late
        asyncio.run(produce(broker, [(topics[k], key, v) for k, key, v in s.messages]))
        accepted += 2
        worker.wait_applied(accepted)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            by_account = _alerts_by_account(asyncio.run(consume_all(broker, topics["alerts"], 1)))
            if len(by_account["pay-1"]) >= 2:
                break
            time.sleep(1)
        metrics = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        hook.close()

    # --- alerts
    assert "healthy-1" not in by_account, by_account.get("healthy-1")
    decline = by_account["decline-1"]
    assert len(decline) == 1 and decline[0]["kind"] == "escalated"
    assert decline[0]["reasons"][0]["code"] == "usage_decline"
    assert decline[0]["band"] in ("high", "critical")
    cancel = by_account["cancel-1"]
    assert [a["band"] for a in cancel] == ["critical"]
    assert cancel[0]["reasons"][0]["code"] == "cancellation_scheduled"
    assert cancel[0]["reasons"][0]["play"] == "offer_pause_or_plan_change"
    pay = by_account["pay-1"]
    assert [a["kind"] for a in pay] == ["escalated", "deescalated"], pay
    assert pay[0]["reasons"][0]["code"] == "payment_failed_final", pay
    assert pay[0]["reasons"][0]["kind"] == "involuntary"
    assert pay[1]["band"] == "low"
    silent = by_account["silent-1"]  # its events are 15 days old: the timer alone alerts
    assert len(silent) == 1 and silent[0]["trigger_event_id"] is None, silent
    assert silent[0]["band"] in ("high", "critical")
    assert "inactivity" in [r["code"] for r in silent[0]["reasons"]]
    all_alerts = [a for alerts in by_account.values() for a in alerts]
    assert len({a["alert_id"] for a in all_alerts}) == len(all_alerts)
    # the webhook got every alert (retried through the 503s), as the topic has them
    assert {b["alert_id"] for b in hook.bodies} == {a["alert_id"] for a in all_alerts}
    assert metric(metrics, "churnsignal_webhook_deliveries_total", outcome="delivered") == len(
        all_alerts)

    # --- dead letters: every bad message, with its reason, and nothing else
    dlq = asyncio.run(consume_all(broker, topics["dlq"], 1))
    reasons = Counter(dict(r.headers)["dlq_reason"].decode() for r in dlq)
    assert reasons == Counter({"not_json": 1, "unknown_type": 1, "invalid": 1, "too_large": 1})
    assert all(dict(r.headers)["dlq_topic"].decode() == topics["usage"] for r in dlq)
    assert metric(metrics, "churnsignal_events_dead_lettered_total") == 4
    assert metric(metrics, "churnsignal_duplicates_skipped_total") == 1
    assert metric(metrics, "churnsignal_events_skipped_total") == 1
    assert metric(metrics, "churnsignal_events_applied_total") == accepted
    assert metric(metrics, "churnsignal_events_late_total") >= 1  # at least the one sent late

    # --- ClickHouse, read after the worker stopped: its shutdown left everything durable
    dsn = env.settings().effective_clickhouse_dsn()
    [[events, accounts]] = clickhouse_query(
        dsn, "SELECT sum(events), uniqExact(account_id) FROM account_daily")
    assert (int(events), int(accounts)) == (accepted, 5)
    [[ch_alerts]] = clickhouse_query(dsn, "SELECT count() FROM alerts")
    assert int(ch_alerts) == len(all_alerts)

    # --- replay: restart (state recovered from the changelog) and re-read every source topic
    # a new ingest group reads every source topic from the beginning again
    worker = Worker(env, extra={"CHURNSIGNAL_INGEST__GROUP_ID": f"{env.app_id}-replay"})
    try:
        worker.wait_ready()
        summary = worker.wait_applied(accepted)
        time.sleep(3)  # a few re-score ticks too
        summary = worker.summary()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    # Every record of every source topic came back and was recognised as a duplicate: the
    # first worker's shutdown made every applied pack durable and left the rest unapplied.
    stats = summary["stats"]
    assert stats.get("events_applied", 0) == 0, stats
    assert stats["duplicates"] == accepted + 1, stats
    after = _alerts_by_account(asyncio.run(consume_all(broker, topics["alerts"], 1)))
    # not one alert published again, not even with the same id
    assert sorted(a["alert_id"] for alerts in after.values() for a in alerts) == sorted(
        a["alert_id"] for a in all_alerts)
    [[events_after]] = clickhouse_query(dsn, "SELECT sum(events) FROM account_daily")
    assert int(events_after) == accepted
