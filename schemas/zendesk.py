"""Zendesk (event webhooks and ticket objects) -> canonical support events (pure).

Event webhooks look alike whatever their domain: ``{"type": "zen:event-type:<domain>.<action>",
"id", "time", "subject": "zen:<domain>:<id>", "detail": {...}, "event": {...}}``, with the
ids in ``detail`` returned as strings. Every ``zen:event-type:*`` is recognised as Zendesk's:
ticket events are scored, the other domains (user, organization, article, community_post,
agent, messaging, ...) are skipped as ``zendesk_unused``, and user events still teach which
organization a user belongs to. User events print ``"organization_id": "0"`` for a user
without one, so "0" means none.

A ticket names its account by ``organization_id``; a ticket without one but with a requester
is routed to the requester's identity key (``identity.zendesk_user``) and waits there, like an
unattributed Stripe customer, until a payload links that user to an organization.
"""

from __future__ import annotations

from typing import Any

from churnsignal.schemas import identity
from churnsignal.schemas._util import dict_at, get_in, str_id, text

EVENT_PREFIX = "zen:event-type:"
_TICKET_PREFIX = EVENT_PREFIX + "ticket."
_USER_PREFIX = EVENT_PREFIX + "user."
_SOLVED = ("solved", "closed")
_PRIORITIES = ("low", "normal", "high", "urgent")
# Ticket events that are not the customer's support activity: the ticket left the queue
# (spam, deleted, merged into another) or the system asked for a survey. Scoring them as
# updates would put a closed ticket back among the open ones.
_UNUSED_TICKET_ACTIONS = frozenset({"marked_as_spam", "merged", "soft_deleted",
                                    "permanently_deleted", "csat_requested"})


def looks_like_zendesk(payload: dict[str, Any]) -> bool:
    kind = payload.get("type")
    return (isinstance(kind, str) and kind.startswith(EVENT_PREFIX)) or isinstance(
        payload.get("ticket"), dict
    )


def _organization(value: Any) -> str | None:
    org = str_id(value)
    return None if org in (None, "0") else org


def _subject_id(subject: Any, domain: str) -> str | None:
    """The id in an event's ``subject`` ("zen:ticket:35436"), for a detail without one."""
    prefix = f"zen:{domain}:"
    if isinstance(subject, str) and subject.startswith(prefix) and len(subject) > len(prefix):
        return subject[len(prefix):]
    return None


def _csat(score: Any) -> str | None:
    """"good" / "bad" from a rating score in either case (event webhooks upper-case enums);
    None for "offered", "unoffered" or anything else: not a rating."""
    value = text(score, 20)
    value = value.lower() if value else None
    return value if value in ("good", "bad") else None


def _account(organization: Any, requester: Any) -> str | None:
    org = _organization(organization)
    if org is not None:
        return org
    user = str_id(requester)
    return identity.zendesk_user(user) if user is not None else None


def _ticket_fields(ticket: dict[str, Any], ticket_id: str | None) -> dict[str, Any]:
    priority = (text(ticket.get("priority"), 20) or "").lower()  # event webhooks send "HIGH"
    status = text(ticket.get("status"), 40)
    return {
        "ticket_id": ticket_id,
        "status": status.lower() if status else None,
        "priority": priority if priority in _PRIORITIES else None,
        "channel": text(str_id(get_in(ticket, "via", "channel")) or str_id(ticket.get("via"))),
    }


def links(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(zendesk user key, organization) from a payload that names both: a user event (the
    user and their organization), a ticket event or ticket object (requester and organization)."""
    if isinstance(payload.get("ticket"), dict):
        ticket: dict[str, Any] = payload["ticket"]
        user, org = str_id(ticket.get("requester_id")), _organization(ticket.get("organization_id"))
    else:
        kind = payload.get("type")
        detail = dict_at(payload, "detail")
        if not isinstance(kind, str):
            return []
        if kind.startswith(_USER_PREFIX):
            user = str_id(detail.get("id")) or _subject_id(payload.get("subject"), "user")
        elif kind.startswith(_TICKET_PREFIX):
            user = str_id(detail.get("requester_id"))
        else:
            return []
        org = _organization(detail.get("organization_id"))
    if user is None or org is None:
        return []
    return [(identity.zendesk_user(user), org)]


def _from_event_webhook(payload: dict[str, Any]) -> dict[str, Any] | str:
    """Zendesk event webhooks: {type: zen:event-type:ticket.X, detail: ticket, event: change}."""
    kind_name: str = payload["type"]
    if not kind_name.startswith(_TICKET_PREFIX):
        return "zendesk_unused"
    action = kind_name.removeprefix(_TICKET_PREFIX)
    if action in _UNUSED_TICKET_ACTIONS:
        return "zendesk_unused"
    detail = dict_at(payload, "detail")
    change = dict_at(payload, "event")
    account = _account(detail.get("organization_id"), detail.get("requester_id"))
    if account is None:
        return "unattributed"
    ticket_id = str_id(detail.get("id")) or _subject_id(payload.get("subject"), "ticket")
    data: dict[str, Any]
    if action == "csat_received":
        # The rating is in event.satisfaction_score.score; the ticket detail is unchanged.
        csat = _csat(get_in(change, "satisfaction_score", "score"))
        if csat is None:
            return "zendesk_unrated"
        kind, data = "satisfaction_rating", {"csat": csat}
    else:
        data = _ticket_fields(detail, ticket_id)
        if action == "created":
            kind = "ticket_opened"
        elif action == "status_changed":
            current = text(change.get("current"), 40)
            previous = text(change.get("previous"), 40)
            if current and current.lower() in _SOLVED:
                kind = "ticket_solved"
            elif previous and previous.lower() in _SOLVED:
                kind = "ticket_reopened"
            else:
                kind = "ticket_updated"
            data["status"] = current.lower() if current else data["status"]
        else:
            kind = "ticket_updated"
    return {
        "event_id": str_id(payload.get("id")),
        "account_id": account,
        "user_id": str_id(detail.get("requester_id")),
        "type": kind,
        "occurred_at": payload.get("time") or detail.get("updated_at"),
        "data": data,
    }


def _from_ticket_object(payload: dict[str, Any]) -> dict[str, Any] | str:
    """A ticket object as the API and trigger webhooks send it: {ticket: {...}}."""
    ticket: dict[str, Any] = payload["ticket"]
    account = _account(ticket.get("organization_id"), ticket.get("requester_id"))
    if account is None:
        return "unattributed"
    ticket_id = str_id(ticket.get("id"))
    if ticket_id is None:
        raise ValueError("ticket has no id")
    csat = _csat(get_in(ticket, "satisfaction_rating", "score"))
    status = (text(ticket.get("status"), 40) or "").lower()
    created = text(ticket.get("created_at"), 60)
    updated = ticket.get("updated_at") or ticket.get("created_at")
    data: dict[str, Any]
    if csat is not None:
        kind, data = "satisfaction_rating", {"csat": csat}
    else:
        data = _ticket_fields(ticket, ticket_id)
        if status in _SOLVED:
            kind = "ticket_solved"
        elif created and created == text(ticket.get("updated_at"), 60):
            kind = "ticket_opened"
        else:
            kind = "ticket_updated"
    return {
        # A ticket object has no event id: the ticket, its update time and what it says.
        "event_id": f"zendesk:{ticket_id}:{text(updated, 60)}:{kind}",
        "account_id": account,
        "user_id": str_id(ticket.get("requester_id")),
        "type": kind,
        "occurred_at": updated,
        "data": data,
    }


def to_canonical(payload: dict[str, Any]) -> dict[str, Any] | str:
    if isinstance(payload.get("ticket"), dict):
        return _from_ticket_object(payload)
    return _from_event_webhook(payload)
