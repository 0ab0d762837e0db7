"""The ClickHouse writer: one columnar insert per table per flush, idempotent, retried.

The same code serves the embedded engine (``chdb://path``) and a server (``http(s)://``).
Blocking client calls run on one dedicated thread so the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import clickhouse_connect

from churnsignal.app.settings import mask_dsn
from churnsignal.errors import SinkUnavailable
from churnsignal.sinks import ddl
from churnsignal.stream.rows import (
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
}

Rows = Mapping[str, Sequence[Sequence[Any]]]


def connect(dsn: str) -> Any:
    """A clickhouse-connect client for a chdb:// or http(s):// DSN; errors hide the password."""
    try:
        return clickhouse_connect.get_client(dsn=dsn)
    except Exception as exc:  # the driver raises many types; all mean "cannot connect"
        raise SinkUnavailable(f"ClickHouse {mask_dsn(dsn)} unreachable: {exc}") from None


def migrate(client: Any, ttl_days: int = 400) -> list[str]:
    """Create every table and view that is missing; safe to run any number of times."""
    done = []
    for statement in ddl.statements(ttl_days):
        client.command(statement)
        done.append(statement.split("(")[0].split(" AS")[0].strip())
    return done


class ClickHouseSink:
    """Writes row batches; retries with back-off until ClickHouse takes them (back-pressure)."""

    def __init__(self, dsn: str, *, retry_max_s: float = 30.0, metrics: Any = None,
                 ttl_days: int = 400) -> None:
        self.dsn = dsn
        self.retry_max_s = retry_max_s
        self.metrics = metrics
        self.ttl_days = ttl_days
        self._client: Any = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self.writable = False

    def _ensure(self) -> Any:
        if self._client is None:
            self._client = connect(self.dsn)
            migrate(self._client, self.ttl_days)
        return self._client

    def _insert_all(self, rows: Rows) -> int:
        # No insert_deduplication_token: a retried or re-derived flush may hold newer rows for
        # the same keys; ReplacingMergeTree versions make every rewrite idempotent instead.
        client = self._ensure()
        written = 0
        for table, data in rows.items():
            if data:
                client.insert(table, data, column_names=COLUMNS[table])
                written += len(data)
        return written

    def _call(self, fn: Any, *args: Any) -> Any:
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def start(self) -> None:
        await self._call(self._ensure)
        self.writable = True

    async def write(self, rows: Rows) -> None:
        """Insert ``rows`` (table -> tuples); returns only once they are durable."""
        if not any(rows.values()):
            return
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                await self._call(self._insert_all, rows)
            except Exception as exc:  # any failure: keep the batch, back off, try again
                self.writable = False
                self._client = None if isinstance(exc, SinkUnavailable) else self._client
                if self.metrics:
                    self.metrics.clickhouse_errors.inc()
                log.warning("clickhouse write failed, retrying in %.1fs: %s", delay,
                            str(exc).replace(self.dsn, mask_dsn(self.dsn))[:300])
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            self.writable = True
            if self.metrics:
                self.metrics.clickhouse_flush_seconds.observe(time.perf_counter() - started)
                self.metrics.clickhouse_batches.inc()
                for table, data in rows.items():
                    self.metrics.clickhouse_rows.labels(table=table).inc(len(data))
            return

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        return self._ensure().query(sql, parameters=parameters)

    async def aquery(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        return await self._call(self.query, sql, parameters)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a broken client must not mask shutdown
                log.debug("clickhouse close failed", exc_info=True)
