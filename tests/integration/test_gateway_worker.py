"""SDK and webhooks -> gateway -> Kafka -> a real worker process -> ClickHouse: every track
call is counted exactly once in account_daily, also when the SDK's batches are sent twice (a
retry after a lost answer); Stripe, Zendesk and Intercom webhooks reach billing_events and
support_events, with support.events pinned to Zendesk and Intercom both."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.integration.helpers import Worker, clickhouse_query, figures, new_env
from tests.integration.test_gateway import (
    WRITE_KEY,
    GatewayProcess,
    basic,
    intercom_headers,
    post_raw,
    stripe_event,
    stripe_headers,
    zendesk_headers,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_track_call_through_the_gateway_is_counted_once_in_account_daily(
        broker: str, tmp_path: Path) -> None:
    from rudderstack.analytics.client import Client as RudderClient
    from segment.analytics.client import Client as SegmentClient

    env = new_env(broker, tmp_path)
    gateway = GatewayProcess(env, broker, tmp_path)
    worker = Worker(env, extra={"CHURNSIGNAL_INGEST__SOURCES": orjson.dumps(
        {env.topics["support"]: ["zendesk", "intercom"],
         env.topics["billing"]: "stripe"}).decode()})
    run = uuid.uuid4().hex[:6]
    expected: Counter[str] = Counter()
    try:
        gateway.wait_ready()
        worker.wait_ready()
        errors: list[object] = []
        clients = [SegmentClient(WRITE_KEY, host=gateway.url, gzip=True, upload_interval=0.05,
                                 on_error=lambda e, b: errors.append(e)),
                   RudderClient(WRITE_KEY, host=gateway.url, gzip=False, upload_interval=0.05,
                                on_error=lambda e, b: errors.append(e))]
        for c, client in enumerate(clients):
            for i in range(60):
                account = f"acct-{run}-{i % 4}"
                client.track(user_id=f"u{i % 7}", event="Report Exported",
                             properties={"feature": "reports"}, context={"groupId": account},
                             message_id=f"{run}-{c}-{i}")
                expected[account] += 1
            # a user whose track calls name no account, linked by a group call first
            client.group(user_id=f"lonely-{c}", group_id=f"acct-{run}-0",
                         message_id=f"{run}-{c}-group")
            client.flush()
            client.join()
        # the same messages again, as a client resending a batch whose answer was lost
        again = {"batch": [{"type": "track", "userId": "u1", "event": "Report Exported",
                            "context": {"groupId": f"acct-{run}-{i % 4}"},
                            "properties": {"feature": "reports"},
                            "messageId": f"{run}-0-{i}"} for i in range(0, 60, 4)]}
        assert post_raw(gateway.url, "/v1/batch", orjson.dumps(again), basic())[0] == 200
        assert errors == []
        support, billing = _webhooks(gateway, run)
        total = sum(expected.values()) + support + billing
        worker.wait_applied(total, timeout=120)
        deadline = time.monotonic() + 30
        duplicates = 0
        while time.monotonic() < deadline:  # the resent 15 arrive as duplicates
            duplicates = int(worker.summary()["stats"].get("duplicates", 0))
            if duplicates >= 15:
                break
            time.sleep(0.5)
        figures(f"gateway->worker: {sum(expected.values())} track calls via 2 SDKs, 15 resent, "
                f"{duplicates} duplicates skipped; {support} support and {billing} billing "
                "webhooks")
    finally:
        assert gateway.stop() == 0
        assert worker.stop() == 0, worker.log()[-3000:]
    rows = clickhouse_query(worker.dsn(), "SELECT account_id, toInt64(sum(usage_events)) FROM "
                                          "account_daily WHERE account_id LIKE {p:String} "
                                          "GROUP BY account_id", {"p": f"acct-{run}-%"})
    assert dict(rows) == dict(expected)
    assert duplicates >= 15
    tickets = clickhouse_query(worker.dsn(), "SELECT account_id, type, ticket_id FROM "
                               "support_events WHERE account_id LIKE {p:String} ORDER BY ticket_id",
                               {"p": f"acct-{run}-%"})
    assert tickets == [[f"acct-{run}-1", "ticket_opened", "intercom:conversation:c-" + run],
                       [f"acct-{run}-2", "ticket_solved", "intercom:conversation:d-" + run],
                       [f"acct-{run}-3", "ticket_opened", "z-" + run]]
    subs = clickhouse_query(worker.dsn(), "SELECT account_id, type FROM billing_events "
                            "WHERE account_id = {a:String}", {"a": f"acct-{run}-0"})
    assert subs == [[f"acct-{run}-0", "subscription_updated"]]


def _webhooks(gateway: GatewayProcess, run: str) -> tuple[int, int]:
    """A Stripe subscription update, a Zendesk ticket and two Intercom conversations (one
    naming its company, one that waits under its contact until a contact payload links it),
    signed as each provider signs; returns (support events, billing events) to expect."""
    now = int(time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    stripe_body = stripe_event(run, account=f"acct-{run}-0")
    zen = orjson.dumps({
        "type": "zen:event-type:ticket.created", "id": f"zen-{run}", "time": stamp,
        "subject": f"zen:ticket:z-{run}",
        "detail": {"id": f"z-{run}", "organization_id": f"acct-{run}-3", "requester_id": "12",
                   "status": "OPEN", "created_at": stamp, "updated_at": stamp}, "event": {}})

    def note(topic: str, item: dict[str, object], nid: str) -> bytes:
        return orjson.dumps({"type": "notification_event", "app_id": "app", "id": nid,
                             "topic": topic, "created_at": now,
                             "data": {"type": "notification_event_data", "item": item}})

    opened = note("conversation.user.created",
                  {"type": "conversation", "id": f"c-{run}", "state": "open",
                   "company": {"id": "ic_1", "company_id": f"acct-{run}-1"},
                   "contacts": {"type": "contact.list", "contacts": [{"id": f"ct1-{run}"}]}},
                  f"notif-a-{run}")
    closed = note("conversation.admin.closed",
                  {"type": "conversation", "id": f"d-{run}", "state": "closed",
                   "contacts": {"type": "contact.list", "contacts": [{"id": f"ct2-{run}"}]}},
                  f"notif-b-{run}")
    contact = note("contact.user.updated",
                   {"type": "contact", "id": f"ct2-{run}", "role": "user",
                    "companies": {"type": "list", "data": [{"id": "ic_2",
                                                            "company_id": f"acct-{run}-2"}]}},
                   f"notif-c-{run}")
    sent = [("/webhooks/stripe", stripe_body, stripe_headers(stripe_body)),
            ("/webhooks/zendesk", zen, zendesk_headers(zen)),
            ("/webhooks/intercom", opened, intercom_headers(opened)),
            ("/webhooks/intercom", closed, intercom_headers(closed)),
            ("/webhooks/intercom", contact, intercom_headers(contact))]
    for path, body, headers in sent:
        status, _, answer = post_raw(gateway.url, path, body, headers)
        assert (status, orjson.loads(answer)) == (200, {"received": True}), (path, answer)
    return 3, 1
