"""The pure part of `churnsignal sync stripe`: a Stripe subscription object -> the snapshot the
importer would write; account attribution as the stream does it; ordering; back-off; and the
checkpoint's resume rules (atomic file, spool cut back to the last checkpoint)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from churnsignal.offline.stripe_sync import (
    Checkpoint,
    account_of,
    backoff_s,
    customer_link,
    fingerprint,
    ordered_events,
    ordered_snapshots,
    snapshot_of,
)
from churnsignal.schemas.events import EVENT_ADAPTER

AS_OF = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
DAY = 86_400


def ts(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp())


def sub(**over: Any) -> dict[str, Any]:
    """A Stripe subscription object, in the shape the API returns (2025+ API versions keep
    current_period_end on the items)."""
    base: dict[str, Any] = {
        "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
        "created": ts("2025-01-10"), "start_date": ts("2025-01-10"), "currency": "usd",
        "cancel_at_period_end": False, "cancel_at": None, "canceled_at": None, "ended_at": None,
        "trial_start": None, "trial_end": None, "metadata": {}, "pause_collection": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "items": {"object": "list", "data": [{
            "id": "si_1", "object": "subscription_item", "quantity": 1,
            "current_period_end": ts("2026-11-10"),
            "price": {"id": "price_pro", "object": "price", "lookup_key": "pro",
                      "nickname": None, "unit_amount": 4900,
                      "recurring": {"interval": "month", "interval_count": 1}}}]},
    }
    base.update(over)
    return base


def test_an_active_subscription_becomes_the_importers_snapshot() -> None:
    event = snapshot_of(sub(), "acct-1", AS_OF)
    assert isinstance(event, dict)
    EVENT_ADAPTER.validate_python(event)
    assert event["type"] == "subscription_snapshot" and event["account_id"] == "acct-1"
    assert event["event_id"].startswith("snapshot-")
    assert event["occurred_at"] == "2026-11-01T00:00:00+00:00"
    assert event["data"] == {
        "subscription_id": "sub_1", "status": "active", "plan": "pro", "mrr_cents": 4900,
        "started_at": "2025-01-10T00:00:00+00:00", "cancel_at_period_end": False,
        "current_period_end": "2026-11-10T00:00:00+00:00", "currency": "usd",
        "stripe_customer_id": "cus_1"}  # the snapshot links cus_1 to acct-1 (decode)
    # the same object at the same time is the same snapshot: a re-sync is a duplicate
    assert snapshot_of(sub(), "acct-1", AS_OF) == event


@pytest.mark.parametrize(("interval", "count", "quantity", "amount", "mrr"), [
    ("year", 1, 1, 120_000, 10_000),     # a year / 12
    ("month", 3, 1, 30_000, 10_000),     # quarterly / 3
    ("week", 1, 1, 1_000, 4_333),        # 52 weeks / 12 months
    ("day", 1, 2, 100, 6_083),           # 365 days / 12, two seats
    ("month", 1, 5, 1_000, 5_000),       # per seat
])
def test_mrr_is_normalised_per_month_like_the_stream(interval: str, count: int, quantity: int,
                                                     amount: int, mrr: int) -> None:
    s = sub(items={"data": [{"quantity": quantity, "price": {
        "id": "p", "unit_amount": amount,
        "recurring": {"interval": interval, "interval_count": count}}}]})
    event = snapshot_of(s, "a", AS_OF)
    assert isinstance(event, dict) and event["data"]["mrr_cents"] == mrr


def test_a_percent_discount_lowers_mrr() -> None:
    event = snapshot_of(sub(discount={"coupon": {"percent_off": 25}}), "a", AS_OF)
    assert isinstance(event, dict) and event["data"]["mrr_cents"] == 3675


def test_a_canceled_subscription_has_its_end_and_reason() -> None:
    s = sub(status="canceled", ended_at=ts("2026-03-05"), canceled_at=ts("2026-03-01"),
            cancellation_details={"reason": "payment_failed"})
    event = snapshot_of(s, "a", AS_OF)
    assert isinstance(event, dict)
    d = event["data"]
    assert d["status"] == "canceled" and d["ended_at"] == "2026-03-05T00:00:00+00:00"
    assert d["cancellation_reason"] == "payment_failed"
    assert "current_period_end" not in d and d["cancel_at_period_end"] is False


def test_a_scheduled_cancellation_is_kept_as_such() -> None:
    for over in ({"cancel_at_period_end": True}, {"cancel_at": ts("2026-12-01")}):
        event = snapshot_of(sub(**over), "a", AS_OF)
        assert isinstance(event, dict)
        assert event["data"]["status"] == "active" and event["data"]["cancel_at_period_end"]


def test_trials_start_paying_when_they_end() -> None:
    trialing = snapshot_of(sub(status="trialing", trial_start=ts("2026-10-20"),
                               trial_end=ts("2026-11-03"), start_date=ts("2026-10-20")),
                           "a", AS_OF)
    assert isinstance(trialing, dict)
    assert trialing["data"]["status"] == "trialing"
    assert trialing["data"]["started_at"] == "2026-10-20T00:00:00+00:00"
    converted = snapshot_of(sub(trial_start=ts("2025-01-10"), trial_end=ts("2025-01-24")),
                            "a", AS_OF)
    assert isinstance(converted, dict)
    assert converted["data"]["started_at"] == "2025-01-24T00:00:00+00:00"
    # canceled before its trial ended: never paid, never a customer
    assert snapshot_of(sub(status="canceled", trial_start=ts("2025-01-10"),
                           trial_end=ts("2025-01-24"), ended_at=ts("2025-01-20")),
                       "a", AS_OF) == "ended_in_trial"


def test_statuses_that_never_paid_or_start_later_are_skipped() -> None:
    assert snapshot_of(sub(status="incomplete"), "a", AS_OF) == "never_paid"
    assert snapshot_of(sub(status="incomplete_expired"), "a", AS_OF) == "never_paid"
    assert snapshot_of(sub(start_date=ts("2026-12-01")), "a", AS_OF) == "starts_after_snapshot"
    assert snapshot_of(sub(status="mystery"), "a", AS_OF) == "unknown_status"
    assert snapshot_of(sub(id=None), "a", AS_OF) == "no_id"


def test_past_due_unpaid_and_paused_keep_their_status() -> None:
    for status in ("past_due", "unpaid", "paused"):
        event = snapshot_of(sub(status=status), "a", AS_OF)
        assert isinstance(event, dict) and event["data"]["status"] == status
    paused = snapshot_of(sub(pause_collection={"behavior": "void", "resumes_at": None}), "a",
                         AS_OF)
    assert isinstance(paused, dict) and paused["data"]["status"] == "paused"


def test_an_end_after_the_snapshot_time_has_not_happened_yet() -> None:
    event = snapshot_of(sub(status="active", ended_at=int(AS_OF) + DAY), "a", AS_OF)
    assert isinstance(event, dict)
    assert event["data"]["status"] == "active" and "ended_at" not in event["data"]


def test_unreadable_prices_keep_the_customer_with_zero_mrr() -> None:
    event = snapshot_of(sub(items={"data": ["garbage"]}), "a", AS_OF)
    assert isinstance(event, dict) and event["data"]["mrr_cents"] == 0


def test_the_account_is_found_as_the_stream_finds_it() -> None:
    links = {"cus_1": "acct-from-customer"}
    assert account_of(sub(metadata={"account_id": "acct-own"}), links) == "acct-own"
    assert account_of(sub(), links) == "acct-from-customer"
    assert account_of(sub(customer="cus_unlinked"), links) == "cus_unlinked"  # the fallback
    expanded = sub(customer={"id": "cus_9", "object": "customer",
                             "metadata": {"account_id": "acct-expanded"}})
    assert account_of(expanded, {}) == "acct-expanded"
    assert account_of(sub(customer=None), links) is None
    assert customer_link({"id": "cus_1", "metadata": {"account_id": "x"}}) == "x"
    assert customer_link({"id": "cus_1", "metadata": {}}) is None
    assert customer_link({"id": "cus_1", "metadata": {"org": "y"}}, "org") == "y"


def test_orders_are_fixed_events_oldest_first_and_once() -> None:
    events = [{"id": "evt_3", "created": 30}, {"id": "evt_1", "created": 10},
              {"id": "evt_2", "created": 10}, {"id": "evt_1", "created": 10}]
    assert [e["id"] for e in ordered_events(events)] == ["evt_1", "evt_2", "evt_3"]
    a = snapshot_of(sub(id="sub_b", start_date=ts("2025-05-01")), "acct", AS_OF)
    b = snapshot_of(sub(id="sub_a", start_date=ts("2025-02-01")), "acct", AS_OF)
    c = snapshot_of(sub(id="sub_c"), "other", AS_OF)
    assert isinstance(a, dict) and isinstance(b, dict) and isinstance(c, dict)
    assert [e["data"]["subscription_id"] for e in ordered_snapshots([c, a, b])] == [
        "sub_a", "sub_b", "sub_c"]


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    waits = [backoff_s(n, 1.0, 30.0, None, 1.0) for n in range(1, 8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_s(1, 1.0, 30.0, None, 0.0) == 0.5  # jitter halves at most
    assert backoff_s(1, 1.0, 30.0, 12.0, 0.0) == 12.0


def test_a_checkpoint_resumes_and_cuts_what_came_after_it(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path, fingerprint("rk_test_1", ""))
    assert cp.load(restart=False, now=1000.0) is False
    cp.append("customers", [{"id": "cus_1"}, {"id": "cus_2"}])
    cp.state["cursor"] = "cus_2"
    cp.save()
    # a page written but not checkpointed (the process died in between)
    with open(cp.spool("customers"), "ab") as fh:
        fh.write(b'{"id":"cus_3"}\n{"id":"cus_4"')
    again = Checkpoint(tmp_path, fingerprint("rk_test_1", ""))
    assert again.load(restart=False, now=2000.0) is True
    assert again.state["as_of"] == 1000.0 and again.state["cursor"] == "cus_2"
    assert [c["id"] for c in again.read("customers")] == ["cus_1", "cus_2"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no leftovers
    assert orjson.loads(again.path.read_bytes())["phase"] == "customers"
    # another key (another Stripe account), or --restart: start afresh
    other = Checkpoint(tmp_path, fingerprint("rk_test_2", ""))
    assert other.load(restart=False, now=3000.0) is False
    assert list(other.read("customers")) == [] and other.state["as_of"] == 3000.0
    assert "rk_test" not in other.path.read_text()  # the key is never written


def test_a_finished_sync_starts_afresh(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path, "f")
    cp.load(restart=False, now=1.0)
    cp.state["phase"] = "done"
    cp.save()
    assert Checkpoint(tmp_path, "f").load(restart=False, now=5.0) is False
