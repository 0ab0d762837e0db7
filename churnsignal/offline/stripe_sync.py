"""`churnsignal sync stripe`: subscriptions, account links and recent Events from Stripe's API.

What Stripe holds, read with the official ``stripe`` library and a restricted key:

1. **customers** (``/v1/customers``): the account each customer is linked to
   (``metadata.account_id``, as the stream reads it, schemas/stripe.py);
2. **subscriptions of every status** (``/v1/subscriptions?status=all``): each becomes the same
   ``subscription_snapshot`` that ``churnsignal import subscriptions`` writes (same topic
   ``billing.snapshots``, or straight into the embedded ClickHouse, same ids and row keys);
3. **the last 30 days of Events** (``/v1/events``, what Stripe keeps): sent to
   ``billing.events`` byte for byte as the API returned them, which is what a webhook endpoint
   receives, with their own ``evt_`` ids: the worker deduplicates by event id, so events it
   already saw live, or a second sync, change nothing.

Every listing is paginated with ``starting_after`` and spooled to JSONL files under
``CHURNSIGNAL_STATE_DIR/stripe-sync``; after each page the checkpoint (``checkpoint.json``,
written atomically: temporary file, fsync, rename) records the cursor and the spool's length, so
an interrupted sync resumes at the page it lost, and a page written after the last checkpoint is
cut off the spool rather than read twice. Only when every listing is complete are snapshots and
events sent, in a fixed order (snapshots per account in start order, events oldest first), in
chunks whose count is checkpointed too: a resend after a crash is a duplicate by id.

Rate limits: the ``stripe`` library retries 409s, 5xx and connection errors
(``max_network_retries``), but a 429 only when Stripe sends ``Stripe-Should-Retry: true``
(``HTTPClient._should_retry``); every other 429 surfaces as ``RateLimitError``. So each page
request here retries a ``RateLimitError`` itself, with exponential back-off and jitter (and
``Retry-After`` when the answer has one), up to ``rate_limit_retries`` times.

The mapping (a Stripe subscription object -> a snapshot event) is pure: ``account_of``,
``snapshot_of``. The rest is the edge (Stripe, files, Kafka, ClickHouse), with plain arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from churnsignal.offline.importer import MAX_ID, _iso, _snapshot_id
from churnsignal.schemas import identity
from churnsignal.schemas._util import str_id
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.schemas.stripe import _metadata_account, _period_end, _plan_name, monthly_cents

EVENTS_DAYS = 30  # what Stripe keeps of its Events
CHECKPOINT_VERSION = 1
LISTINGS = ("customers", "subscriptions", "events")
PHASES = (*LISTINGS, "send_snapshots", "send_events", "done")
_STATUSES = frozenset({"trialing", "active", "past_due", "unpaid", "paused", "canceled",
                       "incomplete", "incomplete_expired"})


# ---------------------------------------------------------------------------------------------
# Pure mapping


def customer_link(customer: dict[str, Any], account_key: str = "account_id") -> str | None:
    """The account a Stripe customer object is linked to by its metadata, or None."""
    return str_id((customer.get("metadata") or {}).get(account_key)) if isinstance(
        customer.get("metadata"), dict) else None


def account_of(subscription: dict[str, Any], links: dict[str, str],
               account_key: str = "account_id") -> str | None:
    """The account of a subscription as the stream would attribute its events: its own
    metadata, else its customer's link, else the customer id itself (the stream's fallback
    once no link arrives). None when it names no customer at all."""
    account = _metadata_account(subscription, account_key)
    if account is not None:
        return account[:MAX_ID]
    customer = subscription.get("customer")
    if isinstance(customer, dict):  # expanded
        linked = customer_link(customer, account_key)
        if linked is not None:
            return linked[:MAX_ID]
        customer = customer.get("id")
    customer_id = str_id(customer)
    if customer_id is None:
        return None
    linked = links.get(customer_id)
    if linked is not None:
        return linked[:MAX_ID]
    return (identity.fallback_account(identity.stripe_customer(customer_id)) or customer_id)[:MAX_ID]


def _epoch(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and 0 < value < 253_402_300_800 else None


def snapshot_of(subscription: dict[str, Any], account: str, as_of: float) -> dict[str, Any] | str:
    """The canonical ``subscription_snapshot`` of a Stripe subscription object as it stood at
    ``as_of``, or the reason it is skipped (a string).

    - status: Stripe's (``paused`` also when an active subscription pauses collection, as the
      stream reads it);
    - started_at: when it started paying: its trial's end for one that had a trial and is past
      it, else ``start_date``; for one still trialing, when its trial began; one that ended
      during its trial never paid and is skipped (``ended_in_trial``);
    - mrr_cents: monthly, from the items' prices, intervals, quantities and percent discount,
      exactly as the stream normalises a subscription event (``monthly_cents``); 0 when a
      price cannot be read;
    - ended_at, cancel_at_period_end (or a scheduled ``cancel_at``), current_period_end,
      currency, plan, ``cancellation_details.reason``;
    - stripe_customer_id: the subscription's customer when the account is another id (linked
      by metadata on the subscription or the customer): the worker learns that link from
      the snapshot, before the customer's live events that name no account.
    """
    sub_id = str_id(subscription.get("id"))
    if sub_id is None:
        return "no_id"
    status = subscription.get("status")
    if not isinstance(status, str) or status not in _STATUSES:
        return "unknown_status"
    start = _epoch(subscription.get("start_date")) or _epoch(subscription.get("created"))
    if start is None:
        return "no_start"
    trial_start = _epoch(subscription.get("trial_start"))
    trial_end = _epoch(subscription.get("trial_end"))
    ended = _epoch(subscription.get("ended_at"))
    if ended is not None and ended > as_of:
        ended = None  # not yet, as of the snapshot
    if status == "trialing":
        started = trial_start or start
    elif trial_end is not None and trial_end > start:
        if ended is not None and ended <= trial_end:
            return "ended_in_trial"
        started = trial_end
    else:
        started = start
    if started > as_of:
        return "starts_after_snapshot"
    if status in ("incomplete", "incomplete_expired"):
        return "never_paid"  # its first payment never succeeded: never a customer
    if ended is not None:
        status = "canceled"  # ended_at set: it has ended, whatever the status said
    if status == "active" and isinstance(subscription.get("pause_collection"), dict) and \
            subscription["pause_collection"].get("behavior"):
        status = "paused"
    mrr, _ = monthly_cents(subscription)
    customer = subscription.get("customer")
    customer_id = str_id(customer.get("id") if isinstance(customer, dict) else customer)
    customer_id = customer_id[:MAX_ID] if customer_id else None
    period_end = _epoch(_period_end(subscription))
    scheduled = subscription.get("cancel_at_period_end") is True or \
        _epoch(subscription.get("cancel_at")) is not None
    currency = subscription.get("currency")
    reason = (subscription.get("cancellation_details") or {}).get("reason") if isinstance(
        subscription.get("cancellation_details"), dict) else None
    data: dict[str, Any] = {
        "subscription_id": sub_id[:MAX_ID], "status": status, "plan": _plan_name(subscription),
        "mrr_cents": mrr or 0, "started_at": _iso(started),
        "ended_at": _iso(max(ended, started)) if ended is not None else None,
        "cancel_at_period_end": scheduled and ended is None,
        "current_period_end": _iso(period_end) if period_end is not None and ended is None
        else None,
        "currency": currency.lower() if isinstance(currency, str) and len(currency) == 3
        else None,
        "cancellation_reason": reason if isinstance(reason, str) and reason else None,
        # The customer, when the account is another id: the snapshot links it to the account
        # (decode: stripe.snapshot_links), as a customer.updated with the metadata would.
        "stripe_customer_id": customer_id if customer_id and customer_id != account else None,
    }
    data = {k: v for k, v in data.items() if v is not None}
    event = {"event_id": _snapshot_id(account, data["subscription_id"], data, as_of),
             "account_id": account, "type": "subscription_snapshot",
             "occurred_at": _iso(as_of), "data": data}
    try:
        EVENT_ADAPTER.validate_python(event)  # what the worker will accept, checked now
    except ValueError:
        return "invalid"
    return event


def ordered_snapshots(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per account in start order (the newest subscription of an account applied last), as
    the importer sends them; a fixed order, so a resumed send skips exactly what was sent."""
    return sorted(events, key=lambda e: (e["account_id"], e["data"]["started_at"],
                                         e["data"]["subscription_id"]))


def ordered_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stripe Events oldest first (the API lists newest first), each once by id."""
    unique = {e["id"]: e for e in events if isinstance(e.get("id"), str)}
    return sorted(unique.values(), key=lambda e: (e.get("created") or 0, e["id"]))


def backoff_s(attempt: int, base_s: float, cap_s: float, retry_after: float | None,
              jitter: float) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...) of a rate-limited request:
    exponential from ``base_s``, capped, jittered (``jitter`` in [0, 1)); never less than the
    server's Retry-After."""
    wait = min(cap_s, base_s * 2 ** (attempt - 1)) * (0.5 + jitter / 2)
    return max(wait, retry_after or 0.0)


# ---------------------------------------------------------------------------------------------
# Checkpoint and spool files


@dataclass
class SyncSummary:
    customers: int = 0
    linked_customers: int = 0
    subscriptions: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    snapshots: int = 0
    accounts: set[str] = field(default_factory=set)
    skipped: Counter[str] = field(default_factory=Counter)
    events: int = 0
    event_types: Counter[str] = field(default_factory=Counter)
    pages: int = 0
    rate_limited: int = 0
    resumed_from: str | None = None
    as_of: float = 0.0
    where: str = ""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a crash leaves the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoint:
    """``checkpoint.json`` and the spools beside it, in one directory."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir = directory
        self.path = directory / "checkpoint.json"
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {}

    def spool(self, name: str) -> Path:
        return self.dir / f"{name}.jsonl"

    def load(self, restart: bool, now: float) -> bool:
        """Resume a matching unfinished sync (True), or start afresh at ``now`` (False)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not restart and self.path.is_file():
            try:
                state = orjson.loads(self.path.read_bytes())
            except orjson.JSONDecodeError:
                state = {}
            if (isinstance(state, dict) and state.get("version") == CHECKPOINT_VERSION
                    and state.get("fingerprint") == self.fingerprint
                    and state.get("phase") in PHASES and state["phase"] != "done"):
                self.state = state
                for name in LISTINGS:  # cut what was written after the last checkpoint
                    path, length = self.spool(name), int(state["spooled"].get(name, 0))
                    if path.is_file() and path.stat().st_size > length:
                        with open(path, "r+b") as fh:
                            fh.truncate(length)
                return True
        for name in LISTINGS:
            self.spool(name).unlink(missing_ok=True)
        self.state = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
                      "as_of": now, "phase": LISTINGS[0], "cursor": None,
                      "spooled": {}, "sent": 0, "pages": 0, "rate_limited": 0}
        self.save()
        return False

    def save(self) -> None:
        write_atomic(self.path, orjson.dumps(self.state, option=orjson.OPT_SORT_KEYS))

    def append(self, name: str, objects: list[dict[str, Any]]) -> None:
        """Add one page to a spool (fsynced), then record the cursor and the spool's length."""
        path = self.spool(name)
        with open(path, "ab") as fh:
            for obj in objects:
                fh.write(orjson.dumps(obj) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        self.state["spooled"][name] = size

    def read(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.spool(name)
        if not path.is_file():
            return
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield orjson.loads(line)


def fingerprint(api_key: str, api_base: str) -> str:
    """Which Stripe account a checkpoint belongs to, without keeping the key."""
    return hashlib.sha256(f"{api_base}\n{api_key}".encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# Where snapshots and events go


class Destination(Protocol):
    def send_snapshots(self, events: list[dict[str, Any]]) -> None: ...
    def send_events(self, events: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class KafkaDestination:
    """Snapshots to the snapshots topic keyed by account (as the importer), Stripe Events to
    the billing topic keyed by their customer (else their object), each chunk acknowledged by
    every replica (acks=all) before the checkpoint moves."""

    def __init__(self, settings: Any) -> None:
        from churnsignal.app.kafka_client import ensure_topics

        self.settings = settings
        self.runner = asyncio.Runner()
        self.runner.run(ensure_topics(settings))
        self.producer: Any = None

    async def _send(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        from aiokafka import AIOKafkaProducer

        from churnsignal.app.kafka_client import connection_options

        if self.producer is None:
            self.producer = AIOKafkaProducer(acks="all", linger_ms=20,
                                             **connection_options(self.settings))
            await self.producer.start()
        futures = [await self.producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)

    def send_snapshots(self, events: list[dict[str, Any]]) -> None:
        self.runner.run(self._send(self.settings.topics.snapshots, [
            (e["account_id"].encode(), orjson.dumps(e)) for e in events]))

    def send_events(self, events: list[dict[str, Any]]) -> None:
        self.runner.run(self._send(self.settings.topics.billing, [
            (event_key(e), orjson.dumps(e)) for e in events]))

    def close(self) -> None:
        try:
            if self.producer is not None:
                self.runner.run(self.producer.stop())
        finally:
            self.runner.close()


def event_key(event: dict[str, Any]) -> bytes:
    obj = (event.get("data") or {}).get("object") or {}
    customer = obj.get("customer") if isinstance(obj, dict) else None
    customer = customer.get("id") if isinstance(customer, dict) else customer
    key = customer if isinstance(customer, str) and customer else (
        obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else event["id"])
    return str(key).encode()


class ClickHouseDestination:
    """The embedded defaults, with no worker running: the snapshots' rows as the importer
    writes them, and the Events' billing rows as the worker writes history (what the event
    itself carries; MRR before is its own previous MRR, else 0), keyed by event id, their
    account resolved through the links this sync read."""

    def __init__(self, dsn: str, links: dict[str, str], account_key: str = "account_id",
                 views: Any = None) -> None:
        from churnsignal.sinks.clickhouse import ClickHouseSink

        self.sink = ClickHouseSink(dsn, views=views)  # settings.views, as migrate makes them
        self.runner = asyncio.Runner()
        self.links = links
        self.account_key = account_key

    def _write(self, rows: list[tuple[object, ...]]) -> None:
        from churnsignal.stream.rows import BILLING_TABLE

        refused = self.runner.run(self.sink.write({BILLING_TABLE: rows}))
        if refused:
            raise ValueError(f"ClickHouse refused {len(refused)} rows")

    def send_snapshots(self, events: list[dict[str, Any]]) -> None:
        from churnsignal.stream.rows import snapshot_rows

        self._write([row for e in events for row in snapshot_rows(
            e["account_id"], EVENT_ADAPTER.validate_python(e), 1)])

    def send_events(self, events: list[dict[str, Any]]) -> None:
        from churnsignal.schemas.decode import DecodeOptions, decode
        from churnsignal.schemas.results import Accepted, Skipped
        from churnsignal.stream.rows import BILLING_TABLE, fact_row

        opts = DecodeOptions(max_age_s=10 * 365 * 86_400.0, account_key=self.account_key)
        rows: list[tuple[object, ...]] = []
        for raw in events:
            result = decode(orjson.dumps(raw), opts, time.time(), "stripe")
            event = result.event if isinstance(result, Accepted) else (
                result.event if isinstance(result, Skipped) else None)
            if event is None:
                continue
            account = event.account_id
            if identity.is_identity(account):
                customer = account.removeprefix(identity.stripe_customer(""))
                account = self.links.get(customer) or identity.fallback_account(account) or ""
            if not account or event.type == "subscription_snapshot":
                continue
            data = event.data
            before = getattr(data, "previous_mrr_cents", None) or 0
            involuntary = str(getattr(data, "cancellation_reason", "") or "").startswith("payment_")
            table, row = fact_row(account, event, before, involuntary, 0)
            if table == BILLING_TABLE:
                rows.append(row)
        if rows:
            self._write(rows)

    def close(self) -> None:
        try:
            self.sink.close()
        finally:
            self.runner.close()


# ---------------------------------------------------------------------------------------------
# The sync


@dataclass
class SyncOptions:
    page_size: int = 100
    rate_limit_retries: int = 8
    rate_limit_backoff_s: float = 1.0
    rate_limit_backoff_max_s: float = 30.0
    events_days: int = EVENTS_DAYS
    chunk: int = 500
    account_key: str = "account_id"


Progress = Callable[[str, int], None]


class StripeSync:
    """One sync, resumable: ``run`` lists what is missing, then sends what is not sent yet."""

    def __init__(self, client: Any, checkpoint: Checkpoint, options: SyncOptions,
                 progress: Progress = lambda phase, n: None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.cp = checkpoint
        self.opts = options
        self.progress = progress
        self.sleep = sleep
        self.summary = SyncSummary()

    # -- Stripe ---------------------------------------------------------------------------
    def _page(self, name: str, cursor: str | None) -> tuple[list[dict[str, Any]], bool]:
        """One page of a listing (raw objects as the API returned them) and has_more."""
        import stripe

        params: dict[str, Any] = {"limit": self.opts.page_size}
        if cursor:
            params["starting_after"] = cursor
        if name == "subscriptions":
            params["status"] = "all"
        elif name == "events":
            params["created"] = {"gte": int(self.cp.state["as_of"]) - self.opts.events_days * 86_400}
        service = getattr(self.client.v1, name)
        attempt = 0
        while True:
            try:
                page = service.list(params=params)
                break
            except stripe.RateLimitError as exc:
                attempt += 1
                self.cp.state["rate_limited"] += 1
                if attempt > self.opts.rate_limit_retries:
                    raise
                self.sleep(backoff_s(attempt, self.opts.rate_limit_backoff_s,
                                     self.opts.rate_limit_backoff_max_s,
                                     _retry_after(exc), random.random()))
        body = orjson.loads(page.last_response.body)
        objects = [o for o in body.get("data", []) if isinstance(o, dict)]
        return objects, bool(body.get("has_more")) and bool(objects)

    def _list(self, name: str) -> None:
        while self.cp.state["phase"] == name:
            objects, more = self._page(name, self.cp.state["cursor"])
            self.cp.append(name, objects)
            self.cp.state["pages"] += 1
            if more:
                self.cp.state["cursor"] = objects[-1]["id"]
            else:
                self.cp.state["cursor"] = None
                self.cp.state["phase"] = PHASES[PHASES.index(name) + 1]
            self.cp.save()
            self.progress(name, len(objects))

    # -- mapping of the spools ------------------------------------------------------------
    def links(self) -> dict[str, str]:
        links: dict[str, str] = {}
        seen: set[str] = set()
        for customer in self.cp.read("customers"):
            cid = str_id(customer.get("id"))
            if cid is None or cid in seen:
                continue
            seen.add(cid)
            account = customer_link(customer, self.opts.account_key)
            if account is not None:
                links[cid] = account
        self.summary.customers = len(seen)
        self.summary.linked_customers = len(links)
        return links

    def snapshots(self, links: dict[str, str]) -> list[dict[str, Any]]:
        as_of = float(self.cp.state["as_of"])
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for sub in self.cp.read("subscriptions"):
            sid = str_id(sub.get("id"))
            if sid is None or sid in seen:
                continue
            seen.add(sid)
            self.summary.statuses[str(sub.get("status"))] += 1
            account = account_of(sub, links, self.opts.account_key)
            result = snapshot_of(sub, account, as_of) if account else "no_customer"
            if isinstance(result, str):
                self.summary.skipped[result] += 1
                continue
            out.append(result)
            self.summary.accounts.add(result["account_id"])
        self.summary.subscriptions = len(seen)
        return ordered_snapshots(out)

    # -- sending --------------------------------------------------------------------------
    def _send(self, phase: str, items: list[dict[str, Any]],
              send: Callable[[list[dict[str, Any]]], None]) -> None:
        while self.cp.state["phase"] == phase:
            done = int(self.cp.state["sent"])
            chunk = items[done:done + self.opts.chunk]
            if chunk:
                send(chunk)
            if done + len(chunk) >= len(items):
                self.cp.state["sent"] = 0
                self.cp.state["phase"] = PHASES[PHASES.index(phase) + 1]
            else:
                self.cp.state["sent"] = done + len(chunk)
            self.cp.save()
            self.progress(phase, len(chunk))

    def run(self, destination: Callable[[dict[str, str]], Destination]) -> SyncSummary:
        for name in LISTINGS:
            self._list(name)
        links = self.links()
        snapshots = self.snapshots(links)
        events = ordered_events(self.cp.read("events"))
        self.summary.snapshots = len(snapshots)
        self.summary.events = len(events)
        self.summary.event_types.update(str(e.get("type")) for e in events)
        if self.cp.state["phase"] != "done":
            target = destination(links)
            try:
                self._send("send_snapshots", snapshots, target.send_snapshots)
                self._send("send_events", events, target.send_events)
            finally:
                target.close()
        self.summary.pages = int(self.cp.state["pages"])
        self.summary.rate_limited = int(self.cp.state["rate_limited"])
        self.summary.as_of = float(self.cp.state["as_of"])
        return self.summary


def _retry_after(exc: Any) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def make_client(api_key: str, api_base: str | None, max_network_retries: int,
                timeout_s: float = 80.0) -> Any:
    """The official client; ``api_base`` points it elsewhere (stripe-mock, a test server)."""
    import stripe

    base = {"api": api_base} if api_base else None
    http = stripe.RequestsClient(timeout=timeout_s) if _has_requests() else None
    return stripe.StripeClient(api_key, base_addresses=base,  # type: ignore[arg-type]
                               max_network_retries=max_network_retries, http_client=http)


def _has_requests() -> bool:
    import importlib.util

    return importlib.util.find_spec("requests") is not None
