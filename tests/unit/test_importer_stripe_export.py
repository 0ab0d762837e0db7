"""`churnsignal import subscriptions` reads the Stripe Dashboard's subscriptions export: its
columns map to the same snapshots `sync stripe` makes, with MRR normalised per month."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from churnsignal.offline.importer import (
    ImportSummary,
    snapshots,
    stripe_export_header,
    stripe_export_subscription,
)
from churnsignal.schemas.events import EVENT_ADAPTER

AS_OF = datetime(2026, 11, 1, tzinfo=UTC).timestamp()

HEADER = ("id,Customer ID,Customer Name,Customer Email,Status,Cancellation Reason,Plan,Quantity,"
          "Currency,Interval,Amount,Created (UTC),Start Date (UTC),Current Period Start (UTC),"
          "Current Period End (UTC),Trial Start (UTC),Trial End (UTC),Canceled At (UTC),"
          "Ended At (UTC),Cancel At Period End,account_id (metadata)\n")


def write(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "subscriptions.csv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def test_an_export_maps_to_snapshots_with_monthly_mrr(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        # yearly, 2 seats of 600.00 -> 1200/12 = 100.00 a month, linked by metadata
        "sub_a,cus_a,A,a@x.io,active,,business,2,usd,year,600.00,2024-03-01 10:00,"
        "2024-03-01 10:00,2026-03-01 10:00,2027-03-01 10:00,,,,,false,acct-a",
        # weekly 15.00 -> 15 * 52 / 12 = 65.00 a month; no link: the customer id
        "sub_b,cus_b,B,b@x.io,past_due,,weekly,1,eur,week,15.00,2025-01-01 00:00,"
        "2025-01-01 00:00,2026-10-25 00:00,2026-11-08 00:00,,,,,false,",
        # monthly, ended: canceled, involuntary
        "sub_c,cus_c,C,c@x.io,canceled,payment_failed,pro,1,usd,month,49.00,2025-02-01 00:00,"
        "2025-02-01 00:00,2025-06-01 00:00,2025-07-01 00:00,,,2025-06-20 00:00,"
        "2025-07-01 00:00,false,acct-c",
        # a trial that converted: paying since its end
        "sub_d,cus_d,D,d@x.io,active,,pro,1,usd,month,49.00,2025-05-01 00:00,"
        "2025-05-01 00:00,2026-10-15 00:00,2026-11-15 00:00,2025-05-01 00:00,"
        "2025-05-15 00:00,,,true,acct-d",
        # never paid
        "sub_e,cus_e,E,e@x.io,incomplete_expired,,pro,1,usd,month,49.00,2026-01-01 00:00,"
        "2026-01-01 00:00,,,,,,2026-01-02 00:00,false,acct-e",
        # no amount: its MRR is not guessed
        "sub_f,cus_f,F,f@x.io,active,,pro,1,usd,,,2026-01-01 00:00,2026-01-01 00:00,,,,,,,"
        "false,acct-f",
    )
    assert stripe_export_header(path) is not None
    summary = ImportSummary()
    events = snapshots(path, AS_OF, summary)
    by_sub = {e["data"]["subscription_id"]: e for e in events}
    for e in events:
        EVENT_ADAPTER.validate_python(e)
    assert set(by_sub) == {"sub_a", "sub_b", "sub_c", "sub_d"}
    a, b, c, d = (by_sub[k] for k in ("sub_a", "sub_b", "sub_c", "sub_d"))
    assert (a["account_id"], a["data"]["mrr_cents"], a["data"]["plan"]) == ("acct-a", 10_000,
                                                                             "business")
    assert a["data"]["started_at"] == "2024-03-01T10:00:00+00:00"
    assert a["data"]["current_period_end"] == "2027-03-01T10:00:00+00:00"
    assert (b["account_id"], b["data"]["mrr_cents"], b["data"]["status"]) == ("cus_b", 6_500,
                                                                              "past_due")
    assert b["data"]["currency"] == "eur"
    assert c["data"]["status"] == "canceled" and c["data"]["ended_at"].startswith("2025-07-01")
    assert c["data"]["cancellation_reason"] == "payment_failed"
    assert d["data"]["started_at"].startswith("2025-05-15") and d["data"]["cancel_at_period_end"]
    assert summary.rows == 6 and summary.subscriptions == 4
    assert summary.skipped == {"never_paid": 1, "no_amount_or_interval": 1}
    assert summary.accounts == {"acct-a", "cus_b", "acct-c", "acct-d"}
    # the same file at the same time: the same ids (a re-import is a duplicate)
    assert [e["event_id"] for e in snapshots(path, AS_OF, ImportSummary())] == [
        e["event_id"] for e in events]


def test_older_spellings_of_the_columns_are_read() -> None:
    row = {"id": "sub_1", "Customer ID": "cus_1", "Status": "active",
           "Start (UTC)": "2025-01-01 00:00", "Plan Amount": "30.00",
           "Plan Interval": "month", "Plan Interval Count": "3", "Quantity": "1"}
    sub = stripe_export_subscription(row)
    price = sub["items"]["data"][0]["price"]
    assert sub["start_date"] == int(datetime(2025, 1, 1, tzinfo=UTC).timestamp())
    assert price["unit_amount"] == 3000 and price["recurring"] == {"interval": "month",
                                                                   "interval_count": 3}


def test_the_plain_format_is_not_taken_for_an_export(tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text("account_id,start_date,end_date,mrr,plan\nacct,2024-01-01,,49,pro\n")
    assert stripe_export_header(plain) is None
