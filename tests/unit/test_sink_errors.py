"""ClickHouse failures sorted into transient and permanent, and refused rows found by bisection.

Every exception classified here is a real one: raised by clickhouse-connect while serializing
a value, by the embedded engine (chdb, through clickhouse-connect and on its own), by
clickhouse-connect's HTTP transport against a local socket or a server answering as
ClickHouse does. Only the bisection's own logic runs against a fake insert.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from churnsignal.app.settings import load_settings
from churnsignal.errors import SinkUnavailable
from churnsignal.sinks.clickhouse import (
    PERMANENT_ERRORS,
    ClickHouseSink,
    RefusedRow,
    RowsRefused,
    bisect,
    classify,
    connect,
    describe,
    error_code,
)

clickhouse_connect = pytest.importorskip("clickhouse_connect")


def _raised(fn: Any, *args: Any, **kwargs: Any) -> Exception:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # the point: capture the real exception object
        return exc
    raise AssertionError("expected an exception")


# -- the embedded engine -------------------------------------------------------------------

COLUMNS = ("id", "small", "count", "day", "at", "score", "tags", "nps")


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """An in-memory chdb engine through clickhouse-connect, closed after the module: one
    process holds one engine path at a time (the integration suite opens others)."""
    pytest.importorskip("chdb")
    client = clickhouse_connect.get_client(dsn="chdb://memory")
    client.command("""CREATE TABLE t (id String, small UInt8, count UInt32, day Date,
        at DateTime64(3, 'UTC'), score Float32, tags Array(LowCardinality(String)),
        nps Nullable(UInt8)) ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY id""")
    yield client
    client.close()


GOOD = ("a", 1, 1, date(2024, 1, 1), datetime(2024, 1, 1, tzinfo=UTC), 0.5, ["x"], None)


def _with(column: str, value: Any) -> tuple[Any, ...]:
    row = list(GOOD)
    row[COLUMNS.index(column)] = value
    return tuple(row)


@pytest.mark.parametrize(("column", "value"), [
    ("small", 300),                 # out of range for UInt8 (struct.error inside)
    ("count", -1),                  # negative into UInt32
    ("count", 2**40),
    ("nps", 256),                   # Nullable(UInt8)
    ("count", "seven"),             # a string into a number
    ("day", "2024-01-01"),          # a string into a Date (TypeError)
    ("day", date(2200, 1, 1)),      # beyond Date's range
    ("at", "not a time"),           # a string into DateTime64 (AttributeError)
    ("at", 1.7e9),                  # a float where a datetime goes
    ("score", 1e300),               # too large for Float32 (OverflowError inside)
    ("id", None),                   # None in a non-Nullable column
    ("id", "bad \ud800"),           # a lone surrogate: not encodable (UnicodeEncodeError)
    ("tags", None),                 # None where an array goes
    ("tags", [1]),                  # a number inside Array(String)
])
def test_a_value_its_column_cannot_hold_is_permanent_and_named(
        engine: Any, column: str, value: Any) -> None:
    exc = _raised(engine.insert, "t", [GOOD, _with(column, value)], column_names=COLUMNS)
    assert classify(exc) == "permanent", repr(exc)
    assert f"`{column}`" in describe(exc)  # the operator learns which column refused it


def test_values_that_fit_are_written(engine: Any) -> None:
    engine.insert("t", [GOOD, _with("score", float("nan")), _with("nps", 255)],
                  column_names=COLUMNS)  # NaN fits Float32: not every odd value is refused


@pytest.mark.parametrize(("sql", "name"), [
    ("INSERT INTO t (id, small) VALUES ('b', 'abc')", "CANNOT_PARSE_TEXT"),
    ("INSERT INTO t (id, day) VALUES ('b', 'yesterday')", "CANNOT_PARSE_DATE"),
    ("SELECT accurateCast(300, 'UInt8')", "CANNOT_CONVERT_TYPE"),
    ("SELECT CAST('x', 'Enum8(''a'' = 1)')", "UNKNOWN_ELEMENT_OF_ENUM"),
    ("SELECT toDecimal32(1e10, 2)", "DECIMAL_OVERFLOW"),
])
def test_server_refusals_of_the_data_are_permanent(engine: Any, sql: str, name: str) -> None:
    exc = _raised(engine.command, sql)
    assert error_code(exc) == (PERMANENT_ERRORS[name], name)
    assert classify(exc) == "permanent"
    chdb_error = exc.__cause__  # chdb's own ChdbError: only the engine's text
    assert type(chdb_error).__name__ == "ChdbError"
    assert error_code(chdb_error)[0] == PERMANENT_ERRORS[name]
    assert classify(chdb_error) == "permanent"


def test_a_batch_over_too_many_months_is_permanent_for_that_batch(engine: Any) -> None:
    # Code 252 like TOO_MANY_PARTS, but the same batch can never succeed: split it.
    rows = [_with("day", date(2000 + i // 12, i % 12 + 1, 1)) for i in range(101)]
    exc = _raised(engine.insert, "t", rows, column_names=COLUMNS)
    assert error_code(exc)[0] == 252
    assert classify(exc) == classify(exc.__cause__) == "permanent"


def test_too_many_parts_is_transient(engine: Any) -> None:
    engine.command("CREATE TABLE parts (x UInt8) ENGINE = MergeTree ORDER BY x "
                   "SETTINGS parts_to_throw_insert = 1")
    engine.command("SYSTEM STOP MERGES parts")
    engine.insert("parts", [[1]], column_names=["x"])
    exc = _raised(engine.insert, "parts", [[2]], column_names=["x"])
    assert error_code(exc) == (252, "TOO_MANY_PARTS")
    assert classify(exc) == classify(exc.__cause__) == "transient"


@pytest.mark.parametrize(("sql", "name"), [
    ("SELECT sleep(0.2) SETTINGS max_execution_time = 0.05", "TIMEOUT_EXCEEDED"),
    ("SELECT count() FROM numbers(1000000) GROUP BY number % 100000 "
     "SETTINGS max_memory_usage = 1000", "MEMORY_LIMIT_EXCEEDED"),
    ("INSERT INTO no_such_table VALUES (1)", "UNKNOWN_TABLE"),  # retried after a migrate
])
def test_engine_conditions_that_may_pass_are_transient(engine: Any, sql: str, name: str) -> None:
    exc = _raised(engine.command, sql)
    assert error_code(exc)[1] == name
    assert classify(exc) == classify(exc.__cause__) == "transient"


# -- the HTTP transport ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ClickHouseAnswers(BaseHTTPRequestHandler):
    """Answers every request as a ClickHouse server in trouble does."""

    answer: tuple[int, str | None, bytes] = (500, None, b"")

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, code, body = self.answer
        self.send_response(status)
        if code:
            self.send_header("X-ClickHouse-Exception-Code", code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ClickHouseAnswers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("status", "code", "body", "kind"), [
    (503, None, b"Service Unavailable", "transient"),
    (502, None, b"<html>Bad Gateway</html>", "transient"),  # a proxy, no ClickHouse code
    (500, "252", b"Code: 252. DB::Exception: Too many parts (300). Merges are processing "
     b"significantly slower than inserts. (TOO_MANY_PARTS) (version 24.8.4.13)", "transient"),
    (500, "241", b"Code: 241. DB::Exception: Memory limit (total) exceeded. "
     b"(MEMORY_LIMIT_EXCEEDED) (version 24.8.4.13)", "transient"),
    (500, "516", b"Code: 516. DB::Exception: default: Authentication failed. "
     b"(AUTHENTICATION_FAILED) (version 24.8.4.13)", "transient"),  # fix the config, keep rows
    (400, "27", b"Code: 27. DB::Exception: Cannot parse input: expected '\\t' before: 'x'. "
     b"(CANNOT_PARSE_INPUT_ASSERTION_FAILED) (version 24.8.4.13)", "permanent"),
    (400, "53", b"Code: 53. DB::Exception: Type mismatch in VALUES section. "
     b"(TYPE_MISMATCH) (version 24.8.4.13)", "permanent"),
    (400, "321", b"Code: 321. DB::Exception: Value out of range of data type. "
     b"(VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE) (version 24.8.4.13)", "permanent"),
])
def test_server_answers_over_http(http_server: ThreadingHTTPServer, status: int,
                                  code: str | None, body: bytes, kind: str) -> None:
    _ClickHouseAnswers.answer = (status, code, body)
    port = http_server.server_address[1]
    exc = _raised(clickhouse_connect.get_client, host="127.0.0.1", port=port,
                  connect_timeout=2, send_receive_timeout=2)
    assert classify(exc) == kind, repr(exc)


def test_a_refused_connection_is_transient() -> None:
    port = _free_port()
    exc = _raised(clickhouse_connect.get_client, host="127.0.0.1", port=port, connect_timeout=1)
    assert classify(exc) == "transient"
    wrapped = _raised(connect, f"http://user:secret@127.0.0.1:{port}")
    assert isinstance(wrapped, SinkUnavailable) and "secret" not in str(wrapped)
    assert classify(wrapped) == "transient"
    assert classify(_raised(socket.create_connection, ("127.0.0.1", port), 1)) == "transient"


def test_a_server_that_never_answers_is_transient() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        exc = _raised(clickhouse_connect.get_client, host="127.0.0.1",
                      port=listener.getsockname()[1], connect_timeout=1, send_receive_timeout=1)
    assert "timed out" in str(exc)
    assert classify(exc) == "transient"


def test_python_errors_outside_serialization_are_not_taken_for_bad_rows() -> None:
    # A bug of ours must stall writes visibly, not send every row to the DLQ.
    assert classify(_raised(len, None)) == "transient"
    assert classify(_raised(int, "x")) == "transient"
    assert classify(_raised(getattr, object(), "missing")) == "transient"
    empty: dict[str, int] = {}
    assert classify(_raised(empty.__getitem__, "k")) == "transient"


# -- bisection (a fake insert: only the splitting logic is under test) ---------------------

class FakeTable:
    """Refuses any batch holding a row whose value is negative, like a UInt column."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.calls = 0

    async def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        self.calls += 1
        bad = [r[0] for r in rows if r[0] < 0]
        if bad:
            raise RowsRefused(f"value {bad[0]} out of range for UInt32")
        self.written.extend(r[0] for r in rows)


@pytest.mark.parametrize("bad", [[], [0], [999], [517], [0, 1], [3, 517, 998], list(range(10))])
async def test_bisection_writes_every_good_row_once_and_returns_each_bad_one(
        bad: list[int]) -> None:
    n = 1000
    rows = [(-i - 1 if i in bad else i,) for i in range(n)]
    table = FakeTable()
    refused = await bisect("t", rows, table.insert)
    assert sorted(table.written) == [i for i in range(n) if i not in bad]  # once each
    assert refused == [RefusedRow("t", (-i - 1,), f"value {-i - 1} out of range for UInt32")
                       for i in bad]  # in batch order, with the message of the row itself
    assert table.calls <= 1 + 2 * len(bad) * 10  # about 2·b·log2(n) inserts, not n


async def test_bisection_of_a_batch_that_is_all_bad() -> None:
    table = FakeTable()
    refused = await bisect("t", [(-1,), (-2,), (-3,)], table.insert)
    assert [r.row for r in refused] == [(-1,), (-2,), (-3,)] and table.written == []


async def test_a_transient_failure_during_bisection_is_not_swallowed() -> None:
    table = FakeTable()

    async def insert(rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) < 100:
            raise SinkUnavailable("ClickHouse went away", retry_after=1.0)
        await table.insert(rows)

    with pytest.raises(SinkUnavailable):
        await bisect("t", [(i,) for i in range(499)] + [(-1,)], insert)


# -- back-off and settings -----------------------------------------------------------------

def test_back_off_grows_with_consecutive_failures_is_capped_and_jittered() -> None:
    sink = ClickHouseSink("chdb:///nowhere", retry_max_s=5.0)
    try:
        waits = {}
        for failures in (1, 2, 3, 10, 50):
            sink._failures = failures
            waits[failures] = [sink._backoff() for _ in range(200)]
        assert all(0.1 <= w <= 0.2 for w in waits[1])
        assert all(0.2 <= w <= 0.4 for w in waits[2])
        assert all(2.5 <= w <= 5.0 for w in waits[10] + waits[50])  # the cap, jittered below
        assert len(set(waits[50])) > 100
    finally:
        sink.close()


def test_the_write_bound_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().sink.write_timeout_s == 10.0
    monkeypatch.setenv("CHURNSIGNAL_SINK__WRITE_TIMEOUT_S", "2.5")
    assert load_settings().sink.write_timeout_s == 2.5
