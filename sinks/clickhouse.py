"""The ClickHouse writer: one columnar insert per table per flush, idempotent, bounded.

The same code serves the embedded engine (``chdb://path``) and a server (``http(s)://``).
Blocking client calls run on one dedicated thread so the event loop never waits on them.

Failures come in two kinds (``classify``). Transient ones (ClickHouse down or slow, too many
parts, memory pressure, anything unknown) are retried with capped exponential back-off and
jitter, but one ``write`` waits at most ``write_timeout_s`` before it raises
``SinkUnavailable``: the caller keeps its rows, releases its locks and tries again later.
Permanent ones (a value the table refuses) are isolated by bisecting the batch; the rest is
written and the refused rows are returned for the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import struct
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import clickhouse_connect
from clickhouse_connect.driver.exceptions import DataError, OperationalError, ProgrammingError
from clickhouse_connect.driver.exceptions import Error as ClickHouseDriverError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from churnsignal.app.settings import mask_dsn
from churnsignal.errors import SinkUnavailable
from churnsignal.sinks import ddl
from churnsignal.stream.rows import (
    ACTION_COLUMNS,
    ALERT_COLUMNS,
    BILLING_COLUMNS,
    DAILY_COLUMNS,
    SCORE_COLUMNS,
    SUPPORT_COLUMNS,
)

log = logging.getLogger(__name__)

COLUMNS = {
    "account_daily_data": DAILY_COLUMNS,
    "account_scores_data": SCORE_COLUMNS,
    "alerts_data": ALERT_COLUMNS,
    "billing_events_data": BILLING_COLUMNS,
    "support_events_data": SUPPORT_COLUMNS,
    "deletions_data": ddl.DELETIONS_COLUMNS,
    "alert_actions_data": ACTION_COLUMNS,
    "currency_rates_data": ddl.RATES_COLUMNS,
}

Row = Sequence[Any]
Rows = Mapping[str, Sequence[Row]]
Kind = Literal["transient", "permanent"]

# ClickHouse errors that mean "this data does not fit this table": retrying the same rows
# can never succeed, so the batch is split to find them. Codes as the engine itself lists
# them (SELECT name, code FROM system.errors). Anything not here is retried (transient):
# a wrong guess there stalls writes visibly (not ready, metrics), never loses rows.
PERMANENT_ERRORS = {
    "CANNOT_PARSE_TEXT": 6,
    "CANNOT_PARSE_ESCAPE_SEQUENCE": 25,
    "CANNOT_PARSE_QUOTED_STRING": 26,
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED": 27,
    "ATTEMPT_TO_READ_AFTER_EOF": 32,  # a row with fewer values than columns
    "CANNOT_PARSE_DATE": 38,
    "CANNOT_PARSE_DATETIME": 41,
    "TYPE_MISMATCH": 53,
    "CANNOT_CONVERT_TYPE": 70,
    "CANNOT_PARSE_NUMBER": 72,
    "INCORRECT_DATA": 117,
    "TOO_LARGE_ARRAY_SIZE": 128,
    "CANNOT_READ_ARRAY_FROM_TEXT": 130,
    "TOO_LARGE_STRING_SIZE": 131,
    "SIZES_OF_ARRAYS_DONT_MATCH": 190,
    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE": 321,
    "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN": 349,
    "CANNOT_PARSE_UUID": 376,
    "DECIMAL_OVERFLOW": 407,
    "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING": 441,
    "CANNOT_PARSE_BOOL": 467,
    "VIOLATED_CONSTRAINT": 469,
    "TOO_MANY_PARTITIONS": 565,  # a batch spanning too many months: its halves fit
    "CANNOT_PARSE_IPV4": 675,
    "CANNOT_PARSE_IPV6": 676,
    "UNKNOWN_ELEMENT_OF_ENUM": 691,
}
_PERMANENT_CODES = frozenset(PERMANENT_ERRORS.values())
_TOO_MANY_PARTS = 252
# Code 252 is also "Too many partitions for single INSERT block" (more months in one batch
# than max_partitions_per_insert_block): the same batch fails forever, its halves do not.
_PARTITIONS_PER_BLOCK = "partitions for single insert block"
_RECONNECT_CODES = frozenset({60, 81})  # UNKNOWN_TABLE, UNKNOWN_DATABASE: migrate again

# What Python raises when clickhouse-connect cannot serialize a value into its column type
# (struct.error for a number out of range, AttributeError for a str where a datetime goes...).
_CONVERSION_ERRORS = (struct.error, OverflowError, TypeError, ValueError, AttributeError,
                      IndexError, UnicodeError)
_CODE_RE = re.compile(r"\bCode:\s*(\d+)")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")

_FIRST_RETRY_S = 0.2
# An attempt started with less time than this left could only time out, and would report
# that timeout instead of what is really wrong: give up before it (never later than the bound).
_MIN_ATTEMPT_S = 0.25
_THREAD = "clickhouse"
_MESSAGE_MAX = 1000
_MEMO_MAX = 10_000


@dataclass(frozen=True, slots=True)
class RefusedRow:
    """A row its table refused for good, with the server's (or client's) message."""

    table: str
    row: tuple[Any, ...]
    error: str


class RowsRefused(Exception):  # noqa: N818 - a result of the data, not a fault
    """An insert failed because of the data it carried (a permanent error)."""


def error_code(exc: BaseException) -> tuple[int | None, str | None]:
    """The ClickHouse error code and name an exception carries, if any.

    clickhouse-connect sets ``code``/``name`` (HTTP header or chdb message); chdb's own
    ``ChdbError`` only has the engine's text, ``Code: 252. DB::Exception: ... (TOO_MANY_PARTS)``.
    """
    if isinstance(exc, ClickHouseDriverError) and (exc.code is not None or exc.name):
        return exc.code, exc.name
    text = str(exc)
    if "DB::Exception" not in text:  # builtins have a .name too (AttributeError)
        return None, None
    code = _CODE_RE.search(text)
    names = _NAME_RE.findall(text)
    return (int(code.group(1)) if code else None), (names[-1] if names else None)


def _serializing_frame(exc: BaseException) -> Any:
    """The clickhouse-connect frame that was serializing a column when ``exc`` was raised."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        name = frame.f_code.co_filename.replace("\\", "/")
        if "clickhouse_connect/" in name and (
                frame.f_code.co_name == "chunk_gen" or "/datatypes/" in name
                or "driverc/" in name):
            return frame
    return None


def classify(exc: BaseException) -> Kind:
    """Whether retrying the same insert may succeed ("transient") or never will ("permanent").

    Pure: looks only at the exception (its type, ClickHouse code and, for Python errors,
    whether clickhouse-connect raised it while serializing a value).
    """
    if isinstance(exc, SinkUnavailable | OSError | OperationalError):
        return "transient"  # refused, reset, timed out, 429/503/504 after the driver's retries
    code, name = error_code(exc)
    if code is not None or name is not None:
        if code == _TOO_MANY_PARTS and _PARTITIONS_PER_BLOCK in str(exc).lower():
            return "permanent"
        if code in _PERMANENT_CODES or name in PERMANENT_ERRORS:
            return "permanent"
        return "transient"  # TOO_MANY_PARTS, MEMORY_LIMIT_EXCEEDED, TIMEOUT_EXCEEDED, 5xx, ...
    if isinstance(exc, DataError):
        return "permanent"  # clickhouse-connect refused a value before sending anything
    if isinstance(exc, _CONVERSION_ERRORS) and _serializing_frame(exc) is not None:
        return "permanent"
    # Unknown: a bug of ours (e.g. a TypeError outside serialization) must not send every
    # row to the DLQ; retrying keeps them until someone looks.
    return "transient"


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and classify(exc) == "transient"


def _column_of(exc: BaseException) -> str | None:
    """The column clickhouse-connect was converting when it raised ``exc``, if it says."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if "clickhouse_connect" not in frame.f_code.co_filename:
            continue
        local = frame.f_locals
        if isinstance(local.get("col_name"), str):  # serializing a block
            return str(local["col_name"])
        names = getattr(local.get("self"), "column_names", None)
        if isinstance(names, Sequence) and local.get("i") in range(len(names)):  # sizing a block
            return str(names[local["i"]])
    return None


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__name__ if kind.__module__ in ("builtins", "clickhouse_connect.driver.exceptions") \
        else f"{kind.__module__}.{kind.__name__}"


def describe(exc: BaseException) -> str:
    """The message a refused row carries: the server's text, or the client's with its column."""
    text = f"{_type_name(exc)}: {exc}".strip()
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({_type_name(cause)}: {cause})"
    column = _column_of(exc)
    if column and f"`{column}`" not in text:
        text += f" [column `{column}`]"
    return text[:_MESSAGE_MAX]


async def bisect(table: str, rows: Sequence[Row],
                 insert: Callable[[Sequence[Row]], Awaitable[None]]) -> list[RefusedRow]:
    """Insert ``rows``; when the table refuses the batch (``RowsRefused``), insert its halves,
    down to single rows. Returns the rows refused on their own, in order; any other error
    propagates. With b bad rows among n it takes about 2·b·log2(n/b) inserts."""
    try:
        await insert(rows)
    except RowsRefused as exc:
        if len(rows) == 1:
            return [RefusedRow(table, tuple(rows[0]), str(exc))]
        mid = len(rows) // 2
        return [*await bisect(table, rows[:mid], insert),
                *await bisect(table, rows[mid:], insert)]
    return []


class _QuietSerializerErrors(logging.Filter):
    """clickhouse-connect logs a traceback for each value it cannot serialize; bisection
    provokes those on purpose, and the sink reports every refused row itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ((record.threadName or "").startswith(_THREAD)
                    and str(record.msg).startswith("Error serializing"))


for _name in ("clickhouse_connect.driver.transform", "clickhouse_connect.driver.rustcodec"):
    logging.getLogger(_name).addFilter(_QuietSerializerErrors())


def connect(dsn: str) -> Any:
    """A clickhouse-connect client for a chdb:// or http(s):// DSN; errors hide the password."""
    try:
        return clickhouse_connect.get_client(dsn=dsn)
    except Exception as exc:  # the driver raises many types; all mean "cannot connect"
        raise SinkUnavailable(f"ClickHouse {mask_dsn(dsn)} unreachable: {exc}") from None


def migrate(client: Any, ttl_days: int = 400, views: Any = None) -> list[str]:
    """Create every table and view that is missing; safe to run any number of times.

    ``views`` (``settings.views``: ``past_due_churn_days``, ``reporting_currency``) defines
    the business views; None, for callers without settings, reads CHURNSIGNAL_VIEWS__* from
    the environment as the settings would."""
    done = []
    options = () if views is None else (views.past_due_churn_days, views.reporting_currency)
    for statement in ddl.statements(ttl_days, *options):
        client.command(statement)
        done.append(statement.split("(")[0].split(" AS")[0].strip())
    return done


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # closing a broken client must not mask what broke it
        log.debug("clickhouse close failed", exc_info=True)


class ClickHouseSink:
    """Writes row batches: bounded waits on outages, refused rows isolated and returned."""

    def __init__(self, dsn: str, *, retry_max_s: float = 30.0, write_timeout_s: float = 10.0,
                 metrics: Any = None, ttl_days: int = 400, views: Any = None) -> None:
        self.dsn = dsn
        self.views = views  # settings.views, for migrate (None: from the environment)
        self.retry_max_s = retry_max_s
        self.write_timeout_s = write_timeout_s
        self.metrics = metrics
        self.ttl_days = ttl_days
        self._client: Any = None
        # Per table, the insert context of the current client: clickhouse-connect otherwise
        # asks the server for the table's column types (DESCRIBE) before every insert, a
        # second query per table and flush (a third of the writes' cost at small batches).
        self._contexts: dict[str, Any] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD)
        self.writable = False
        # Back-off state spans write calls, so an outage is not hammered at every flush.
        self._failures = 0
        self._retry_at = 0.0
        # Rows found refused by a write that then gave up: the retry skips them at once.
        self._refused_memo: dict[tuple[str, str], str] = {}

    # -- on the client thread ----------------------------------------------------------

    def _ensure(self) -> Any:
        if self._client is None:
            client = connect(self.dsn)
            try:
                migrate(client, self.ttl_days, self.views)
            except BaseException:
                _close_quietly(client)
                raise
            self._client = client  # only once its tables exist
            self._contexts = {}
        return self._client

    def _insert_now(self, table: str, rows: Sequence[Row]) -> None:
        client = self._ensure()
        try:
            context = self._contexts.get(table)
            if context is None:
                context = client.create_insert_context(table, COLUMNS[table])
                self._contexts[table] = context
            client.insert(data=rows, context=context)
        except Exception as exc:
            # A failed insert may leave its context half way through a batch: a fresh one.
            self._contexts.pop(table, None)
            closed = isinstance(exc, ProgrammingError) and "has been closed" in str(exc)
            if closed or error_code(exc)[0] in _RECONNECT_CODES:
                self._client = None  # reconnect and re-create the tables at the next attempt
                _close_quietly(client)
            raise

    def _call(self, fn: Any, *args: Any) -> Any:
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- on the event loop -------------------------------------------------------------

    async def start(self) -> None:
        await self._call(self._ensure)
        # clickhouse-connect imports pandas (if installed) at the first insert, to see whether
        # the data is a DataFrame: about a second under the GIL in the middle of the first
        # flush, delaying its alerts. Paid here, before any event is read.
        await self._call(_preload_insert_modules)
        self.writable = True

    async def write(self, rows: Rows) -> list[RefusedRow]:
        """Insert ``rows`` (table -> tuples in ``COLUMNS[table]`` order).

        Returns the rows their table refused for good (to dead-letter; not to send again);
        every other row is durable. Raises ``SinkUnavailable`` (``retry_after`` set) when
        ClickHouse did not take the rows within ``write_timeout_s``: nothing is promised
        then, the caller keeps all its rows and writes them again later (rows are
        idempotent). Raises ``ValueError`` for a table it does not know, before writing.
        """
        unknown = [table for table, data in rows.items() if data and table not in COLUMNS]
        if unknown:
            raise ValueError(f"no such ClickHouse table: {', '.join(unknown)}")
        if not any(rows.values()):
            return []
        started = time.perf_counter()
        deadline = time.monotonic() + self.write_timeout_s
        refused: list[RefusedRow] = []
        try:
            for table, data in rows.items():
                if data:
                    refused += await self._write_table(table, list(data), deadline)
        except SinkUnavailable:
            if self.metrics:
                self.metrics.sink_unavailable.inc()
            raise
        self._refused_memo.clear()  # returned to the caller: it will not send them again
        if self.metrics:
            self.metrics.clickhouse_flush_seconds.observe(time.perf_counter() - started)
            self.metrics.clickhouse_batches.inc()
        by_table: dict[str, list[RefusedRow]] = {}
        for r in refused:
            by_table.setdefault(r.table, []).append(r)
        for table, rs in by_table.items():
            if self.metrics:
                self.metrics.sink_rows_refused.labels(table=table).inc(len(rs))
            log.warning("%s refused %d row(s), returned for the DLQ; first: %s",
                        table, len(rs), rs[0].error[:300])
        return refused

    async def _write_table(self, table: str, data: list[Row],
                           deadline: float) -> list[RefusedRow]:
        known: list[RefusedRow] = []
        if self._refused_memo:  # a previous write gave up half way through a bisection
            rest = []
            for row in data:
                error = self._refused_memo.get((table, repr(row)))
                if error is None:
                    rest.append(row)
                else:
                    known.append(RefusedRow(table, tuple(row), error))
            data = rest

        async def insert(batch: Sequence[Row]) -> None:
            await self._insert(table, batch, deadline)

        return known + (await bisect(table, data, insert) if data else [])

    async def _insert(self, table: str, rows: Sequence[Row], deadline: float) -> None:
        """One insert, retried on transient errors until ``deadline``; a permanent error
        becomes ``RowsRefused``, running out of time ``SinkUnavailable``."""
        now = time.monotonic()
        if self._retry_at > deadline:  # still backing off: do not knock before it is over
            raise self._unavailable(f"backing off after {self._failures} failed attempts",
                                    self._retry_at - now)
        if now >= deadline:  # a long bisection; refused rows found so far are remembered
            raise self._unavailable("no time left to isolate refused rows", 0.0)
        if self._retry_at > now:
            await asyncio.sleep(self._retry_at - now)

        def stop(state: RetryCallState) -> bool:
            # upcoming_sleep: the back-off tenacity (>= 8.3) is about to sleep.
            wait = getattr(state, "upcoming_sleep", 0.0)
            if time.monotonic() + wait + _MIN_ATTEMPT_S < deadline:
                return False
            self._retry_at = time.monotonic() + wait  # where the next write resumes
            return True

        retrying = AsyncRetrying(retry=retry_if_exception(_is_transient), wait=self._backoff,
                                 stop=stop, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(table, rows, deadline)
        except Exception as exc:
            if classify(exc) == "transient":
                reason = self._masked(f"{type(exc).__name__}: {exc}")[:300]
                raise self._unavailable(reason, max(self._retry_at - time.monotonic(), 0.0)) \
                    from exc
            message = describe(exc).replace(self.dsn, mask_dsn(self.dsn))
            if len(rows) == 1:
                self._remember_refused(table, rows[0], message)
            raise RowsRefused(message) from exc

    def _backoff(self, state: RetryCallState | None = None) -> float:
        """Capped exponential back-off over consecutive failures, with equal jitter (half
        fixed, so retries stay spaced; half random, so workers do not retry in step)."""
        step = min(self.retry_max_s, _FIRST_RETRY_S * 2 ** max(self._failures - 1, 0))
        return step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not crypto

    async def _attempt(self, table: str, rows: Sequence[Row], deadline: float) -> None:
        left = max(deadline - time.monotonic(), 0.0)
        try:
            try:
                await asyncio.wait_for(self._call(self._insert_now, table, rows), left)
            except TimeoutError:  # the thread may still finish it: rows are idempotent
                raise TimeoutError(f"ClickHouse did not answer within {left:.1f}s") from None
        except Exception as exc:
            self._failed(table, exc)
            raise
        self._failures = 0
        self._retry_at = 0.0
        self.writable = True
        if self.metrics:
            self.metrics.clickhouse_rows.labels(table=table).inc(len(rows))

    def _failed(self, table: str, exc: Exception) -> None:
        kind = classify(exc)
        if self.metrics:
            self.metrics.clickhouse_errors.inc()
            self.metrics.sink_retries.labels(table=table, kind=kind).inc()
        if kind == "permanent":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s refused a batch, splitting it: %s", table, describe(exc)[:300])
            return
        self._failures += 1
        self.writable = False
        log.warning("clickhouse write to %s failed (%d in a row), will retry: %s", table,
                    self._failures, self._masked(f"{type(exc).__name__}: {exc}")[:300])

    def _remember_refused(self, table: str, row: Row, message: str) -> None:
        if len(self._refused_memo) >= _MEMO_MAX:
            self._refused_memo.pop(next(iter(self._refused_memo)))
        self._refused_memo[(table, repr(row))] = message

    def _unavailable(self, reason: str, retry_after: float) -> SinkUnavailable:
        return SinkUnavailable(
            f"ClickHouse {mask_dsn(self.dsn)} did not take the rows within "
            f"{self.write_timeout_s:g}s ({reason}); retry in {retry_after:.1f}s",
            retry_after=retry_after)

    def _masked(self, text: str) -> str:
        return text.replace(self.dsn, mask_dsn(self.dsn))

    # -- forgetting an account (``churnsignal forget``) ---------------------------------

    def _delete_account_now(self, account: str) -> dict[str, int]:
        client = self._ensure()
        # Every table with an account_id column, found rather than listed, so a table added
        # later is forgotten too; the audit is kept.
        tables = [row[0] for row in client.query(
            "SELECT table FROM system.columns WHERE database = currentDatabase() "
            "AND name = 'account_id' AND table IN (SELECT name FROM system.tables WHERE "
            "database = currentDatabase() AND engine LIKE '%MergeTree') "
            "AND table != 'deletions_data' ORDER BY table").result_rows]
        deleted: dict[str, int] = {}
        where = "WHERE account_id = {account:String}"
        params = {"account": account}
        for table in tables:
            # Table names come from system.columns; the account is a bound parameter.
            found = int(client.query(f"SELECT count() FROM `{table}` FINAL {where}",  # noqa: S608
                                     parameters=params).result_rows[0][0])
            if not found:
                continue
            try:  # a lightweight delete: the rows vanish from reads at once
                client.command(f"DELETE FROM `{table}` {where}",  # noqa: S608
                               parameters=params)
            except Exception as exc:  # e.g. a table with projections: a mutation instead
                log.info("lightweight delete on %s failed (%s); using a mutation", table, exc)
                client.command(f"ALTER TABLE `{table}` DELETE {where} "
                               "SETTINGS mutations_sync = 2", parameters=params)
            deleted[table] = found
        return deleted

    async def delete_account(self, account: str) -> dict[str, int]:
        """Delete every row of ``account`` from every table keyed by account; returns the
        rows deleted per table (as the views count them). Raises ``SinkUnavailable`` when
        ClickHouse fails (the caller tries again later: deleting is idempotent)."""
        try:
            deleted: dict[str, int] = await asyncio.wait_for(
                self._call(self._delete_account_now, account), self.write_timeout_s * 3)
        except Exception as exc:
            raise self._unavailable(f"deleting rows: {type(exc).__name__}: "
                                    f"{self._masked(str(exc))[:300]}", 1.0) from exc
        return deleted

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        return self._ensure().query(sql, parameters=parameters)

    async def aquery(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        return await self._call(self.query, sql, parameters)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._client is not None:
            _close_quietly(self._client)


def _preload_insert_modules() -> None:
    from clickhouse_connect.driver import options

    getattr(options, "pd", None)  # resolves (imports) pandas once; None when absent
