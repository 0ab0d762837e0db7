"""Events that do not name their account find it through learned identity links, in a real run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from churnsignal.tools.synthetic import stripe_event, stripe_subscription
from tests.integration.helpers import Worker, clickhouse_query, metric, new_env, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def test_unattributed_events_wait_then_join_their_account(broker: str, tmp_path: Path) -> None:
    env = new_env(broker, tmp_path)
    t = env.topics
    now = time.time()
    usage = []
    # Segment: a user's track calls name no account (no context.groupId) ...
    for i in range(3):
        usage.append((t["usage"], b"u-late", orjson.dumps({
            "type": "track", "event": "Report Viewed", "userId": "u-late", "messageId": f"m{i}",
            "timestamp": _iso(now - 3600 + i)})))
    # ... until a Group call says which account the user belongs to.
    group = (t["usage"], b"u-late", orjson.dumps({
        "type": "group", "userId": "u-late", "groupId": "joined-1", "messageId": "g1",
        "timestamp": _iso(now - 60), "traits": {"name": "Joined Inc"}}))
    billing = []
    # Stripe: a dispute names only its charge; it arrives before anything links the charge.
    billing.append((t["billing"], None, stripe_event("charge.dispute.created", {
        "id": "dp_1", "object": "dispute", "charge": "ch_s1", "amount": 4900, "currency": "usd",
        "reason": "fraudulent", "status": "needs_response"}, now - 300, "evt_dispute")))
    # The subscription (with metadata) links the customer; the invoice (without metadata)
    # names customer and charge, which links the charge and lets the dispute through.
    billing.append((t["billing"], None, stripe_event(
        "customer.subscription.created", stripe_subscription("stripe-1", "active", 3, 4900),
        now - 200, "evt_sub")))
    billing.append((t["billing"], None, stripe_event("invoice.paid", {
        "id": "in_s1", "object": "invoice", "customer": "cus_stripe-1", "charge": "ch_s1",
        "amount_due": 14700, "currency": "usd", "attempt_count": 1, "status": "paid"},
        now - 100, "evt_inv")))
    # A customer nobody ever links: after the grace period its own id is the account.
    billing.append((t["billing"], None, stripe_event("invoice.payment_failed", {
        "id": "in_o1", "object": "invoice", "customer": "cus_orphan", "amount_due": 900,
        "currency": "usd", "attempt_count": 1, "next_payment_attempt": int(now + 86400)},
        now - 50, "evt_orphan")))

    worker = Worker(env, extra={"CHURNSIGNAL_INGEST__IDENTITY_GRACE_S": "3"})
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, usage + billing[:1]))
        time.sleep(2)  # the track calls and the dispute are parked by now ...
        asyncio.run(produce(broker, [group, *billing[1:]]))  # ... and the links release them
        summary = worker.wait_applied(3 + 4)
        metrics = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    # parked: the 3 track calls, the dispute, the orphan's invoice (and stripe-1's invoice
    # when it overtook the subscription); every one of them joined an account in the end
    parked = metric(metrics, "churnsignal_identity_events_total", outcome="parked")
    assert parked >= 5
    assert metric(metrics, "churnsignal_identity_events_total", outcome="joined") == parked
    assert summary["events_in_clickhouse"] == 7
    dsn = env.settings().effective_clickhouse_dsn()
    per_account = dict(clickhouse_query(
        dsn, "SELECT account_id, toInt64(sum(events)) FROM account_daily GROUP BY account_id"))
    assert per_account == {"joined-1": 3, "stripe-1": 3, "cus_orphan": 1}, per_account
    types = dict(clickhouse_query(
        dsn, "SELECT type, account_id FROM billing_events ORDER BY occurred_at"))
    assert types == {"dispute_created": "stripe-1", "subscription_created": "stripe-1",
                     "invoice_paid": "stripe-1", "payment_failed": "cus_orphan"}

    # Replay every source topic through a new ingest group: identities and accounts skip
    # what they already took, so nothing is applied or forwarded again.
    produced = len(usage) + len(billing) + 1
    worker = Worker(env, extra={"CHURNSIGNAL_INGEST__IDENTITY_GRACE_S": "3",
                                "CHURNSIGNAL_INGEST__GROUP_ID": f"{env.app_id}-replay"})
    try:
        worker.wait_ready()
        deadline = time.monotonic() + 60
        while metric(worker.metrics(), "churnsignal_events_consumed_total") < produced:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(4)  # flushes and re-score ticks
        stats = worker.summary()["stats"]
        replay_metrics = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert stats.get("events_applied", 0) == 0, stats
    assert metric(replay_metrics, "churnsignal_identity_events_total", outcome="joined") == 0
    assert dict(clickhouse_query(
        dsn, "SELECT account_id, toInt64(sum(events)) FROM account_daily GROUP BY account_id")
    ) == per_account
