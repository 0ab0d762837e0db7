"""`churnsignal sync stripe` against a local server that serves a generated Stripe history
through the same `stripe` client (its api_base): many pages, an interruption mid-way and a
resume (nothing missing, nothing doubled), 429s answered some of the time; and the result in
Kafka (billing.events byte for byte, snapshots) and in ClickHouse's lifecycle view."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.helpers import Worker, clickhouse_query, consume_all, figures, new_env

pytestmark = [pytest.mark.integration]

NOW = int(time.time())
DAY = 86_400
STATUSES = ["active", "trialing", "past_due", "unpaid", "paused", "canceled", "incomplete",
            "incomplete_expired"]


@dataclass
class History:
    """What Stripe holds for a generated business: the ground truth of the test."""

    customers: list[dict[str, Any]] = field(default_factory=list)
    subscriptions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # of every age

    @property
    def recent_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["created"] >= NOW - 30 * DAY]


def price(amount: int, interval: str) -> dict[str, Any]:
    return {"id": f"price_{interval}_{amount}", "object": "price", "lookup_key": None,
            "nickname": f"{interval}-{amount}", "unit_amount": amount, "currency": "usd",
            "recurring": {"interval": interval, "interval_count": 1}}


def generate(n: int = 240, seed: int = 7) -> History:
    rng = random.Random(seed)
    h = History()
    # days ago, never near Stripe's 30-day edge (the sync's own clock is a little later)
    ages = [*range(1, 29), *range(32, 45)]
    intervals = [("month", 4900), ("year", 58_800), ("week", 1_500)]
    for i in range(n):
        cid = f"cus_{i:05d}"
        created = NOW - rng.randrange(40, 900) * DAY - DAY // 2  # half a day off the edge
        linked = i % 4 != 0  # a quarter of the customers are linked by nothing
        h.customers.append({"id": cid, "object": "customer", "created": created,
                            "email": f"c{i}@example.com",
                            "metadata": {"account_id": f"acct-{i:05d}"} if linked else {}})
        for j in range(1 + (i % 5 == 0)):  # every fifth customer has a second subscription
            status = STATUSES[(i + j) % len(STATUSES)]
            start = created + j * 30 * DAY
            interval, amount = intervals[(i + j) % 3]
            sub = {"id": f"sub_{i:05d}_{j}", "object": "subscription", "customer": cid,
                   "status": status, "created": start, "start_date": start, "currency": "usd",
                   "cancel_at_period_end": status == "active" and i % 7 == 0,
                   "cancel_at": None, "canceled_at": None, "ended_at": None,
                   "trial_start": start if status == "trialing" else None,
                   "trial_end": start + 60 * DAY if status == "trialing" else None,
                   # half the linked customers also tag their subscriptions (the stream
                   # then learns the link from subscription events too)
                   "metadata": {"account_id": f"acct-{i:05d}"} if linked and i % 2 else {},
                   "pause_collection": None,
                   "cancellation_details": {"comment": None, "feedback": None, "reason": None},
                   "items": {"object": "list", "data": [{
                       "id": f"si_{i}_{j}", "object": "subscription_item", "quantity": 1 + i % 3,
                       "current_period_end": NOW + 10 * DAY, "price": price(amount, interval)}]}}
            if status in ("canceled", "incomplete_expired"):
                sub["ended_at"] = sub["canceled_at"] = NOW - rng.choice(ages) * DAY
                sub["cancellation_details"]["reason"] = rng.choice(
                    ["cancellation_requested", "payment_failed"])
            h.subscriptions.append(sub)
            # events: its last renewal, and its cancellation; some older than 30 days
            paid_at = max(NOW - rng.choice(ages) * DAY + i, start + DAY)
            if sub["ended_at"]:  # its last paid invoice came before its end
                paid_at = min(paid_at, sub["ended_at"] - DAY)
            h.events.append(event(f"evt_paid_{i}_{j}", "invoice.paid", paid_at, {
                "id": f"in_{i}_{j}", "object": "invoice", "customer": cid,
                "subscription": sub["id"], "amount_due": amount, "amount_paid": amount,
                "currency": "usd", "attempt_count": 1, "next_payment_attempt": None}))
            if sub["ended_at"]:
                h.events.append(event(f"evt_del_{i}_{j}", "customer.subscription.deleted",
                                      sub["ended_at"], {**sub, "status": "canceled"}))
    return h


def event(eid: str, type_: str, created: int, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": eid, "object": "event", "api_version": "2025-03-31.basil", "created": created,
            "data": {"object": obj}, "livemode": False, "pending_webhooks": 0,
            "request": {"id": None, "idempotency_key": None}, "type": type_}


class FakeStripe:
    """Stripe's list endpoints over a History, as Stripe pages them: newest first, `limit`,
    `starting_after`, `status` (default: all but canceled), `created[gte]`. ``rate_limit`` of
    the requests are answered 429; after ``fail_after`` pages every request fails (500)."""

    def __init__(self, history: History, rate_limit: float = 0.0, fail_after: int | None = None,
                 seed: int = 1) -> None:
        self.history = history
        self.rate_limit = rate_limit
        self.fail_after = fail_after
        self.rng = random.Random(seed)
        self.pages = 0
        self.limited = 0
        self.requests: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                status, body, headers = fake.answer(self.path, self.headers)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_{fake.pages}")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, headers: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            self.requests.append(path)
            if not headers.get("Authorization", "").startswith("Bearer rk_test_"):
                return 401, {"error": {"type": "invalid_request_error",
                                       "message": "Invalid API Key provided"}}, {}
            if self.fail_after is not None and self.pages >= self.fail_after:
                return 500, {"error": {"type": "api_error", "message": "injected outage"}}, {
                    "Stripe-Should-Retry": "false"}
            if self.rng.random() < self.rate_limit:
                self.limited += 1
                return 429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                       "message": "Too many requests"}}, {}
            url = urllib.parse.urlsplit(path)
            q = dict(urllib.parse.parse_qsl(url.query))
            name = url.path.removeprefix("/v1/")
            objects = {"customers": self.history.customers,
                       "subscriptions": self.history.subscriptions,
                       "events": self.history.events}.get(name)
            if objects is None:
                return 404, {"error": {"type": "invalid_request_error",
                                       "message": f"Unrecognized request URL {url.path}"}}, {}
            if name == "subscriptions":
                wanted = q.get("status")
                objects = [o for o in objects if wanted == "all" or o["status"] == wanted
                           or (wanted is None and o["status"] != "canceled")]
            if "created[gte]" in q:
                objects = [o for o in objects if o["created"] >= int(q["created[gte]"])]
            objects = sorted(objects, key=lambda o: (-o["created"], o["id"]))
            if "starting_after" in q:
                ids = [o["id"] for o in objects]
                objects = objects[ids.index(q["starting_after"]) + 1:]
            limit = int(q.get("limit", 10))
            self.pages += 1
            return 200, {"object": "list", "url": url.path, "data": objects[:limit],
                         "has_more": len(objects) > limit}, {}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sync(state: Path, api: str, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("CHURNSIGNAL_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    environ.update({"CHURNSIGNAL_STATE_DIR": str(state), "CHURNSIGNAL_STRIPE__API_BASE": api,
                    "CHURNSIGNAL_STRIPE__PAGE_SIZE": "25",
                    "CHURNSIGNAL_STRIPE__RATE_LIMIT_BACKOFF_S": "0.01",
                    "CHURNSIGNAL_STRIPE__RATE_LIMIT_BACKOFF_MAX_S": "0.05",
                    "CHURNSIGNAL_STRIPE__MAX_NETWORK_RETRIES": "0", **extra})
    key = state.parent / "stripe-key"
    key.write_text("rk_test_restricted_key\n")
    environ["CHURNSIGNAL_STRIPE__API_KEY_FILE"] = str(key)  # the secret-file form
    return subprocess.run([sys.executable, "-m", "churnsignal", "sync", "stripe"], env=environ,
                          capture_output=True, text=True, timeout=180, check=False)


def test_pages_resume_and_rate_limits_through_kafka(broker: str, tmp_path: Path) -> None:
    history = generate()
    env = new_env(broker, tmp_path)
    topics = {"CHURNSIGNAL_TOPICS__BILLING": env.topics["billing"],
              "CHURNSIGNAL_TOPICS__SNAPSHOTS": f"{env.app_id}.snapshots",
              "CHURNSIGNAL_APP_ID": env.app_id, "KAFKA_BOOTSTRAP_SERVERS": broker}
    state = tmp_path / "sync"
    # first run: the API fails for good after 14 pages (customers done, subscriptions half)
    fake = FakeStripe(history, rate_limit=0.25, fail_after=14)
    try:
        first = sync(state, fake.url, topics)
        assert first.returncode != 0 and "run it again to resume" in first.stderr, first.stderr
        checkpoint = orjson.loads((state / "stripe-sync" / "checkpoint.json").read_bytes())
        assert checkpoint["phase"] == "subscriptions" and checkpoint["cursor"], checkpoint
        # second run: the API answers again (still rate limited some of the time)
        with fake.lock:
            fake.fail_after, fake.requests, fake.limited = None, [], 0
        second = sync(state, fake.url, topics)
    finally:
        fake.close()
    assert second.returncode == 0, second.stderr + second.stdout
    assert "resumed" in second.stdout
    # the resume started where the first run stopped: no customer page was asked again
    assert not any(p.startswith("/v1/customers") for p in fake.requests), fake.requests[:3]
    assert any("starting_after=sub_" in p for p in fake.requests[:2]), fake.requests[:2]
    assert fake.limited > 0 and "rate limited: 0" not in second.stdout

    billing = asyncio.run(consume_all(broker, env.topics["billing"]))
    sent = [orjson.loads(r.value) for r in billing]
    expected = {e["id"]: e for e in history.recent_events}
    assert len(sent) == len(expected)  # nothing doubled
    assert {e["id"]: e for e in sent} == expected  # nothing missing, byte for byte the objects
    for partition in {r.partition for r in billing}:  # oldest first (keyed by customer)
        created = [orjson.loads(r.value)["created"] for r in billing if r.partition == partition]
        assert created == sorted(created)
    snapshots = [orjson.loads(r.value) for r in asyncio.run(
        consume_all(broker, f"{env.app_id}.snapshots"))]
    ids = [s["data"]["subscription_id"] for s in snapshots]
    assert len(ids) == len(set(ids))
    never_paid = {s["id"] for s in history.subscriptions
                  if s["status"] in ("incomplete", "incomplete_expired")}
    assert set(ids) == {s["id"] for s in history.subscriptions} - never_paid
    links = {c["id"]: c["metadata"].get("account_id") for c in history.customers}
    for snap in snapshots:
        sub = next(s for s in history.subscriptions if s["id"] == snap["data"]["subscription_id"])
        assert snap["account_id"] == (links[sub["customer"]] or sub["customer"])
        assert snap["data"]["status"] == sub["status"]
    assert f"snapshots: {len(snapshots)}" in second.stdout
    assert f"events: {len(expected)}" in second.stdout
    pages = 1 + len(history.customers) // 25 + len(history.subscriptions) // 25
    figures(f"sync stripe: {len(history.customers)} customers, {len(history.subscriptions)} "
            f"subscriptions, {len(expected)} events, >{pages} pages, "
            f"{fake.limited} answers 429 on the resumed run, 0 doubled, 0 missing")

    # a third run (finished checkpoint: a fresh sync) sends the same events again: same ids,
    # which the worker's dedup by event id turns into nothing
    fake = FakeStripe(history)
    try:
        third = sync(state, fake.url, topics)
    finally:
        fake.close()
    assert third.returncode == 0 and "resumed" not in third.stdout, third.stderr
    again = [orjson.loads(r.value)["id"] for r in asyncio.run(
        consume_all(broker, env.topics["billing"]))]
    assert len(again) == 2 * len(expected) and set(again) == set(expected)


def test_the_synced_history_reaches_the_lifecycle_view(broker: str, tmp_path: Path) -> None:
    """End to end on a real worker: snapshots seed the lifecycle, synced Events apply."""
    history = generate(n=40, seed=11)
    env = new_env(broker, tmp_path)
    snapshots_topic = f"{env.app_id}.snapshots"
    worker = Worker(env, extra={"CHURNSIGNAL_TOPICS__SNAPSHOTS": snapshots_topic,
                                "CHURNSIGNAL_INGEST__IDENTITY_GRACE_S": "1"})
    fake = FakeStripe(history, rate_limit=0.1)
    try:
        worker.wait_ready()
        done = sync(tmp_path / "sync", fake.url, {
            **env.env(), "CHURNSIGNAL_TOPICS__SNAPSHOTS": snapshots_topic,
            "KAFKA_BOOTSTRAP_SERVERS": broker})
        assert done.returncode == 0, done.stderr + done.stdout
        # every snapshot and every recent Event applied (those of customers no metadata links
        # wait for the identity grace, then take the customer id) and in ClickHouse
        snapshots = int(done.stdout.split("snapshots: ")[1].split()[0])
        applied, steady, deadline = -1.0, 0, time.monotonic() + 90
        # until nothing more is applied for 8 s: four re-score ticks (2 s in tests), each of
        # which releases the events whose 1 s identity grace ended
        while steady < 16:
            now = worker.summary()["stats"].get("events_applied", 0)
            steady, applied = (steady + 1, now) if now == applied else (0, now)
            assert time.monotonic() < deadline, worker.summary()
            time.sleep(0.5)
        assert applied >= snapshots, worker.summary()
    finally:
        fake.close()
        assert worker.stop() == 0, worker.log()[-3000:]
    lifecycle = {row[0]: row[1:] for row in clickhouse_query(
        worker.dsn(), "SELECT account_id, last_status FROM account_lifecycle")}
    links = {c["id"]: c["metadata"].get("account_id") or c["id"] for c in history.customers}
    checked = 0
    for sub in history.subscriptions:
        account = links[sub["customer"]]
        if sub["status"] in ("active", "canceled") and sum(
                s["customer"] == sub["customer"] for s in history.subscriptions) == 1:
            assert account in lifecycle, (account, sorted(lifecycle)[:10])
            assert lifecycle[account][0] == sub["status"], (account, lifecycle[account], sub)
            checked += 1
    assert checked >= 8
    [[paid]] = clickhouse_query(
        worker.dsn(), "SELECT toInt64(count()) FROM billing_events WHERE event_id LIKE 'evt_paid_%'")
    assert paid == sum(1 for e in history.recent_events if e["type"] == "invoice.paid")


def test_a_customer_linked_only_by_its_metadata_gets_its_live_events_at_once(
        broker: str, tmp_path: Path) -> None:
    """The sync knows a customer's account from the customer's metadata alone (its
    subscriptions carry none); its snapshots name the customer, so the worker learns the link
    from them: a later live invoice.paid keyed by the customer, without metadata, is applied
    under the account at once, not after the identity grace (10 minutes here)."""
    history = generate(n=12, seed=5)
    env = new_env(broker, tmp_path)
    snapshots_topic = f"{env.app_id}.snapshots"
    worker = Worker(env, extra={"CHURNSIGNAL_TOPICS__SNAPSHOTS": snapshots_topic,
                                "CHURNSIGNAL_INGEST__IDENTITY_GRACE_S": "600"})
    links = {c["id"]: c["metadata"].get("account_id") for c in history.customers}
    subs_of = {cid: [s for s in history.subscriptions if s["customer"] == cid] for cid in links}
    # linked by the customer's metadata only: the case the stream could not attribute
    only_customer = [cid for cid, account in links.items()
                     if account and not any(s["metadata"] for s in subs_of[cid])]
    snapshotted = [cid for cid in only_customer if any(
        s["status"] not in ("incomplete", "incomplete_expired") for s in subs_of[cid])]
    unsnapshotted = [cid for cid in only_customer if cid not in snapshotted]
    assert snapshotted and unsnapshotted, (snapshotted, unsnapshotted)
    fake = FakeStripe(history)
    try:
        worker.wait_ready()
        done = sync(tmp_path / "sync", fake.url, {
            **env.env(), "CHURNSIGNAL_TOPICS__SNAPSHOTS": snapshots_topic,
            "KAFKA_BOOTSTRAP_SERVERS": broker})
        assert done.returncode == 0, done.stderr + done.stdout
        snapshots = int(done.stdout.split("snapshots: ")[1].split()[0])
        deadline = time.monotonic() + 60  # snapshots make no daily rows: count them applied
        while worker.summary()["stats"].get("events_applied", 0) < snapshots:
            assert time.monotonic() < deadline, worker.summary()
            time.sleep(0.3)
        for cid in snapshotted:  # their snapshots reached their accounts
            assert worker.account(str(links[cid]))["events"] >= 1, cid
        # newer than anything synced (the snapshots' time included): seen by last_event
        live_at = int(time.time()) + 30
        started = time.monotonic()
        asyncio.run(produce_live(broker, env.topics["billing"], [
            event(f"evt_live_{cid}", "invoice.paid", live_at, {
                "id": f"in_live_{cid}", "object": "invoice", "customer": cid,
                "subscription": subs_of[cid][0]["id"], "amount_due": 4900,
                "amount_paid": 4900, "currency": "usd", "attempt_count": 1,
                "next_payment_attempt": None}) for cid in only_customer]))
        deadline = time.monotonic() + 45  # far below the 600 s grace
        while any(worker.account(str(links[cid]))["last_event"] < live_at
                  for cid in snapshotted):
            assert time.monotonic() < deadline, {
                cid: worker.account(str(links[cid])) for cid in snapshotted}
            time.sleep(0.3)
        took = time.monotonic() - started
        for cid in snapshotted:
            assert worker.account(cid) == {"events": 0, "owned_here": False}  # no fallback
        # a customer without a snapshot (its only subscription never paid) taught nothing:
        # its invoice still waits under its identity, neither under the account nor the id
        for cid in unsnapshotted:
            assert worker.account(str(links[cid]))["events"] == 0
            assert worker.account(cid)["events"] == 0
    finally:
        fake.close()
        assert worker.stop() == 0, worker.log()[-3000:]
    rows = dict(clickhouse_query(
        worker.dsn(), "SELECT event_id, account_id FROM billing_events "
                      "WHERE event_id LIKE 'evt_live_%'"))
    assert rows == {f"evt_live_{cid}": links[cid] for cid in snapshotted}, rows
    figures(f"sync stripe: {len(snapshotted)} customers linked only by their metadata got "
            f"their live invoices under their accounts in {took:.1f}s (identity grace 600s)")


async def produce_live(broker: str, topic: str, events: list[dict[str, Any]]) -> None:
    """Live Stripe Events as a webhook relay sends them: keyed by their customer."""
    from tests.integration.helpers import produce

    await produce(broker, [(topic, e["data"]["object"]["customer"].encode(), orjson.dumps(e))
                           for e in events])
