"""The report's formatting and page building, without ClickHouse or a browser (pure, fast).

Query results are written out by hand in the shapes `run_query` returns; the integration test
(tests/integration/test_report.py) feeds the same code real rows and draws it in Chromium.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from churnsignal.app import report
from churnsignal.app.report import (
    NONE,
    PLAY_TEXT,
    REASON_TEXT,
    build_page,
    build_sections,
    money,
    month_label,
    percent_axis,
    reasons_with_plays,
    whole,
)
from churnsignal.sinks.queries import QueryResult
from churnsignal.stream.policy import Signals
from churnsignal.stream.reasons import REASONS

GENERATED = datetime(2026, 11, 20, 14, 5, 59, 123456, tzinfo=UTC)


def results(**rows: list[dict[str, Any]]) -> dict[str, QueryResult]:
    """Every saved query the report runs: empty unless given."""
    return {name: QueryResult(name, name, list(rows.get(name, [{}])[0]), rows.get(name, []))
            for name in report.QUERY_NAMES}


def _month(m: int) -> datetime:
    return datetime(2026, m, 1)


CHURN = [  # September: no customer at its start yet; October: 5 of 100; November: none
    {"month": _month(9), "customers_at_start": 0, "churned": 0, "churned_voluntary": 0,
     "churned_involuntary": 0, "logo_churn_rate": None},
    {"month": _month(10), "customers_at_start": 100, "churned": 5, "churned_voluntary": 3,
     "churned_involuntary": 2, "logo_churn_rate": 0.05},
    {"month": _month(11), "customers_at_start": 95, "churned": 0, "churned_voluntary": 0,
     "churned_involuntary": 0, "logo_churn_rate": 0.0},
]
ACCOUNTS = [
    {"account_id": "acme", "band": "critical", "score": 80.0, "mrr_cents": 123_450,
     "reasons": ["cancellation_scheduled", "usage_decline"], "sub_status": "past_due",
     "last_scored_at": datetime(2026, 11, 20, 9, 41, 7, 654321)},
    {"account_id": "beta", "band": "high", "score": 62.5, "mrr_cents": 0, "reasons": (),
     "sub_status": "", "last_scored_at": datetime(2026, 11, 19, 23, 0)},
]


# ---- values --------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text"), [
    (80.0, "80"), (62.5, "63"), (62.4999, "62"), (0.4, "0"), (100, "100"),
    (None, NONE), (float("nan"), NONE)])
def test_scores_are_whole_numbers(value: float | None, text: str) -> None:
    assert whole(value) == text


@pytest.mark.parametrize(("cents", "currency", "text"), [
    (123_450, "usd", "$1,234.50"), (123_450, "USD", "$1,234.50"), (5, "eur", "€0.05"),
    (100_000_000, "gbp", "£1,000,000.00"), (1_234, "jpy", "¥1,234"),  # zero-decimal
    (123_450, "sek", "1,234.50 SEK"), (123_450, None, "1,234.50"), (-2_500, "usd", "-$25.00"),
    (0, "usd", "$0.00"), (None, "usd", NONE)])
def test_money_is_in_currency_units_not_cents(cents: int | None, currency: str | None,
                                              text: str) -> None:
    assert money(cents, currency) == text


def test_times_are_to_the_minute_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    assert report.minute(datetime(2026, 11, 20, 14, 5, 59, 999999)) == "2026-11-20 14:05"
    assert report.minute(datetime(2026, 11, 20, 15, 5, 1, tzinfo=paris)) == "2026-11-20 14:05"
    assert report.minute(date(2026, 11, 20)) == "2026-11-20"
    assert report.minute(None) == NONE


def test_months_read_as_words_and_the_current_one_says_it_is_partial() -> None:
    assert month_label(datetime(2026, 10, 1)) == "Oct 2026"
    assert month_label(date(2026, 11, 1), current=date(2026, 11, 20)) == "Nov 2026 (to date)"
    assert month_label(date(2026, 10, 1), current=date(2026, 11, 20)) == "Oct 2026"


def test_every_reason_code_and_play_of_the_policy_has_words() -> None:
    # the policy's signals are the reason codes, and a fitted model's verdict on engagement
    codes = set(Signals.model_fields) | {"low_engagement"}
    assert codes == set(REASONS) == set(REASON_TEXT)
    assert {play for _, play in REASONS.values()} == set(PLAY_TEXT)


def test_reasons_come_as_words_with_their_plays() -> None:
    assert reasons_with_plays(["cancellation_scheduled", "payment_failed_final"]) == [
        ("Cancellation scheduled", "Offer a pause or plan change"),
        ("Payment failed, retries exhausted", "Ask for a card update")]
    assert reasons_with_plays(["some_new_signal"]) == [("Some new signal", "")]  # never a code


def test_subscription_status_in_words() -> None:
    assert report.status_text("past_due") == "Past due"
    assert report.status_text("") == NONE


# ---- axes ----------------------------------------------------------------------------------

def test_a_zero_or_empty_churn_axis_starts_at_zero_not_minus_100_percent() -> None:
    for values in ([], [None], [0.0, 0.0], [None, 0.0]):
        axis = percent_axis(values)
        assert axis["range"][0] == 0 and 0 < axis["range"][1] <= 0.05, values


def test_a_percentage_axis_ends_near_the_largest_value() -> None:
    low, high = percent_axis([0.05, 0.0, None])["range"]
    assert low == 0 and 0.05 < high <= 0.06
    low, high = percent_axis([0.95, 1.08])["range"]
    assert low == 0 and 1.08 < high <= 1.25
    assert percent_axis([0.02])["tickformat"] == ".1%"  # 0.5 % steps need a decimal
    assert percent_axis([0.6])["tickformat"] == ".0%"


def test_a_negative_rate_gets_room_below_zero() -> None:
    low, high = percent_axis([-0.02, 0.04])["range"]  # net MRR churn below 0: expansion won
    assert -0.03 < low < -0.02 and high > 0.04


def test_small_counts_tick_at_whole_numbers() -> None:
    assert report.count_axis(1)["dtick"] == 1
    assert "dtick" not in report.count_axis(500)


# ---- sections and the page ------------------------------------------------------------------

def _keys(sections: list[report.Section]) -> dict[str, bool]:
    return {s.key: s.figure is not None for s in sections}


def test_a_fresh_install_says_so_in_every_section_and_loads_no_plotly() -> None:
    page = build_page(results(), source="chdb:///x", generated=GENERATED)
    assert not any(_keys(build_sections(results())).values())
    assert "plotly-graph-div" not in page and "Plotly.newPlot" not in page
    assert len(page) < 20_000  # plotly.js (4 MB) is left out when nothing is drawn
    assert page.count('class="empty"') == 6  # five charts and the accounts table
    assert "No events have reached ClickHouse yet" in page
    assert "Generated 2026-11-20 14:05 UTC" in page


def test_usage_only_draws_risk_and_alerts_without_any_churn_chart() -> None:
    # The shape that raised AttributeError: churn and MRR results empty, risk and alerts not.
    usage = results(
        at_risk=[{"band": "high", "accounts": 2, "mrr_cents": 0},
                 {"band": "low", "accounts": 10, "mrr_cents": 0}],
        alerts_by_reason=[{"top_reason": "usage_decline", "alerts": 2, "churned": 0,
                           "recovered": 0, "still_at_risk": 2}])
    sections = build_sections(usage)
    assert _keys(sections) == {"logo_churn": False, "mrr_churn": False, "risk": True,
                               "alerts": True, "cohorts": False}
    risk = next(s for s in sections if s.key == "risk")
    assert risk.title == "Accounts by risk band"  # no MRR known: no money axis
    assert [t.name for t in risk.figure.data] == ["Accounts"]  # type: ignore[union-attr]
    alerts = next(s for s in sections if s.key == "alerts")
    assert list(alerts.figure.data[0].y) == ["Usage declining"]  # type: ignore[union-attr]
    assert list(alerts.figure.data[0].customdata) == ["CSM check-in"]  # type: ignore[union-attr]
    page = build_page(usage, source="s", generated=GENERATED)
    assert page.count('class="plotly-graph-div"') == 2


def test_churn_chart_leaves_out_months_before_any_customer_and_fits_its_axis() -> None:
    [churn] = [s for s in build_sections(results(logo_churn=CHURN), GENERATED.date())
               if s.key == "logo_churn"]
    fig = churn.figure
    assert fig is not None
    assert list(fig.data[0].x) == ["Oct 2026", "Nov 2026 (to date)"]
    assert list(fig.data[0].y) == [0.05, 0.0]
    assert list(fig.data[2].y) == [0.02, 0.0]  # involuntary: 2 of 100
    low, high = fig.layout.yaxis.range
    assert low == 0 and 0.05 < high < 0.06


def test_a_later_month_without_customers_is_a_gap() -> None:
    gap = {**CHURN[0], "month": _month(12)}  # everyone gone by December
    [churn] = [s for s in build_sections(results(logo_churn=[*CHURN, gap]))
               if s.key == "logo_churn"]
    assert list(churn.figure.data[0].y) == [0.05, 0.0, None]  # type: ignore[union-attr]


def test_billing_months_without_customers_yet_are_explained() -> None:
    [churn] = [s for s in build_sections(results(logo_churn=CHURN[:1])) if s.key == "logo_churn"]
    assert churn.figure is None and "No month has begun with paying customers" in churn.empty


def test_accounts_table_reads_like_a_product() -> None:
    page = build_page(results(at_risk_accounts=ACCOUNTS), source="s", generated=GENERATED,
                      currency="usd")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.split("<body>")[1]))
    assert "acme Critical 80 $1,234.50 Past due" in text
    assert "Cancellation scheduled → Offer a pause or plan change" in text
    assert "Usage declining → CSM check-in" in text
    assert "2026-11-20 09:41" in text and "09:41:07" not in text and ".654321" not in text
    assert "beta High 63 — —" in text  # no subscription seen: MRR unknown, not $0.00
    assert "['" not in text and "cancellation_scheduled" not in text


def test_without_a_currency_amounts_are_plain_and_the_page_says_so() -> None:
    page = build_page(results(at_risk_accounts=ACCOUNTS), source="s", generated=GENERATED)
    assert "1,234.50" in page and "$1,234.50" not in page
    assert "in your billing currency" in page


def test_tiles_take_the_last_complete_month() -> None:
    tiles = report.tiles(results(logo_churn=CHURN), today=GENERATED.date())
    churn = next(t for t in tiles if t.label == "Logo churn")
    assert (churn.value, churn.detail) == ("5.0%", "Oct 2026: 5 of 100 customers")


def test_cohorts_show_percentages_and_counts() -> None:
    rows = [{"cohort": date(2026, 9, 1), "months_since": k, "customers": 100,
             "retained": r, "retention": r / 100} for k, r in ((0, 100), (1, 100), (2, 95))]
    [cohorts] = [s for s in build_sections(results(cohort_retention=rows))
                 if s.key == "cohorts"]
    heat = cohorts.figure.data[0]  # type: ignore[union-attr]
    assert list(heat.y) == ["Sep 2026"] and list(heat.x) == ["0", "1", "2"]
    assert [list(r) for r in heat.text] == [["100%", "100%", "95%"]]
    assert heat.customdata[0][2] == "95 of 100"


def test_backtest_page_without_curves_says_so() -> None:
    bare = SimpleNamespace(curves={}, roc_auc=None, pr_auc=None, horizon_days=30, bands=[],
                           churn_caught_by_reason={"usage_decline": 0.5},
                           as_dict=lambda: {"evaluated": 0})
    page = report.render_backtest(bare, generated=GENERATED)
    assert page.count("Not enough outcomes to draw this curve") == 2
    assert "churn caught by usage declining" in page


def test_backtest_page_draws_its_curves() -> None:
    curves = {"fpr": [0, 0.2, 1], "tpr": [0, 0.7, 1], "recall": [0, 0.7, 1],
              "precision": [1, 0.6, 0.1]}
    run = SimpleNamespace(curves=curves, roc_auc=0.81, pr_auc=0.55, horizon_days=30, bands=[],
                          churn_caught_by_reason={}, as_dict=lambda: {"evaluated": 3})
    page = report.render_backtest(run, generated=GENERATED)
    assert page.count('class="plotly-graph-div"') == 2
    assert "ROC (AUC 0.810)" in page and "Precision-recall (AP 0.550)" in page
