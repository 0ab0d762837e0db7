"""The ClickHouse sink against the real embedded engine (chdb through clickhouse-connect).

A row its table refuses is returned with the message and every other row is written; a
ClickHouse that is down, hung or out of parts makes ``write`` give up within its bound with
``SinkUnavailable``, and the same rows go in once it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from prometheus_client import CollectorRegistry

from churnsignal.app.metrics import Metrics
from churnsignal.errors import SinkUnavailable
from churnsignal.sinks.clickhouse import ClickHouseSink

pytestmark = [pytest.mark.integration, pytest.mark.offline]

BOUND_S = 1.5
SLACK_S = 0.5  # event-loop and thread hand-over on 2 shared cores


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[ClickHouseSink]:
    pytest.importorskip("chdb")
    # A generous bound by default: bisection is work, not waiting; slow on a busy machine.
    s = ClickHouseSink(f"chdb://{tmp_path / 'ch'}", retry_max_s=0.4, write_timeout_s=60,
                       metrics=Metrics(CollectorRegistry()))
    await s.start()  # the engine's start and the DDL are not part of any write's bound
    yield s
    s.close()


def _value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def _daily(n: int, day: date = date(2024, 3, 1)) -> list[tuple[Any, ...]]:
    return [(f"acct-{i:04d}", day, 3, 2, 1, 1, 0, 0, 7) for i in range(n)]


def _support(n: int) -> list[tuple[Any, ...]]:
    # Recent: support events older than sink.ttl_days are dropped by the table's TTL.
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    return [(f"acct-{i:04d}", f"evt-{i}", at, "nps_response", "", "", "", "", None, None, "",
             9, 1) for i in range(n)]


async def test_a_row_the_table_refuses_is_returned_and_the_rest_is_written(
        sink: ClickHouseSink) -> None:
    daily = _daily(300)
    daily[123] = ("acct-0123", date(2024, 3, 1), 3, 2, 1, 2**40, 0, 0, 7)  # UInt32 overflow
    support = _support(40)
    support[7] = support[7][:11] + (300,) + support[7][12:]  # nps Nullable(UInt8)
    support[30] = support[30][:2] + ("last tuesday",) + support[30][3:]  # DateTime64
    refused = await sink.write({"account_daily_data": daily, "support_events_data": support})

    assert [(r.table, r.row) for r in refused] == [
        ("account_daily_data", daily[123]), ("support_events_data", support[7]),
        ("support_events_data", support[30])]
    assert "active_users" in refused[0].error and "4294967295" in refused[0].error
    assert "`nps`" in refused[1].error
    assert "`occurred_at`" in refused[2].error
    [[accounts, events]] = sink.query(
        "SELECT count(), sum(events) FROM account_daily").result_rows
    assert (accounts, events) == (299, 299 * 3)
    assert sink.query("SELECT count() FROM account_daily WHERE account_id = 'acct-0123'"
                      ).result_rows == [(0,)]
    [[tickets, nps]] = sink.query("SELECT count(), sum(nps) FROM support_events").result_rows
    assert (tickets, nps) == (38, 38 * 9)

    m = sink.metrics
    assert _value(m, "churnsignal_sink_rows_refused_total", table="account_daily_data") == 1
    assert _value(m, "churnsignal_sink_rows_refused_total", table="support_events_data") == 2
    assert _value(m, "churnsignal_sink_retries_total", table="account_daily_data",
                  kind="permanent") >= 9  # log2(300) splits down to the one row
    assert _value(m, "churnsignal_sink_retries_total", table="account_daily_data",
                  kind="transient") == 0
    assert _value(m, "churnsignal_clickhouse_rows_total", table="account_daily_data") == 299
    assert sink.writable

    # Written again (the caller re-sends only what was not refused): nothing doubles.
    assert await sink.write({"account_daily_data": [r for r in daily if r != daily[123]]}) == []
    assert sink.query("SELECT count(), sum(events) FROM account_daily").result_rows == [
        (299, 299 * 3)]


async def test_a_batch_spanning_too_many_months_is_split_and_fully_written(
        sink: ClickHouseSink) -> None:
    # The engine refuses one insert block over more than 100 monthly partitions (code 252,
    # "Too many partitions for single INSERT block"): retrying it as is would never end.
    rows = [(f"acct-{i}", date(2010, 1, 15) + timedelta(days=31 * i), 1, 1, 1, 1, 0, 0, 1)
            for i in range(150)]
    assert await sink.write({"account_daily_data": rows}) == []
    assert sink.query("SELECT count() FROM account_daily").result_rows == [(150,)]
    assert _value(sink.metrics, "churnsignal_sink_retries_total", table="account_daily_data",
                  kind="permanent") >= 1


async def test_clickhouse_down_gives_up_within_the_bound_then_catches_up(
        sink: ClickHouseSink, monkeypatch: pytest.MonkeyPatch) -> None:
    # As tests/integration/faulty_worker.py does: the fault at the client boundary.
    real_insert = Client.insert

    def unreachable(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("injected fault: ClickHouse unreachable")

    monkeypatch.setattr(Client, "insert", unreachable)
    sink.write_timeout_s = BOUND_S
    rows = {"account_daily_data": _daily(50), "support_events_data": _support(5)}
    started = time.monotonic()
    with pytest.raises(SinkUnavailable) as raised:
        await sink.write(rows)
    assert time.monotonic() - started <= BOUND_S + SLACK_S
    assert "unreachable" in str(raised.value) and raised.value.retry_after >= 0
    assert not sink.writable
    m = sink.metrics
    assert _value(m, "churnsignal_sink_retries_total", table="account_daily_data",
                  kind="transient") >= 3
    assert _value(m, "churnsignal_sink_unavailable_total") == 1
    assert _value(m, "churnsignal_clickhouse_errors_total") >= 3  # what test_outage watches

    # Still down at the next flush: bounded again, and no row is refused for an outage.
    started = time.monotonic()
    with pytest.raises(SinkUnavailable):
        await sink.write(rows)
    assert time.monotonic() - started <= BOUND_S + SLACK_S
    assert _value(m, "churnsignal_sink_rows_refused_total", table="account_daily_data") == 0

    monkeypatch.setattr(Client, "insert", real_insert)
    assert await sink.write(rows) == []
    assert sink.writable
    assert sink.query("SELECT count() FROM account_daily").result_rows == [(50,)]
    assert sink.query("SELECT count() FROM support_events").result_rows == [(5,)]


async def test_a_hung_clickhouse_is_abandoned_within_the_bound(
        sink: ClickHouseSink, monkeypatch: pytest.MonkeyPatch) -> None:
    real_insert = Client.insert

    def hung(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(BOUND_S + 1)  # longer than the bound; then it does go through
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(Client, "insert", hung)
    sink.write_timeout_s = BOUND_S
    rows = {"account_daily_data": _daily(20)}
    started = time.monotonic()
    with pytest.raises(SinkUnavailable, match="did not answer"):
        await sink.write(rows)
    assert time.monotonic() - started <= BOUND_S + SLACK_S
    monkeypatch.setattr(Client, "insert", real_insert)
    await asyncio.sleep(1.5)  # the abandoned insert finishes on the client thread
    assert await sink.write(rows) == []  # and the retry rewrites the same keys
    assert sink.query("SELECT count() FROM account_daily").result_rows == [(20,)]


async def test_too_many_parts_is_retried_within_the_bound_and_written_once_merged(
        sink: ClickHouseSink) -> None:
    # A real engine-side transient error: a table over its parts limit, merges stopped.
    assert await sink.write({"account_daily_data": _daily(1)}) == []
    sink.write_timeout_s = BOUND_S
    sink.query("ALTER TABLE account_daily_data MODIFY SETTING parts_to_throw_insert = 1")
    sink.query("SYSTEM STOP MERGES account_daily_data")
    rows = {"account_daily_data": _daily(30)}
    started = time.monotonic()
    with pytest.raises(SinkUnavailable, match="TOO_MANY_PARTS"):
        await sink.write(rows)
    assert time.monotonic() - started <= BOUND_S + SLACK_S
    assert _value(sink.metrics, "churnsignal_sink_retries_total", table="account_daily_data",
                  kind="transient") >= 2
    assert _value(sink.metrics, "churnsignal_sink_rows_refused_total",
                  table="account_daily_data") == 0

    sink.query("ALTER TABLE account_daily_data RESET SETTING parts_to_throw_insert")
    sink.query("SYSTEM START MERGES account_daily_data")
    await asyncio.sleep(0.5)  # past the back-off the failed write left
    assert await sink.write(rows) == []
    assert sink.query("SELECT count() FROM account_daily").result_rows == [(30,)]


async def test_writes_reuse_one_insert_context_per_table_and_renew_it_after_a_refusal(
        sink: ClickHouseSink) -> None:
    # Without a kept context clickhouse-connect asks the server for the column types before
    # every insert: a second query per table and flush.
    assert await sink.write({"account_daily_data": _daily(5)}) == []
    context = sink._contexts["account_daily_data"]
    assert await sink.write({"account_daily_data": _daily(5, date(2024, 3, 2))}) == []
    assert sink._contexts["account_daily_data"] is context
    bad = ("acct-9999", date(2024, 3, 3), 3, 2, 1, 2**40, 0, 0, 7)  # UInt32 overflow
    refused = await sink.write({"account_daily_data": [*_daily(3, date(2024, 3, 3)), bad]})
    assert [r.row for r in refused] == [bad]
    assert await sink.write({"account_daily_data": _daily(5, date(2024, 3, 4))}) == []
    assert sink.query("SELECT count() FROM account_daily").result_rows == [(18,)]
