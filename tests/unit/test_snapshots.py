"""Subscription snapshots (the backfill's records): decode, state, rows, import ids."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from churnsignal.offline.importer import ImportSummary, snapshots
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.schemas.results import Accepted
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.policy import Policy
from churnsignal.stream.rows import fact_rows

POLICY = Policy()
NOW = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


def snap(at: str, status: str = "active", mrr: int = 9_900, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"snap-{at}-{status}-{mrr}", "account_id": "a1",
            "type": "subscription_snapshot", "occurred_at": at,
            "data": {"subscription_id": "sub_1", "status": status, "mrr_cents": mrr,
                     "currency": "usd", "started_at": "2019-03-01T00:00:00+00:00", **extra}}


def sub(at: str, status: str, mrr: int, n: int) -> dict[str, Any]:
    return {"event_id": f"evt{n}", "account_id": "a1", "type": "subscription_updated",
            "occurred_at": at, "data": {"status": status, "mrr_cents": mrr}}


def fold(*events: dict[str, Any]) -> Any:
    items = [(None, 0, EVENT_ADAPTER.validate_python(e)) for e in events]
    return apply_batch(None, "a1", items, NOW, POLICY)


def test_a_snapshot_is_never_too_old() -> None:
    raw = orjson.dumps(snap("2020-01-01T00:00:00+00:00"))
    assert isinstance(decode(raw, DecodeOptions(), NOW, "canonical"), Accepted)


def test_a_later_live_event_wins_and_an_older_one_does_not_undo_the_snapshot() -> None:
    at = "2026-05-01T00:00:00+00:00"
    later = fold(snap(at), sub("2026-05-10T00:00:00+00:00", "past_due", 19_900, 1))
    assert (later.state.sub_status, later.state.mrr_cents) == ("past_due", 19_900)
    older = fold(snap(at), sub("2026-04-10T00:00:00+00:00", "past_due", 19_900, 1))
    assert (older.state.sub_status, older.state.mrr_cents) == ("active", 9_900)
    first = fold(sub("2026-04-10T00:00:00+00:00", "past_due", 19_900, 1), snap(at))
    assert (first.state.sub_status, first.state.mrr_cents) == ("active", 9_900)
    only = fold(snap(at))
    assert not only.state.days  # a snapshot is not activity: no daily bucket


def test_snapshot_rows_are_keyed_by_the_subscription() -> None:
    ended = snap("2026-05-01T00:00:00+00:00", status="canceled",
                 ended_at="2026-02-01T00:00:00+00:00", cancellation_reason="payment_failed")
    rows = fact_rows(fold(ended))[0]
    assert [(r[1], r[4], r[6], r[7], r[13], r[15]) for r in rows] == [
        ("snapshot:sub_1:start", "active", 9_900, 0, False, "usd"),
        ("snapshot:sub_1:end", "canceled", 0, 9_900, True, "usd")]
    out = fold(ended)
    assert out.alert is None and out.state.sub_status == "canceled"  # past news: no page


def test_importing_a_file_twice_gives_the_same_ids(tmp_path: Path) -> None:
    path = tmp_path / "subs.csv"
    path.write_text("account_id,start_date,end_date,mrr,plan\n"
                    "a1,2024-01-05,,99,pro\na1,2022-01-01,2023-01-01,49,\n"
                    ",2024-01-01,,10,\na2,2030-01-01,,10,\na3,2024-05-01,2024-04-01,10,\n")
    first, again = ImportSummary(), ImportSummary()
    ids = [e["event_id"] for e in snapshots(path, NOW, first)]
    assert ids == [e["event_id"] for e in snapshots(path, NOW, again)]
    assert (first.rows, first.subscriptions, len(first.accounts)) == (5, 2, 1)
    assert dict(first.skipped) == {"no_account": 1, "starts_after_snapshot": 1,
                                   "ends_before_start": 1}
