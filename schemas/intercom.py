"""Intercom webhook notifications -> canonical support events (pure).

Intercom posts one ``notification_event`` per change: ``{"type": "notification_event",
"app_id", "id": "notif_...", "topic": "conversation.user.created", "created_at": <unix s>,
"data": {"type": "notification_event_data", "item": {...}}}``, where ``item`` is the object
the topic names (a conversation, a ticket, a contact, a company, ...). What is read:

- **conversations** (``conversation.*``): a conversation is a support thread, like a Zendesk
  ticket: ``conversation.user.created`` / ``conversation.admin.single.created`` open it,
  ``conversation.admin.closed`` solves it, ``conversation.admin.opened`` reopens it, every
  other conversation topic (replies, notes, assignment, snoozing) is an update;
  ``conversation.rating.added`` is a satisfaction rating (Intercom's 1-5 stars: 4-5 good,
  1-2 bad, 3 not counted: ``intercom_unrated``);
- **tickets** (``ticket.*``): ``ticket.created`` opens, a ``ticket_state`` of ``resolved``
  (or a topic ending in ``closed``/``resolved``) solves, the rest update;
- **contact and company links**: a contact (``contact.*``, ``user.*``) that lists its
  companies, or a ``company.contact.attached`` item naming both, teaches which company the
  contact belongs to (skipped as ``intercom_unused``, like every other topic).

The account is the company: its ``company_id`` (the id *you* gave the company in Intercom, the
one your other sources name) where the payload carries it, else Intercom's own ``id``. A
conversation or ticket that names no company waits under its first contact
(``~intercom:contact:<id>``) until a contact or company payload links that contact.
"""

from __future__ import annotations

from typing import Any

from churnsignal.schemas import identity
from churnsignal.schemas._util import dict_at, epoch_to_iso, get_in, integer, str_id, text

NOTIFICATION = "notification_event"
_OPENED = frozenset({"conversation.user.created", "conversation.admin.single.created",
                     "ticket.created"})
_SOLVED_TICKET_STATES = frozenset({"resolved", "closed"})
_CONTACT_TOPIC_PREFIXES = ("contact.", "user.", "company.contact.")


def looks_like_intercom(payload: dict[str, Any]) -> bool:
    return payload.get("type") == NOTIFICATION and isinstance(payload.get("topic"), str)


def contact_key(contact: str) -> str:
    """An Intercom contact (user or lead): waits for the company it belongs to. No fallback:
    a person is not an account."""
    return identity.key("intercom:contact", contact)


def _company(value: Any) -> str | None:
    """The account a company object names: its company_id (yours), else Intercom's id."""
    if not isinstance(value, dict):
        return None
    return str_id(value.get("company_id")) or str_id(value.get("id"))


def _companies(contact: Any) -> list[Any]:
    """A contact's companies, in the shapes Intercom prints them: API 2.x
    ``{"type": "list", "data": [...]}``, 1.x ``{"type": "company.list", "companies": [...]}``,
    or a plain list."""
    found = get_in(contact, "companies")
    if isinstance(found, dict):
        found = found.get("data", found.get("companies"))
    return found if isinstance(found, list) else []


def _first_contact(item: dict[str, Any]) -> dict[str, Any] | None:
    """The conversation's or ticket's customer: contacts.contacts[0] (2.x), else ``user``
    (1.x), else the source's author when it is a user, lead or contact."""
    contacts = get_in(item, "contacts", "contacts")
    if isinstance(contacts, list):
        for contact in contacts:
            if isinstance(contact, dict) and str_id(contact.get("id")) is not None:
                return contact
    user = item.get("user")
    if isinstance(user, dict) and str_id(user.get("id")) is not None:
        return user
    author = get_in(item, "source", "author")
    if isinstance(author, dict) and author.get("type") in ("user", "lead", "contact"):
        return author if str_id(author.get("id")) is not None else None
    return None


def _account(item: dict[str, Any]) -> tuple[str | None, str | None]:
    """(account or identity key, the contact's id) of a conversation or ticket."""
    company = _company(item.get("company")) or str_id(item.get("company_id"))
    contact = _first_contact(item)
    contact_id = str_id(contact.get("id")) if contact is not None else None
    if company is None and contact is not None:
        listed = _companies(contact)
        company = _company(listed[0]) if listed else None
    if company is not None:
        return company, contact_id
    return (contact_key(contact_id) if contact_id is not None else None), contact_id


def links(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(intercom contact key, company) pairs: a contact listing its companies, a
    company.contact.attached item, or a conversation or ticket naming both."""
    topic = payload.get("topic")
    item = dict_at(payload, "data", "item")
    if not isinstance(topic, str) or not item:
        return []
    pairs: list[tuple[str, str]] = []
    if isinstance(item.get("contact"), dict) and isinstance(item.get("company"), dict):
        contact_id, company = str_id(item["contact"].get("id")), _company(item["company"])
        if contact_id is not None and company is not None:
            pairs.append((contact_key(contact_id), company))
    elif topic.startswith(_CONTACT_TOPIC_PREFIXES) and item.get("type") in ("contact", "user",
                                                                            "lead"):
        contact_id = str_id(item.get("id"))
        listed = _companies(item)
        company = _company(listed[0]) if listed else None
        if contact_id is not None and company is not None:
            pairs.append((contact_key(contact_id), company))
    elif topic.startswith(("conversation.", "ticket.")):
        account, contact_id = _account(item)
        if account is not None and contact_id is not None and not identity.is_identity(account):
            pairs.append((contact_key(contact_id), account))
    return pairs


def _csat(rating: Any) -> str | None:
    stars = integer(rating, 1, 5)
    if stars is None or stars == 3:
        return None
    return "good" if stars >= 4 else "bad"


def to_canonical(payload: dict[str, Any]) -> dict[str, Any] | str:
    """A canonical support event dict, or a skip reason for topics that carry no support
    activity. Raises ValueError for a conversation or ticket without an id."""
    topic: str = payload["topic"]
    item = dict_at(payload, "data", "item")
    is_ticket = topic.startswith("ticket.")
    if not (topic.startswith("conversation.") or is_ticket) or topic == "conversation.deleted":
        return "intercom_unused"
    if topic.startswith("ticket.") and item.get("type") not in (None, "ticket"):
        return "intercom_unused"  # e.g. ticket attribute topics
    account, contact_id = _account(item)
    if account is None:
        return "unattributed"
    item_id = str_id(item.get("id"))
    if item_id is None:
        raise ValueError(f"{topic} item has no id")
    ticket_id = f"intercom:{'ticket' if is_ticket else 'conversation'}:{item_id}"[:200]
    data: dict[str, Any]
    if topic == "conversation.rating.added":
        csat = _csat(get_in(item, "conversation_rating", "rating"))
        if csat is None:
            return "intercom_unrated"
        kind, data = "satisfaction_rating", {"csat": csat}
    else:
        state = text(item.get("ticket_state") if is_ticket else item.get("state"), 40)
        state = state.lower() if state else None
        if topic in _OPENED:
            kind = "ticket_opened"
        elif topic == "conversation.admin.closed" or topic.endswith((".closed", ".resolved")) or (
                is_ticket and state in _SOLVED_TICKET_STATES):
            kind = "ticket_solved"
        elif topic == "conversation.admin.opened":
            kind = "ticket_reopened"
        else:
            kind = "ticket_updated"
        priority = item.get("priority")
        data = {
            "ticket_id": ticket_id,
            "status": state,
            "priority": "high" if priority == "priority" else None,
            "channel": text(get_in(item, "source", "type"), 40),
        }
    occurred = epoch_to_iso(payload.get("created_at")) or epoch_to_iso(item.get("updated_at"))
    notification = str_id(payload.get("id"))
    return {
        # Intercom redelivers a notification with the same id; without one, the item, its
        # update time and the topic stand for the change.
        "event_id": notification or f"intercom:{topic}:{item_id}:{text(item.get('updated_at'))}",
        "account_id": account,
        "user_id": contact_id,
        "type": kind,
        "occurred_at": occurred,
        "data": data,
    }
