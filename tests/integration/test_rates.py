"""`churnsignal import rates` and `mrr_monthly_reporting` on the real ClickHouse engine (chdb):
MRR of three currencies (one of them zero-decimal) and one without a currency, converted to
USD at rates that change mid-history; figures checked by hand, to the cent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from churnsignal.app.settings import ViewSettings
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.policy import Policy
from churnsignal.stream.rows import fact_rows

pytestmark = [pytest.mark.integration, pytest.mark.offline]

WALL = datetime(2026, 11, 20, tzinfo=UTC).timestamp()
RATES = """currency,rate,valid_from
EUR,1.10
eur,1.20,2026-09-01
eur,1.2345,2026-10-15
jpy,0.0065,2026-09-01
usd,1
"""


def _ts(month: int, day: int) -> str:
    return datetime(2026, month, day, 12, tzinfo=UTC).isoformat()


def billing_rows() -> list[Any]:
    """e1, e2 in EUR (cents), j1 in JPY (yen: zero-decimal), u1 in USD, n1 without currency."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(account: str, type_: str, at: str, **data: Any) -> None:
        events[account].append({"event_id": f"evt_{account}_{len(events[account])}",
                                "account_id": account, "type": type_, "occurred_at": at,
                                "data": data})

    add("e1", "subscription_created", _ts(7, 10), status="active", mrr_cents=10_000,
        currency="eur")
    add("e1", "subscription_updated", _ts(8, 15), status="active", mrr_cents=15_000,
        currency="eur")  # expansion in August
    add("e2", "subscription_created", _ts(7, 5), status="active", mrr_cents=20_000,
        currency="eur")
    add("e2", "subscription_deleted", _ts(9, 20), status="canceled", mrr_cents=20_000,
        currency="eur")  # churn in September
    add("j1", "subscription_created", _ts(7, 1), status="active", mrr_cents=12_000,
        currency="jpy")
    add("j1", "subscription_updated", _ts(10, 10), status="active", mrr_cents=6_000,
        currency="jpy")  # contraction in October
    add("u1", "subscription_created", _ts(8, 3), status="active", mrr_cents=5_000,
        currency="usd")
    add("n1", "subscription_created", _ts(7, 1), status="active", mrr_cents=1_000)
    rows: list[Any] = []
    for account, evs in events.items():
        items = [(None, 0, EVENT_ADAPTER.validate_python(e)) for e in evs]
        billing, _ = fact_rows(apply_batch(None, account, items, WALL, Policy()))
        rows += billing
    return rows


def import_rates(dsn: str, path: Path, reporting: str | None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHURNSIGNAL_")}
    environ.update({"CHURNSIGNAL_CLICKHOUSE_DSN": dsn,
                    "CHURNSIGNAL_STATE_DIR": str(path.parent / "state")})
    if reporting is not None:
        environ["CHURNSIGNAL_VIEWS__REPORTING_CURRENCY"] = reporting
    return subprocess.run([sys.executable, "-m", "churnsignal", "import", "rates", str(path)],
                          env=environ, capture_output=True, text=True, timeout=180, check=False)


FIGURES = ("mrr_start_cents", "churned_mrr_cents", "contraction_mrr_cents",
           "expansion_mrr_cents", "new_mrr_cents", "mrr_end_cents")


async def test_mrr_converted_to_one_reporting_currency(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'ch'}"
    rates = tmp_path / "rates.csv"
    bad = tmp_path / "bad.csv"
    bad.write_text("eur,1.3,2026-11-01\ngbp,-1\n")
    # the command, as a user runs it: a bad file loads nothing; without a reporting currency
    # it refuses; the good file twice (the second load replaces the first's rows)
    refused = import_rates(dsn, bad, "USD")
    assert refused.returncode == 2 and "line 2" in refused.stderr, refused.stderr
    unset = import_rates(dsn, rates, None)
    assert unset.returncode == 2 and "REPORTING_CURRENCY" in unset.stderr, unset.stderr
    rates.write_text(RATES)
    for _ in range(2):
        done = import_rates(dsn, rates, "USD")
        assert done.returncode == 0, done.stderr + done.stdout
        assert "rates: 5 (eur 3, jpy 1, usd 1) -> usd" in done.stdout, done.stdout

    sink = ClickHouseSink(dsn, views=ViewSettings(reporting_currency="usd"))
    try:
        await sink.write({"billing_events_data": billing_rows()})
        # the embedded store is this process's now (as a running worker's): a load refuses
        held = import_rates(dsn, rates, "usd")
        assert held.returncode == 2 and f"held by PID {os.getpid()}" in held.stderr, held.stderr
        assert sink.query("SELECT toInt64(count()) FROM currency_rates").result_rows[0][0] == 5
        names = [c[0] for c in sink.query("DESCRIBE mrr_monthly_reporting").result_rows]
        got: dict[str, dict[str, Any]] = {}
        for row in sink.query("SELECT * FROM mrr_monthly_reporting").result_rows:
            r = dict(zip(names, row, strict=True))
            got[r["month"].strftime("%Y-%m")] = r
    finally:
        sink.close()

    def figures(month: str) -> tuple[int, ...]:
        return tuple(got[month][f] for f in FIGURES)

    # July: EUR at 1.10 (since always), JPY has no rate yet, n1 has no currency: both out
    assert figures("2026-07") == (0, 0, 0, 0, 33_000, 33_000)
    assert (got["2026-07"]["currencies"], got["2026-07"]["missing_rate"],
            got["2026-07"]["missing_currencies"]) == (2, 2, ["", "jpy"])
    # August: e1's expansion (EUR 50.00 -> USD 55.00), u1 new in USD (its own: rate 1)
    assert figures("2026-08") == (33_000, 0, 0, 5_500, 5_000, 43_500)
    # September: EUR at 1.20 from the 1st; JPY at 0.0065 USD per yen: ¥12,000 = $78.00
    assert figures("2026-09") == (42_000 + 7_800 + 5_000, 24_000, 0, 0, 0,
                                  18_000 + 7_800 + 5_000)
    assert (got["2026-09"]["missing_rate"], got["2026-09"]["missing_currencies"]) == (1, [""])
    assert got["2026-09"]["gross_mrr_churn"] == pytest.approx(24_000 / 54_800)
    assert got["2026-09"]["net_revenue_retention"] == pytest.approx(30_800 / 54_800)
    # October: the rate of 2026-10-15 is not yet valid on the 1st: EUR still at 1.20;
    # j1's contraction ¥6,000 = $39.00
    assert figures("2026-10") == (18_000 + 7_800 + 5_000, 0, 3_900, 0, 0,
                                  18_000 + 3_900 + 5_000)
    # November: EUR at 1.2345: €150.00 = $185.175 -> 18,518 cents (half up)
    assert figures("2026-11") == (18_518 + 3_900 + 5_000, 0, 0, 0, 0, 18_518 + 3_900 + 5_000)
    assert all(r["reporting_currency"] == "usd" for r in got.values())

    # The same store with no reporting currency: the view is there, empty; mrr_monthly
    # (per currency) is untouched.
    sink = ClickHouseSink(dsn, views=ViewSettings(reporting_currency=None))
    try:
        assert sink.query("SELECT toInt64(count()) FROM mrr_monthly_reporting").result_rows[0][0] == 0
        per_currency = [list(r) for r in sink.query(
            "SELECT currency, toInt64(mrr_end_cents) FROM mrr_monthly "
            "WHERE month = '2026-11-01 00:00:00' ORDER BY currency").result_rows]
        assert per_currency == [["", 1_000], ["eur", 15_000], ["jpy", 6_000], ["usd", 5_000]]
    finally:
        sink.close()
