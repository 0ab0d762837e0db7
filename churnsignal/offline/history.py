"""History files for the backtest and calibration: warehouse exports and native payloads.

Events are streamed in event-time order with bounded memory: the embedded ClickHouse engine
(chdb) reads CSV, TSV or Parquet exports and sorts them (spilling to disk when large), and
hands them over in Arrow blocks. JSONL files of native payloads (Stripe Events, Segment
messages, Zendesk tickets, canonical events) and Kafka topic ranges go through the worker's
own decoder (``history_native``, ``history_kafka``).
Subscriptions are small (a few rows per account) and are read whole.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from churnsignal.errors import ChurnsignalError
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.stream.policy import Policy
from churnsignal.stream.state import DayUsage

DAY = 86_400.0
SPILL_BYTES = 500_000_000
_FORMATS = {".csv": "CSVWithNames", ".tsv": "TSVWithNames", ".parquet": "Parquet"}


class HistoryError(ChurnsignalError):
    """A history file is missing, unreadable, or lacks a required column."""


def _literal(path: Path) -> str:
    return "'" + str(path.resolve()).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _format(path: Path) -> str:
    try:
        return _FORMATS[path.suffix.lower()]
    except KeyError:
        raise HistoryError(f"{path}: expected .csv, .tsv, .parquet or .jsonl") from None


class Engine:
    """One embedded ClickHouse session for reading and sorting history files."""

    def __init__(self) -> None:
        from chdb import session

        self._dir = tempfile.TemporaryDirectory(prefix="churnsignal-history-")
        self.session = session.Session(self._dir.name)
        # Group and sort in bounded memory: past this, the engine spills to its temp directory
        # (a year of tens of thousands of accounts is gigabytes of rows).
        self.session.query(f"SET max_bytes_before_external_group_by={SPILL_BYTES}, "
                           f"max_bytes_before_external_sort={SPILL_BYTES}")

    def columns(self, path: Path) -> list[str]:
        if not path.is_file():
            raise HistoryError(f"{path}: no such file")
        try:
            out = self.session.query(f"DESCRIBE file({_literal(path)}, '{_format(path)}')", "CSV")
        except Exception as exc:  # chdb raises RuntimeError with the engine's message
            raise HistoryError(f"{path}: cannot read: {str(exc)[:300]}") from None
        return [line.split(",")[0].strip('"') for line in str(out).splitlines() if line]

    def tables(self, sql: str) -> Iterator[Any]:
        """The result in Arrow tables, one per block the engine streams."""
        import pyarrow as pa

        for chunk in self.session.send_query(sql, "ArrowStream"):
            yield pa.ipc.open_stream(pa.py_buffer(chunk.bytes())).read_all()

    def stream(self, sql: str) -> Iterator[dict[str, Any]]:
        for table in self.tables(sql):
            yield from table.to_pylist()

    def rows(self, sql: str) -> list[dict[str, Any]]:
        return list(self.stream(sql))

    def close(self) -> None:
        self.session.close()
        self._dir.cleanup()


def _require(path: Path, columns: list[str], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise HistoryError(f"{path}: missing column(s) {', '.join(missing)} (has {columns})")


def _ms(expr: str) -> str:
    """Any date/time column (text, DateTime, epoch) as Unix milliseconds (NULL if unreadable)."""
    return f"toUnixTimestamp64Milli(parseDateTime64BestEffortOrNull(toString({expr}), 3, 'UTC'))"


def _ts(expr: str) -> str:
    """Any date/time column as Unix seconds."""
    return f"toFloat64({_ms(expr)}) / 1000"


def _warehouse_rows(engine: Engine, path: Path, until: float | None = None) -> str:
    """The rows of an events export as SQL (a, ms, e, u): what a row means, for both readers.
    Names and ids are cut at 200 characters, a blank type is "event", a blank user none."""
    columns = engine.columns(path)
    _require(path, columns, ("account_id", "event_time", "event_type"))
    user = "toString(user_id)" if "user_id" in columns else "''"
    limit = f" AND ms <= {int(until * 1000)}" if until is not None else ""
    # Only the file path comes from outside, quoted by _literal; the rest are our columns.
    return (f"SELECT substringUTF8(toString(account_id), 1, 200) AS a, "  # noqa: S608
            f"{_ms('event_time')} AS ms, "
            f"if(ifNull(toString(event_type), '') = '', 'event', "
            f"substringUTF8(toString(event_type), 1, 200)) AS e, "
            f"substringUTF8(ifNull({user}, ''), 1, 200) AS u "
            f"FROM file({_literal(path)}, '{_format(path)}') "
            f"WHERE a != '' AND ms IS NOT NULL{limit}")


def warehouse_events(engine: Engine, path: Path) -> Iterator[Any]:
    """Canonical usage events from an events export (account_id, event_time, event_type,
    user_id?; other columns are ignored), one per row, in event-time order. Event types are
    the product's own names. The backtest reads ``warehouse_days`` instead, which must fold
    to the same states (tested); this is the per-row reference."""
    rows = _warehouse_rows(engine, path)
    sql = f"SELECT a, ms / 1000 AS t, e, u FROM ({rows}) ORDER BY ms"  # noqa: S608
    for n, row in enumerate(engine.stream(sql)):
        yield EVENT_ADAPTER.validate_python({
            "event_id": f"w{n}", "account_id": row["a"], "type": "track",
            "user_id": row["u"] or None,
            "occurred_at": datetime.fromtimestamp(row["t"], tz=UTC),
            "data": {"name": row["e"], "feature": row["e"]}})


def warehouse_days(engine: Engine, path: Path, policy: Policy,
                   until: float | None = None) -> Iterator[DayUsage]:
    """The same rows as ``warehouse_events``, counted per account and day by the engine (a
    ``DayUsage`` each, ordered by its first event): folding a day's counts costs what one
    event did, so a year of tens of thousands of accounts replays in minutes."""
    rows = _warehouse_rows(engine, path, until)
    by_first = "arraySort((x, y) -> y, groupArray({}), groupArray(f))"
    sql = (
        f"SELECT a, min(f) AS t0, max(l) AS t1, toInt64(sum(c)) AS n, "  # noqa: S608
        f"{by_first.format('e')} AS names, {by_first.format('c')} AS counts, "
        f"{by_first.format('f')} AS firsts, {by_first.format('l')} AS lasts, "
        f"groupUniqArrayArray({int(policy.limits.day_users)})(us) AS users FROM ("
        f"  SELECT a, intDiv(ms, 86400000) AS d, e, toInt64(count()) AS c, "
        f"  min(ms) / 1000 AS f, max(ms) / 1000 AS l, groupUniqArrayIf(u, u != '') AS us "
        f"  FROM ({rows}) GROUP BY a, d, e) "
        f"GROUP BY a, d ORDER BY t0, a")
    for table in engine.tables(sql):
        a, t0, t1, n = (table.column(c).to_pylist() for c in ("a", "t0", "t1", "n"))
        # Lists flattened: one conversion per column, not one per row.
        (names, at), (users, user_at) = _flat(table, "names"), _flat(table, "users")
        counts, firsts, lasts = (_flat(table, c)[0] for c in ("counts", "firsts", "lasts"))
        for i in range(len(a)):
            k, end, u, u_end = at[i], at[i + 1], user_at[i], user_at[i + 1]
            yield DayUsage(a[i], datetime.fromtimestamp(t0[i], tz=UTC), t1[i], n[i],
                           list(zip(names[k:end], counts[k:end], firsts[k:end], lasts[k:end],
                                    strict=True)), users[u:u_end])


def _flat(table: Any, column: str) -> tuple[list[Any], list[int]]:
    """A list column as its values and offsets (row i is values[offsets[i]:offsets[i+1]])."""
    lists = table.column(column).combine_chunks()
    return lists.values.to_pylist(), lists.offsets.to_pylist()  # offsets index .values


def top_event_types(engine: Engine, path: Path, until: float, limit: int) -> list[str]:
    """The most frequent event types before ``until``: calibration's candidates (named as
    the replay names them)."""
    sql = (f"SELECT e, count() AS n FROM ({_warehouse_rows(engine, path, until)}) "  # noqa: S608
           f"GROUP BY e ORDER BY n DESC, e LIMIT {int(limit)}")
    return [row["e"] for row in engine.rows(sql)]


def last_event_time(engine: Engine, path: Path) -> float | None:
    """The newest row the replay reads (None for an export without any)."""
    rows = engine.rows(f"SELECT max(ms) / 1000 AS t FROM ({_warehouse_rows(engine, path)})")  # noqa: S608
    return rows[0]["t"] if rows else None


@dataclass
class Subscriptions:
    """Per account: paid periods (start, end or None) and MRR, and the churn dates they imply."""

    periods: dict[str, list[tuple[float, float | None, int, str | None]]] = field(
        default_factory=lambda: defaultdict(list))

    def churn_dates(self, gap_days: float) -> dict[str, list[float]]:
        """An account churns when a period ends and no other starts within ``gap_days``."""
        out: dict[str, list[float]] = {}
        for account, periods in self.periods.items():
            merged: list[list[float | None]] = []
            for start, end, _, _ in sorted(periods, key=lambda p: p[0]):
                last = merged[-1] if merged else None
                if last is not None and (last[1] is None or start <= last[1] + gap_days * DAY):
                    last[1] = None if last[1] is None or end is None else max(last[1], end)
                else:
                    merged.append([start, end])
            dates = [end for _, end in merged if end is not None]
            if dates:
                out[account] = dates
        return out

    def active(self, account: str, t: float) -> bool:
        return any(start <= t and (end is None or t < end)
                   for start, end, _, _ in self.periods.get(account, ()))


def read_subscriptions(engine: Engine, path: Path) -> Subscriptions:
    columns = engine.columns(path)
    _require(path, columns, ("account_id", "start_date"))
    end = _ts("end_date") if "end_date" in columns else "NULL"
    mrr = "toFloat64OrZero(toString(mrr))" if "mrr" in columns else "0"
    plan = "toString(plan)" if "plan" in columns else "''"
    sql = (f"SELECT toString(account_id) AS a, {_ts('start_date')} AS s, {end} AS e, "  # noqa: S608
           f"{mrr} AS m, ifNull({plan}, '') AS p "
           f"FROM file({_literal(path)}, '{_format(path)}') WHERE a != '' AND s IS NOT NULL")
    subs = Subscriptions()
    for row in engine.rows(sql):
        # MRR in the export's currency units; state keeps minor units.
        subs.periods[row["a"][:200]].append(
            (row["s"], row["e"], round(float(row["m"] or 0) * 100), row["p"] or None))
    return subs


def subscription_events(subs: Subscriptions) -> list[Any]:
    """Canonical billing events for the subscription periods (start: active, end: canceled)."""
    events = []
    for account, periods in subs.periods.items():
        for i, (start, end, mrr, plan) in enumerate(sorted(periods, key=lambda p: p[0])):
            events.append(_subscription(f"s{account}-{i}", account, "subscription_created",
                                        start, "active", mrr, plan))
            if end is not None:
                events.append(_subscription(f"s{account}-{i}-end", account,
                                            "subscription_deleted", end, "canceled", mrr, plan))
    events.sort(key=lambda e: e.occurred_at)
    return events


def _subscription(event_id: str, account: str, kind: str, ts: float, status: str, mrr: int,
                  plan: str | None) -> Any:
    return EVENT_ADAPTER.validate_python({
        "event_id": event_id[:200], "account_id": account, "type": kind,
        "occurred_at": datetime.fromtimestamp(ts, tz=UTC),
        "data": {"status": status, "mrr_cents": mrr, "plan": plan}})


def load_jsonl_subscriptions(events: list[Any]) -> Subscriptions:
    """Subscription periods implied by native billing events (when no subscriptions file)."""
    subs = Subscriptions()
    started: dict[str, tuple[float, int]] = {}
    for e in events:
        if not e.type.startswith("subscription_"):
            continue
        ts = e.occurred_at.timestamp()
        status = e.data.status or ("canceled" if e.type == "subscription_deleted" else None)
        if status in ("active", "past_due", "unpaid", "paused", "trialing") and \
                e.account_id not in started:
            started[e.account_id] = (ts, e.data.mrr_cents or 0)
        elif status == "canceled" and e.account_id in started:
            start, mrr = started.pop(e.account_id)
            subs.periods[e.account_id].append((start, ts, mrr, e.data.plan))
    for account, (start, mrr) in started.items():
        subs.periods[account].append((start, None, mrr, None))
    return subs


def iso_day(value: str) -> float:
    """A --since / --until date (YYYY-MM-DD) as Unix seconds at 00:00 UTC."""
    try:
        return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise HistoryError(f"expected a date like 2025-06-01, got {value!r}") from None


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
