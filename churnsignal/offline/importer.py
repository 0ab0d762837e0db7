"""`churnsignal import subscriptions FILE`: a subscription backfill, as snapshot events on Kafka.

The embedded ClickHouse engine (chdb) belongs to one process, so the import does not write
ClickHouse itself: it produces one canonical ``subscription_snapshot`` per subscription to the
snapshots topic (``CHURNSIGNAL_TOPICS__SNAPSHOTS``), keyed by account, and the worker folds
them into the accounts' states and writes their billing rows, whether it runs now or starts
later. Ids are derived from the content and the snapshot's time, so importing the same file
again is a duplicate everywhere (state dedup, ReplacingMergeTree keys).

Reading reuses the backtest's subscription format (``history.read_subscriptions``):
``account_id``, ``start_date``, ``end_date`` (empty while active), ``mrr`` (currency units),
optional ``plan``; and, read here only, optional ``currency``, ``subscription_id`` and
``customer_id`` (or ``Customer ID``: the Stripe customer, which the snapshot then links to the
account, so the customer's live events that name no account find it at once).

A CSV from the Stripe Dashboard's subscription export is recognised by its header (``id``,
``Customer ID``, ``Status`` and a ``Start``/``Created (UTC)`` column; see STRIPE_EXPORT) and
mapped row by row to the Stripe subscription it describes, then through the same mapping
``churnsignal sync stripe`` uses (``stripe_sync.snapshot_of``): same statuses, trials, MRR
normalised per month from the interval, and the account from ``account_id (metadata)``, else
the customer id (as the stream falls back to it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import orjson

from churnsignal.offline.history import (
    Engine,
    _format,
    _literal,
    _require,
    _ts,
    read_subscriptions,
)
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.sinks.ddl import minor_units

MAX_ID = 200
# The optional column naming a row's Stripe customer (first found), in the plain format.
CUSTOMER_COLUMNS = ("customer_id", "Customer ID")


@dataclass
class ImportSummary:
    rows: int = 0  # rows in the file
    subscriptions: int = 0  # snapshots produced
    accounts: set[str] = field(default_factory=set)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    as_of: float = 0.0
    topic: str = ""


def _snapshot_id(account: str, subscription: str, payload: dict[str, Any], as_of: float) -> str:
    """Same subscription, same content, same snapshot time: the same id (a re-import is a
    duplicate); anything changed: a new snapshot that the state takes if it is the newest."""
    digest = hashlib.sha256(orjson.dumps([account, subscription, payload, as_of],
                                         option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    return f"snapshot-{digest}"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def snapshots(path: Path, as_of: float, summary: ImportSummary,
              engine: Engine | None = None) -> list[dict[str, Any]]:
    """The canonical snapshot events of a subscriptions file, in start order per account
    (the newest subscription of an account is applied last); skipped rows counted by reason."""
    header = stripe_export_header(path)
    if header is not None:
        return _stripe_export_snapshots(path, as_of, summary)
    own = engine is None
    engine = engine or Engine()
    try:
        columns = engine.columns(path)
        _require(path, columns, ("account_id", "start_date"))
        source = f"file({_literal(path)}, '{_format(path)}')"
        [counts] = engine.rows(
            f"SELECT count() AS n, countIf(ifNull(toString(account_id), '') = '') AS no_account, "  # noqa: S608
            f"countIf(ifNull(toString(account_id), '') != '' AND {_ts('start_date')} IS NULL) AS no_start "
            f"FROM {source}")
        summary.rows = int(counts["n"])
        summary.skipped.update({k: int(counts[k]) for k in ("no_account", "no_start")
                                if counts[k]})
        extra: dict[tuple[str, float], dict[str, str]] = {}
        optional: dict[str, str] = {c: c for c in ("currency", "subscription_id")
                                    if c in columns}
        customer = next((c for c in CUSTOMER_COLUMNS if c in columns), None)
        if customer is not None:
            optional["customer_id"] = customer
        if "currency" in optional and "mrr" in columns:
            optional["mrr_raw"] = "mrr"  # as written: minor units depend on the currency
        if optional:
            picks = ", ".join(f"ifNull(toString(`{c}`), '') AS {alias}"
                              for alias, c in optional.items())
            for row in engine.rows(
                    f"SELECT toString(account_id) AS a, {_ts('start_date')} AS s, {picks} "  # noqa: S608
                    f"FROM {source} WHERE a != '' AND s IS NOT NULL"):
                extra[(row["a"][:MAX_ID], row["s"])] = row
        subs = read_subscriptions(engine, path)
    finally:
        if own:
            engine.close()
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    for account, periods in subs.periods.items():
        for start, end, hundredths, plan in sorted(periods, key=lambda p: p[0]):
            more = extra.get((account, start), {})
            mrr = _minor(hundredths, more)
            reason = _skip_reason(start, end, mrr, as_of, more.get("currency", ""))
            if reason:
                summary.skipped[reason] += 1
                continue
            subscription = (more.get("subscription_id") or f"{account}@{_iso(start)}")[:MAX_ID]
            if subscription in seen:
                summary.skipped["duplicate_subscription"] += 1
                continue
            seen.add(subscription)
            data: dict[str, Any] = {
                "subscription_id": subscription, "mrr_cents": mrr, "plan": plan,
                "status": "canceled" if end is not None and end <= as_of else "active",
                "started_at": _iso(start), "ended_at": _iso(end) if end is not None else None,
                "cancel_at_period_end": end is not None and end > as_of,
                "current_period_end": _iso(end) if end is not None and end > as_of else None,
                "currency": (more.get("currency") or "").lower() or None,
                "stripe_customer_id": _customer(more.get("customer_id", ""), account),
            }
            data = {k: v for k, v in data.items() if v is not None}
            event = {"event_id": _snapshot_id(account, subscription, data, as_of),
                     "account_id": account, "type": "subscription_snapshot",
                     "occurred_at": _iso(as_of), "data": data}
            try:
                EVENT_ADAPTER.validate_python(event)  # what the worker will accept, checked now
            except ValueError:
                summary.skipped["invalid"] += 1
                continue
            events.append(event)
            summary.accounts.add(account)
    summary.subscriptions = len(events)
    summary.as_of = as_of
    return events


def _minor(hundredths: int, more: dict[str, str]) -> int:
    """A row's MRR (read as hundredths of its currency units) in the minor units of its
    currency, as Stripe counts them (``sinks.ddl.minor_units``): a yen has no minor unit, a
    Kuwaiti dinar a thousand; every other currency a hundred (unchanged)."""
    units = minor_units((more.get("currency") or "").lower())
    if units == 100:
        return hundredths
    try:
        exact = Decimal(more.get("mrr_raw", "").strip()) * units
        return int(exact.to_integral_value(ROUND_HALF_UP))
    except (ArithmeticError, ValueError):
        return round(hundredths * units / 100)


def _customer(value: str, account: str) -> str | None:
    """The Stripe customer a row names, kept when it is not the account itself: the
    snapshot then links it to the account (``schemas.stripe.snapshot_links``)."""
    value = value.strip()[:MAX_ID]
    return value if value and value != account else None


def _skip_reason(start: float, end: float | None, mrr: int, as_of: float,
                 currency: str) -> str | None:
    if start > as_of:
        return "starts_after_snapshot"
    if end is not None and end < start:
        return "ends_before_start"
    if mrr < 0:
        return "negative_mrr"
    if currency and len(currency) != 3:
        return "bad_currency"
    return None


async def produce(settings: Any, events: list[dict[str, Any]],
                  progress: Callable[[int], None] = lambda n: None) -> None:
    """Send the snapshots to the snapshots topic (created if missing), keyed by account, and
    wait until Kafka acknowledged every one."""
    from aiokafka import AIOKafkaProducer

    from churnsignal.app.kafka_client import connection_options, ensure_topics

    await ensure_topics(settings)
    producer = AIOKafkaProducer(acks="all", linger_ms=20, **connection_options(settings))
    await producer.start()
    try:
        topic = settings.topics.snapshots
        for chunk in _chunks(events, 500):
            futures = [await producer.send(topic, orjson.dumps(e), key=e["account_id"].encode())
                       for e in chunk]
            await asyncio.gather(*futures)
            progress(len(chunk))
    finally:
        await producer.stop()


def _chunks(items: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


async def write_direct(dsn: str, events: list[dict[str, Any]],
                       progress: Callable[[int], None] = lambda n: None,
                       views: Any = None) -> None:
    """The snapshots' billing rows straight into ClickHouse: for the embedded defaults when
    no worker runs (its engine's directory is free then, and its broker keeps nothing
    across runs). Same rows and keys as the worker writes, so a later import through the
    worker rewrites them instead of adding to them."""
    from churnsignal.sinks.clickhouse import ClickHouseSink
    from churnsignal.stream.rows import BILLING_TABLE, snapshot_rows

    sink = ClickHouseSink(dsn, views=views)  # views: settings.views, as migrate makes them
    try:
        for chunk in _chunks(events, 5000):
            rows = [row for e in chunk for row in snapshot_rows(
                e["account_id"], EVENT_ADAPTER.validate_python(e), 1)]
            refused = await sink.write({BILLING_TABLE: rows})
            if refused:
                raise ValueError(f"ClickHouse refused {len(refused)} snapshot rows")
            progress(len(chunk))
    finally:
        sink.close()


# The Stripe Dashboard's subscriptions export (Billing > Subscriptions > Export). Stripe does not
# document its columns; these are the names its CSV files carry as seen in exports in use
# (dates are UTC, "YYYY-MM-DD HH:MM"). Spellings that differ between export versions are listed
# in order of preference. Amounts are read in currency units, as the Dashboard shows them
# ("49.00"); a value in minor units cannot be told apart from it, so an export whose amounts are
# cents must be converted first (or use the plain format, whose ``mrr`` is in currency units).
STRIPE_EXPORT: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "customer": ("Customer ID",),
    "status": ("Status",),
    "created": ("Created (UTC)",),
    "start_date": ("Start Date (UTC)", "Start (UTC)"),
    "trial_start": ("Trial Start (UTC)",),
    "trial_end": ("Trial End (UTC)",),
    "canceled_at": ("Canceled At (UTC)",),
    "ended_at": ("Ended At (UTC)",),
    "current_period_end": ("Current Period End (UTC)",),
    "cancel_at_period_end": ("Cancel At Period End",),
    "cancellation_reason": ("Cancellation Reason",),
    "plan": ("Plan", "Product", "Plan price ID", "Price ID"),
    "quantity": ("Quantity",),
    "amount": ("Amount", "Plan Amount", "Price"),
    "interval": ("Interval", "Plan Interval"),
    "interval_count": ("Interval Count", "Plan Interval Count"),
    "currency": ("Currency", "Plan Currency"),
}
_INTERVALS = {"day": "day", "daily": "day", "week": "week", "weekly": "week", "month": "month",
              "monthly": "month", "year": "year", "yearly": "year", "annual": "year",
              "annually": "year"}


def stripe_export_header(path: Path) -> list[str] | None:
    """The header of a Stripe Dashboard subscriptions export, or None for any other file."""
    import csv

    if path.suffix.lower() != ".csv" or not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    names = set(header)
    if {"id", "Customer ID", "Status"} <= names and names & {
            "Start Date (UTC)", "Start (UTC)", "Created (UTC)"} and "account_id" not in names:
        return header
    return None


def _pick(row: dict[str, str], field_name: str) -> str:
    for column in STRIPE_EXPORT[field_name]:
        value = (row.get(column) or "").strip()
        if value:
            return value
    return ""


def _export_time(value: str) -> int | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("/", "-"))
    except ValueError:
        return None
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp())


def stripe_export_subscription(row: dict[str, str], account_key: str = "account_id"
                               ) -> dict[str, Any]:
    """The Stripe subscription object (the fields the snapshot mapping reads) one export row
    describes. Pure."""
    amount = _pick(row, "amount").replace(",", "")
    units = minor_units(_pick(row, "currency").lower())  # a yen has no cents (Stripe's count)
    try:
        unit_amount: int | None = int((Decimal(amount) * units).to_integral_value(
            ROUND_HALF_UP)) if amount else None
    except (ArithmeticError, ValueError):  # not a number, NaN, infinity
        unit_amount = None
    interval = _INTERVALS.get(_pick(row, "interval").lower())
    count = _pick(row, "interval_count")
    quantity = _pick(row, "quantity")
    price: dict[str, Any] = {"id": _pick(row, "plan") or None, "unit_amount": unit_amount,
                             "recurring": {"interval": interval,
                                           "interval_count": int(count) if count.isdigit()
                                           else 1}}
    metadata = (row.get(f"{account_key} (metadata)") or "").strip()
    return {
        "id": _pick(row, "id") or None, "object": "subscription",
        "customer": _pick(row, "customer") or None,
        "status": _pick(row, "status").lower().replace(" ", "_") or None,
        "created": _export_time(_pick(row, "created")),
        "start_date": _export_time(_pick(row, "start_date")) or _export_time(
            _pick(row, "created")),
        "trial_start": _export_time(_pick(row, "trial_start")),
        "trial_end": _export_time(_pick(row, "trial_end")),
        "canceled_at": _export_time(_pick(row, "canceled_at")),
        "ended_at": _export_time(_pick(row, "ended_at")),
        "cancel_at_period_end": _pick(row, "cancel_at_period_end").lower() == "true",
        "current_period_end": _export_time(_pick(row, "current_period_end")),
        "currency": _pick(row, "currency").lower() or None,
        "cancellation_details": {"reason": _pick(row, "cancellation_reason") or None},
        "metadata": {account_key: metadata} if metadata else {},
        "items": {"data": [{"quantity": int(quantity) if quantity.isdigit() else 1,
                            "price": price}]} if unit_amount is not None and interval else
        {"data": []},
    }


def _stripe_export_snapshots(path: Path, as_of: float, summary: ImportSummary
                             ) -> list[dict[str, Any]]:
    import csv

    from churnsignal.offline.stripe_sync import account_of, ordered_snapshots, snapshot_of

    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            summary.rows += 1
            sub = stripe_export_subscription(row)
            if not sub["items"]["data"]:
                summary.skipped["no_amount_or_interval"] += 1  # MRR unknown: not guessed
                continue
            account = account_of(sub, {})
            result = snapshot_of(sub, account, as_of) if account else "no_account"
            if isinstance(result, str):
                summary.skipped[result] += 1
                continue
            if result["data"]["subscription_id"] in seen:
                summary.skipped["duplicate_subscription"] += 1
                continue
            seen.add(result["data"]["subscription_id"])
            events.append(result)
            summary.accounts.add(result["account_id"])
    events = ordered_snapshots(events)
    summary.subscriptions = len(events)
    summary.as_of = as_of
    return events
