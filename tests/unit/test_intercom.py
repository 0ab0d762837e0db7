"""Intercom webhook notifications through the worker's decode: shapes as Intercom documents
them (a notification_event around the topic's object)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from churnsignal.schemas import intercom
from churnsignal.schemas.decode import DecodeOptions, decode, detect
from churnsignal.schemas.results import Accepted, Rejected, Skipped

NOW = time.time()
OPTS = DecodeOptions()


def notification(topic: str, item: dict[str, Any], notif_id: str = "notif_1") -> dict[str, Any]:
    return {"type": "notification_event", "app_id": "abc123", "id": notif_id, "topic": topic,
            "delivery_status": "pending", "delivery_attempts": 1, "delivered_at": 0,
            "first_sent_at": int(NOW), "created_at": int(NOW), "self": None, "links": {},
            "data": {"type": "notification_event_data", "item": item}}


def conversation(**extra: Any) -> dict[str, Any]:
    return {"type": "conversation", "id": "4242", "created_at": int(NOW) - 60,
            "updated_at": int(NOW), "state": "open", "priority": "not_priority",
            "source": {"type": "conversation", "delivered_as": "customer_initiated",
                       "author": {"type": "user", "id": "ct_1"}},
            "contacts": {"type": "contact.list",
                         "contacts": [{"type": "contact", "id": "ct_1", "external_id": "u1"}]},
            **extra}


def run(payload: dict[str, Any], source: Any = "auto") -> Any:
    return decode(orjson.dumps(payload), OPTS, NOW, source)


@pytest.mark.parametrize(("topic", "kind"), [
    ("conversation.user.created", "ticket_opened"),
    ("conversation.admin.single.created", "ticket_opened"),
    ("conversation.user.replied", "ticket_updated"),
    ("conversation.admin.replied", "ticket_updated"),
    ("conversation.admin.assigned", "ticket_updated"),
    ("conversation.admin.closed", "ticket_solved"),
    ("conversation.admin.opened", "ticket_reopened"),
])
def test_conversation_topics(topic: str, kind: str) -> None:
    payload = notification(topic, conversation(company={"type": "company", "id": "ic_9",
                                                        "company_id": "acme"}))
    assert detect(payload) == "intercom"
    result = run(payload)
    assert isinstance(result, Accepted), result
    event = result.event
    assert (event.type, event.account_id, event.event_id) == (kind, "acme", "notif_1")
    assert event.data.ticket_id == "intercom:conversation:4242"
    assert event.user_id == "ct_1"
    assert abs(event.occurred_at.timestamp() - int(NOW)) < 1


def test_conversation_without_company_waits_under_its_contact_and_contacts_link_it() -> None:
    result = run(notification("conversation.user.created", conversation()))
    assert isinstance(result, Accepted)
    assert result.event.account_id == intercom.contact_key("ct_1") == "~intercom:contact:ct_1"
    contact = {"type": "contact", "id": "ct_1", "role": "user",
               "companies": {"type": "list", "data": [{"type": "company", "id": "ic_9",
                                                       "company_id": "acme"}]}}
    linked = run(notification("contact.user.updated", contact))
    assert isinstance(linked, Skipped) and linked.reason == "intercom_unused"
    assert linked.links == (("~intercom:contact:ct_1", "acme"),)
    attached = run(notification("company.contact.attached",
                                {"type": "company_contact", "company": {"id": "ic_2"},
                                 "contact": {"id": "ct_2"}}))
    assert isinstance(attached, Skipped) and attached.links == (("~intercom:contact:ct_2", "ic_2"),)


def test_company_from_the_contacts_companies_in_the_conversation() -> None:
    item = conversation()
    item["contacts"]["contacts"][0]["companies"] = [{"id": "ic_3", "company_id": "globex"}]
    result = run(notification("conversation.user.replied", item))
    assert isinstance(result, Accepted) and result.event.account_id == "globex"
    assert result.links == (("~intercom:contact:ct_1", "globex"),)


@pytest.mark.parametrize(("rating", "csat"), [(5, "good"), (4, "good"), (2, "bad"), (1, "bad")])
def test_conversation_rating(rating: int, csat: str) -> None:
    item = conversation(company={"id": "acme"}, conversation_rating={"rating": rating})
    result = run(notification("conversation.rating.added", item))
    assert isinstance(result, Accepted)
    assert result.event.type == "satisfaction_rating" and result.event.data.csat == csat


def test_three_stars_and_unused_topics_are_skipped() -> None:
    item = conversation(company={"id": "acme"}, conversation_rating={"rating": 3})
    unrated = run(notification("conversation.rating.added", item))
    assert isinstance(unrated, Skipped) and unrated.reason == "intercom_unrated"
    assert unrated.links == (("~intercom:contact:ct_1", "acme"),)  # still teaches the link
    assert isinstance(run(notification("company.created", {"type": "company", "id": "c"})),
                      Skipped)
    deleted = run(notification("conversation.deleted", {"type": "conversation", "id": "1"}))
    assert isinstance(deleted, Skipped) and deleted.reason == "intercom_unused"


@pytest.mark.parametrize(("topic", "state", "kind"), [
    ("ticket.created", "submitted", "ticket_opened"),
    ("ticket.state.updated", "in_progress", "ticket_updated"),
    ("ticket.state.updated", "resolved", "ticket_solved"),
])
def test_tickets(topic: str, state: str, kind: str) -> None:
    item = {"type": "ticket", "id": "77", "ticket_id": "12", "ticket_state": state,
            "company": {"id": "ic_1", "company_id": "acme"},
            "contacts": {"type": "contact.list", "contacts": [{"id": "ct_1"}]},
            "updated_at": int(NOW)}
    result = run(notification(topic, item))
    assert isinstance(result, Accepted)
    assert (result.event.type, result.event.account_id) == (kind, "acme")
    assert result.event.data.ticket_id == "intercom:ticket:77"


def test_bad_shapes_are_values_not_crashes() -> None:
    assert isinstance(run(notification("conversation.user.created", {"company": {"id": "a"}})),
                      Rejected)  # no id
    unattributed = run(notification("conversation.user.created", {"id": "1"}))
    assert unattributed == Skipped("unattributed")
    assert isinstance(run({"type": "notification_event", "topic": "conversation.user.created",
                           "data": "nope"}), Skipped)


def test_pinning_accepts_a_list_of_sources() -> None:
    note = notification("conversation.user.created", conversation(company={"id": "acme"}))
    zen = {"type": "zen:event-type:ticket.created", "id": "z1", "time": "2026-12-06T04:00:00Z",
           "subject": "zen:ticket:5", "detail": {"id": "5", "organization_id": "9",
                                                 "requester_id": "3", "status": "OPEN"}}
    both = ("zendesk", "intercom")
    assert isinstance(run(note, both), Accepted)
    zen_result = decode(orjson.dumps(zen), DecodeOptions(max_age_s=float("inf")), NOW, both)
    assert isinstance(zen_result, Accepted)
    stripe_like = {"object": "event", "id": "evt_1", "type": "invoice.paid", "created": int(NOW),
                   "data": {"object": {"object": "invoice", "customer": "cus_1"}}}
    mismatch = run(stripe_like, both)
    assert isinstance(mismatch, Rejected) and mismatch.reason == "source_mismatch"
    assert "zendesk or intercom" in mismatch.detail
    assert isinstance(run(note, "zendesk"), Rejected)


def test_settings_pin_a_topic_to_several_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    from churnsignal.app.settings import load_settings

    monkeypatch.setenv("CHURNSIGNAL_INGEST__SOURCES",
                       '{"support.events": ["zendesk", "intercom"], "billing.events": "stripe"}')
    settings = load_settings()
    assert settings.ingest.sources == {"support.events": ("zendesk", "intercom"),
                                       "billing.events": "stripe"}
    note = notification("conversation.user.created", conversation(company={"id": "acme"}))
    assert isinstance(run(note, settings.ingest.sources["support.events"]), Accepted)
