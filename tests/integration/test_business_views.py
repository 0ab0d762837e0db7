"""Churn and revenue views on the real ClickHouse engine (chdb), with hand-checked figures.

Events go through the same core and row code as the worker, and the same writer, so the
figures are what a worker would produce from these Stripe-shaped histories.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.sinks.queries import QUERIES, run_query
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.policy import Policy
from churnsignal.stream.rows import alert_row, fact_rows, score_row

pytestmark = [pytest.mark.integration, pytest.mark.offline]

POLICY = Policy()
NOV_20 = datetime(2026, 11, 20, tzinfo=UTC).timestamp()


def _ts(month: int, day: int) -> str:
    return datetime(2026, month, day, 12, tzinfo=UTC).isoformat()


class History:
    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.n = 0

    def add(self, account: str, type_: str, at: str, **data: Any) -> None:
        self.n += 1
        self.events.setdefault(account, []).append(
            {"event_id": f"evt_{self.n}", "account_id": account, "type": type_,
             "occurred_at": at, "data": data})

    def rows(self, wall: float = NOV_20) -> dict[str, list[Any]]:
        """The rows a worker writes for these histories (processed at ``wall``)."""
        rows: dict[str, list[Any]] = defaultdict(list)
        for account, events in self.events.items():
            items = [(None, 0, EVENT_ADAPTER.validate_python(e)) for e in events]
            out = apply_batch(None, account, items, wall, POLICY)
            billing, support = fact_rows(out)
            rows["billing_events_data"] += billing
            rows["support_events_data"] += support
            rows["account_scores_data"].append(score_row(out))
            if out.alert is not None:
                rows["alerts_data"].append(alert_row(out.alert))
        return rows


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[ClickHouseSink]:
    s = ClickHouseSink(f"chdb://{tmp_path / 'ch'}")
    yield s
    s.close()


def hundred_customers() -> History:
    """100 customers paying $100/month since September; in October 5 cancel (2 of them after
    their final payment retry failed), 2 downgrade to $50, 1 upgrades to $200; 4 invoices
    fail in October and 2 of them are paid later; 3 accounts pause: one resumes, one is
    among the cancellations, one stays paused."""
    h = History()
    for i in range(100):
        h.add(f"c{i:03d}", "subscription_created", _ts(9, 10), status="active", mrr_cents=10_000,
              plan="pro")
    for i in range(5):  # c000..c004 cancel in October
        if i < 2:
            h.add(f"c{i:03d}", "payment_failed", _ts(10, 5), invoice_id=f"in_{i}",
                  amount_cents=10_000, attempt_count=4, next_attempt_at=None)
        h.add(f"c{i:03d}", "subscription_deleted", _ts(10, 20), status="canceled",
              mrr_cents=10_000, cancellation_reason="payment_failed" if i < 2 else
              "cancellation_requested")
    for i in (10, 11):  # downgrades
        h.add(f"c{i:03d}", "subscription_updated", _ts(10, 15), status="active", mrr_cents=5_000,
              plan="starter")
    h.add("c012", "subscription_updated", _ts(10, 15), status="active", mrr_cents=20_000,
          plan="business")
    for i in (20, 21):  # failed, then recovered by a later retry
        h.add(f"c{i:03d}", "payment_failed", _ts(10, 7), invoice_id=f"in_{i}", amount_cents=10_000,
              attempt_count=1, next_attempt_at=_ts(10, 10))
        h.add(f"c{i:03d}", "invoice_paid", _ts(10, 10), invoice_id=f"in_{i}", amount_cents=10_000)
    h.add("c030", "subscription_paused", _ts(10, 1), status="paused", mrr_cents=10_000)
    h.add("c030", "subscription_resumed", _ts(10, 25), status="active", mrr_cents=10_000)
    h.add("c004", "subscription_paused", _ts(10, 2), status="paused", mrr_cents=10_000)
    h.add("c031", "subscription_paused", _ts(10, 3), status="paused", mrr_cents=10_000)
    h.add("c050", "ticket_opened", _ts(10, 3), ticket_id="t1", priority="high")
    h.add("c050", "satisfaction_rating", _ts(10, 9), csat="bad")
    return h


def with_late_cancellation(history: History) -> None:
    """An account whose cancellation is scheduled at processing time: a live critical alert."""
    history.add("late", "subscription_created", "2026-09-01T00:00:00+00:00", status="active",
                mrr_cents=30_000)
    history.add("late", "subscription_updated", "2026-11-20T00:00:00+00:00", status="active",
                mrr_cents=30_000, cancel_at_period_end=True)


def _month(rows: list[dict[str, Any]], month: str) -> dict[str, Any]:
    [row] = [r for r in rows if str(r["month"]).startswith(month)]
    return row


async def test_churn_revenue_cohort_payment_and_pause_figures(sink: ClickHouseSink) -> None:
    rows = hundred_customers().rows()
    await sink.write(rows)
    await sink.write(rows)  # at-least-once: the same rows again change nothing

    churn = _month(run_query(sink, "logo_churn").rows, "2026-10")
    assert (churn["customers_at_start"], churn["churned"]) == (100, 5)
    assert churn["logo_churn_rate"] == pytest.approx(0.05)  # 5 of 100: 5%
    assert (churn["churned_involuntary"], churn["churned_voluntary"]) == (2, 3)
    november = _month(run_query(sink, "logo_churn").rows, "2026-11")
    assert (november["customers_at_start"], november["churned"]) == (95, 0)

    mrr = _month(run_query(sink, "mrr_churn").rows, "2026-10")
    assert mrr["mrr_start_cents"] == 1_000_000
    assert mrr["churned_mrr_cents"] == 50_000
    assert mrr["contraction_mrr_cents"] == 10_000
    assert mrr["expansion_mrr_cents"] == 10_000
    assert mrr["gross_mrr_churn"] == pytest.approx(0.06)
    assert mrr["net_mrr_churn"] == pytest.approx(0.05)
    assert mrr["net_revenue_retention"] == pytest.approx(0.95)

    cohort = {r["months_since"]: r for r in run_query(sink, "cohort_retention").rows}
    assert (cohort[0]["customers"], cohort[1]["retained"], cohort[2]["retained"]) == (100, 100, 95)
    assert cohort[2]["retention"] == pytest.approx(0.95)

    recovery = _month(run_query(sink, "payment_recovery").rows, "2026-10")
    assert (recovery["failed_invoices"], recovery["recovered"]) == (4, 2)

    pauses = {r["outcome"]: r["pauses"] for r in run_query(sink, "pause_outcomes").rows}
    assert pauses == {"resumed": 1, "canceled": 1, "still_paused": 1}

    [[tickets, bad]] = sink.query(
        "SELECT countIf(type = 'ticket_opened'), countIf(csat = 'bad') FROM support_events"
    ).result_rows
    assert (tickets, bad) == (1, 1)


def test_every_saved_query_runs_on_an_empty_store(sink: ClickHouseSink) -> None:
    for name in QUERIES:
        assert run_query(sink, name).rows == [], name  # valid SQL, nothing made up


async def test_grafana_dashboard_queries_run_and_name_real_metrics(sink: ClickHouseSink) -> None:
    import json
    import re

    from churnsignal.app.metrics import Metrics

    history = hundred_customers()
    with_late_cancellation(history)
    await sink.write(history.rows())
    dashboard = json.loads((Path(__file__).parents[2] / "deploy/grafana/provisioning/dashboards"
                            / "churnsignal.json").read_text())
    exported = {m.name for m in Metrics().registry.collect()}
    ran = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            if "rawSql" in target:
                result = sink.query(target["rawSql"])  # the panel's SQL on the real engine
                assert result.result_rows, panel["title"]
                ran += 1
            else:
                for name in re.findall(r"churnsignal_[a-z_]+", target["expr"]):
                    base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                    assert base in exported, (panel["title"], name)
    assert ran >= 8


async def test_account_risk_is_the_last_snapshot_written_even_behind_a_tick(
        sink: ClickHouseSink) -> None:
    """A re-score tick writes its row at the wall clock; a batch of late events after it is
    scored at their own, earlier time. ``account_risk`` must still show that batch's
    snapshot (the last written: a higher version), also when later batches say the same."""
    from churnsignal.stream import packs
    from churnsignal.stream.clock import PartitionClock
    from churnsignal.stream.fold import SCORES, fold_step
    from churnsignal.stream.store import MemoryStateStore

    def usage(n: int, at: float) -> list[Any]:
        return ["usage/0", n, {"event_id": f"u{n}", "account_id": "acme", "type": "feature_used",
                               "user_id": "u1", "schema_version": 1,
                               "occurred_at": datetime.fromtimestamp(at, tz=UTC).isoformat(),
                               "data": {"feature": f"f{n % 3}"}}]

    store, day = MemoryStateStore(1), 86_400.0
    steps = [
        packs.encode(NOV_20 - 30 * day, [usage(n, NOV_20 - (40 - n) * day) for n in range(10)]),
        packs.encode_tick(NOV_20),  # 30 silent days: the score moves, a row at NOV_20
        # late events (a day before the tick), arriving after it: a row at their time
        packs.encode(NOV_20 + 60, [usage(10 + n, NOV_20 - day + n) for n in range(5)]),
        packs.encode(NOV_20 + 120, [usage(20, NOV_20 - day + 10)]),  # the same snapshot
    ]
    written: list[list[Any]] = []
    for i, raw in enumerate(steps):
        written.append(fold_step(store, packs.decode(raw), 0, i, POLICY,
                                 PartitionClock()).rows[SCORES])
    tick_row, late_row = written[1][0], written[2][0]
    assert late_row[1] < tick_row[1] and late_row[8] > tick_row[8]  # earlier, newer version
    assert (late_row[2], late_row[3]) != (tick_row[2], tick_row[3]) and written[3] == []
    await sink.write({SCORES: [row for rows in written for row in rows]})
    [(score, band, at)] = sink.query(
        "SELECT score, band, last_scored_at FROM account_risk WHERE account_id = 'acme'"
    ).result_rows
    assert band == late_row[3] and score == pytest.approx(late_row[2], abs=1e-3)
    assert at.timestamp() == pytest.approx(late_row[1].timestamp())
