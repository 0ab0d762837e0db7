"""The outbox: what only an applied event makes, kept on the state topic until it is delivered.

A flush stores the states first, then publishes the alerts, then writes ClickHouse (see
``stream.checkpoint``): alerts do not wait for the insert, and keep going out while ClickHouse
is down. Once a state is stored, a redelivered pack's events are duplicates, and most rows
are re-derived from the state (the score snapshot, the day's totals). Three kinds of rows are
not: an alert's row and the billing and support facts, made only when an event is applied.
They, and the alerts themselves until published, are written beside the states, in the same
partition, under keys no account has; a flush deletes them (tombstones) once ClickHouse has
the rows, or once the alerts are published. A partition's next owner reads them back with its
states (``read``) and delivers them: re-inserting a row is harmless (every table replaces by
its key), and an alert is published again only if the worker died between publishing it and
deleting its record (milliseconds), with the same id.

Pure: records in, records out; the checkpoint decides when.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from itertools import count
from typing import Any

import orjson

from churnsignal.schemas.alerts import Alert
from churnsignal.stream.fold import ALERTS, BILLING, SUPPORT, PendingAlert, account_column
from churnsignal.stream.rows import ALERT_COLUMNS, BILLING_COLUMNS, SUPPORT_COLUMNS

PREFIX = b"\x00outbox/"  # an account id may start with anything: the magic says it is ours
MAGIC = b"churnsignal-outbox/1\n"
TABLES = {ALERTS: ALERT_COLUMNS, BILLING: BILLING_COLUMNS, SUPPORT: SUPPORT_COLUMNS}
# Per record: a few hundred KB at most, below a record's 1 MB limit (an alert row is ~0.3 KB,
# a billing or support row less; an alert ~1-2 KB with its reasons).
CHUNK_ROWS = 500
CHUNK_ALERTS = 200
_DATETIMES = {"triggered_at", "emitted_at", "occurred_at"}
_DATES: set[str] = set()

Rows = dict[str, list[Any]]
Record = tuple[bytes, bytes | None]


def _typed(columns: tuple[str, ...]) -> list[tuple[int, Any]]:
    return [(i, datetime.fromisoformat if c in _DATETIMES else date.fromisoformat)
            for i, c in enumerate(columns) if c in _DATETIMES or c in _DATES]


_PARSE = {table: _typed(columns) for table, columns in TABLES.items()}


def boxed(rows: Rows) -> Rows:
    """The rows of ``rows`` that go in the outbox (those no redelivery re-derives)."""
    return {table: data for table, data in rows.items() if table in TABLES and data}


def by_partition(rows: Rows, partition_of: Any) -> dict[int, Rows]:
    """Outbox rows grouped by the partition of their account."""
    out: dict[int, Rows] = defaultdict(lambda: defaultdict(list))
    for table, data in boxed(rows).items():
        at = account_column(table)
        for row in data:
            out[partition_of(str(row[at]))][table].append(row)
    return out


def is_outbox(key: bytes, value: bytes | None) -> bool:
    return partition_of(key, value) is not None


def partition_of(key: bytes, value: bytes | None) -> int | None:
    """The state-topic partition an outbox record (or its tombstone) lives in, named in its
    key; None for any other record."""
    if not key.startswith(PREFIX) or (value is not None and not value.startswith(MAGIC)):
        return None
    head = key[len(PREFIX):].split(b"/", 1)[0]
    return int(head) if head.isdigit() else None


class Keys:
    """Outbox keys unique across restarts: a new run never writes over a record an older
    one left for delivery."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:12]
        self.counter = count()

    def flush(self) -> str:
        return f"{self.run}-{next(self.counter)}"


def _key(partition: int, flush: str, part: str) -> bytes:
    return PREFIX + f"{partition}/{flush}/{part}".encode()


def row_records(flush: str, rows: dict[int, Rows]) -> dict[bytes, bytes]:
    """Records holding these rows (per partition, in chunks)."""
    out: dict[bytes, bytes] = {}
    for partition, tables in rows.items():
        for table, data in tables.items():
            for start in range(0, len(data), CHUNK_ROWS):
                key = _key(partition, flush, f"{table}.{start // CHUNK_ROWS}")
                out[key] = MAGIC + orjson.dumps(
                    {"table": table, "rows": data[start:start + CHUNK_ROWS]})
    return out


def alert_records(flush: str, alerts: list[PendingAlert]) -> dict[bytes, bytes]:
    """Records holding alerts to publish (per partition, in chunks: a re-score tick may
    raise thousands at once)."""
    grouped: dict[int, list[PendingAlert]] = defaultdict(list)
    for a in alerts:
        grouped[a.partition].append(a)
    out: dict[bytes, bytes] = {}
    for partition, items in grouped.items():
        for start in range(0, len(items), CHUNK_ALERTS):
            out[_key(partition, flush, f"alerts.{start // CHUNK_ALERTS}")] = MAGIC + orjson.dumps(
                {"alerts": [{"alert": a.alert.model_dump(mode="json"), "wall": a.wall,
                             "partition": a.partition, "offset": a.offset}
                            for a in items[start:start + CHUNK_ALERTS]]})
    return out


@dataclass
class Recovered:
    """What a partition's outbox records held: rows for ClickHouse, alerts to publish, and
    the keys to delete once they are delivered; and records that could not be read."""

    rows: Rows = field(default_factory=lambda: defaultdict(list))
    row_keys: list[bytes] = field(default_factory=list)
    alerts: list[PendingAlert] = field(default_factory=list)
    alert_keys: list[bytes] = field(default_factory=list)
    unreadable: dict[bytes, str] = field(default_factory=dict)  # key -> why


def read(records: dict[bytes, bytes]) -> Recovered:
    """The outbox records among a partition's state records (``is_outbox``). A record that
    cannot be read (not written by this version) is reported, never raised: the partition's
    states still load, and the record stays for a version that reads it."""
    got = Recovered()
    for key, value in sorted(records.items()):
        try:
            data = orjson.loads(value[len(MAGIC):])
            if "alerts" in data:
                alerts = [PendingAlert(Alert.model_validate(a["alert"]), float(a["wall"]),
                                       int(a["partition"]), int(a["offset"]))
                          for a in data["alerts"]]
                got.alerts += alerts
                got.alert_keys.append(key)
                continue
            table = data["table"]
            parse = _PARSE[table]
            rows = []
            for raw in data["rows"]:
                for i, to_type in parse:
                    if raw[i] is not None:
                        raw[i] = to_type(raw[i])
                rows.append(tuple(raw))
        except Exception as exc:
            got.unreadable[key] = f"{type(exc).__name__}: {exc}"
            continue
        got.rows[table] += rows
        got.row_keys.append(key)
    return got
