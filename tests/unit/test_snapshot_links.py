"""A subscription snapshot that names its Stripe customer links the customer to its account."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from churnsignal.offline.importer import ImportSummary, snapshots
from churnsignal.offline.stripe_sync import account_of, snapshot_of
from churnsignal.schemas import identity, stripe
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Accepted

NOW = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


def snap(account: str, **extra: Any) -> bytes:
    return orjson.dumps({
        "event_id": f"snap-{account}", "account_id": account, "type": "subscription_snapshot",
        "occurred_at": "2026-05-01T00:00:00+00:00",
        "data": {"subscription_id": "sub_1", "status": "active", "mrr_cents": 4900,
                 "started_at": "2025-01-01T00:00:00+00:00", **extra}})


def test_a_snapshot_naming_its_customer_teaches_the_link_to_its_account() -> None:
    result = decode(snap("acct-1", stripe_customer_id="cus_1"), DecodeOptions(), NOW,
                    "canonical")
    assert isinstance(result, Accepted)
    assert result.links == ((identity.stripe_customer("cus_1"), "acct-1"),)
    # the same link a Stripe object with the metadata teaches (schemas/stripe.links)
    customer_updated = {"object": "event", "type": "customer.updated", "data": {"object": {
        "object": "customer", "id": "cus_1", "metadata": {"account_id": "acct-1"}}}}
    assert list(result.links) == stripe.links(customer_updated)


def test_no_link_without_a_customer_or_when_the_customer_is_the_account() -> None:
    plain = decode(snap("acct-1"), DecodeOptions(), NOW, "canonical")
    itself = decode(snap("cus_1", stripe_customer_id="cus_1"), DecodeOptions(), NOW, "auto")
    assert isinstance(plain, Accepted) and plain.links == ()
    # a customer that is its own account: the fallback already; a link to itself would
    # override a metadata link learned from another event
    assert isinstance(itself, Accepted) and itself.links == ()
    assert stripe.snapshot_links("~stripe:customer:cus_1", "cus_1") == []


def test_the_sync_names_the_customer_linked_by_its_metadata() -> None:
    sub = {"id": "sub_9", "object": "subscription", "customer": "cus_9", "status": "active",
           "start_date": 1_700_000_000, "currency": "eur", "metadata": {},
           "items": {"data": [{"quantity": 2, "price": {
               "id": "p", "unit_amount": 1000, "recurring": {"interval": "month"}}}]}}
    account = account_of(sub, {"cus_9": "acct-9"})  # from the customer's metadata
    event = snapshot_of(sub, account or "", NOW)
    assert isinstance(event, dict) and account == "acct-9"
    assert event["data"]["stripe_customer_id"] == "cus_9"
    result = decode(orjson.dumps(event), DecodeOptions(), NOW, "canonical")
    assert isinstance(result, Accepted)
    assert result.links == ((identity.stripe_customer("cus_9"), "acct-9"),)
    # unlinked: the customer is the account, nothing to link
    alone = snapshot_of(sub, account_of(sub, {}) or "", NOW)
    assert isinstance(alone, dict) and alone["account_id"] == "cus_9"
    assert "stripe_customer_id" not in alone["data"]


def test_the_import_reads_a_customer_column(tmp_path: Path) -> None:
    path = tmp_path / "subs.csv"
    path.write_text("account_id,start_date,end_date,mrr,customer_id\n"
                    "acct-1,2025-01-01,,49,cus_1\n"
                    "cus_2,2025-02-01,,10,cus_2\n"
                    "acct-3,2025-03-01,,20,\n")
    events = snapshots(path, NOW, ImportSummary())
    by_account = {e["account_id"]: e["data"].get("stripe_customer_id") for e in events}
    assert by_account == {"acct-1": "cus_1", "cus_2": None, "acct-3": None}
    links = [decode(orjson.dumps(e), DecodeOptions(), NOW, "canonical") for e in events]
    assert [r.links for r in links if isinstance(r, Accepted)] == [
        ((identity.stripe_customer("cus_1"), "acct-1"),), (), ()]
