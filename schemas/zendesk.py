"""Zendesk tickets (event webhooks and ticket objects) -> canonical support events (pure)."""

from __future__ import annotations

from typing import Any

from churnsignal.schemas._util import get_in, str_id

_SOLVED = ("solved", "closed")
_PRIORITIES = ("low", "normal", "high", "urgent")


def looks_like_zendesk(payload: dict[str, Any]) -> bool:
    kind = payload.get("type")
    return (isinstance(kind, str) and kind.startswith("zen:event-type:ticket")) or isinstance(
        payload.get("ticket"), dict
    )


def _ticket_fields(ticket: dict[str, Any]) -> dict[str, Any]:
    priority = str(ticket.get("priority") or "").lower()  # event webhooks send "HIGH"
    return {
        "ticket_id": str_id(ticket.get("id")),
        "status": str(ticket.get("status")).lower()[:40] if ticket.get("status") else None,
        "priority": priority if priority in _PRIORITIES else None,
        "channel": str_id(get_in(ticket, "via", "channel")) or str_id(ticket.get("via")),
    }


def _from_event_webhook(payload: dict[str, Any]) -> dict[str, Any] | str:
    """Zendesk event-driven webhooks: {type: zen:event-type:ticket.X, detail: ticket, event: ...}."""
    action = payload["type"].removeprefix("zen:event-type:ticket.")
    detail = payload.get("detail") if isinstance(payload.get("detail"), dict) else {}
    change = payload.get("event") if isinstance(payload.get("event"), dict) else {}
    account = str_id(detail.get("organization_id"))
    if account is None:
        return "unattributed"
    data = _ticket_fields(detail)
    if action == "created":
        kind = "ticket_opened"
    elif action == "status_changed":
        current, previous = change.get("current"), change.get("previous")
        if str(current).lower() in _SOLVED:
            kind = "ticket_solved"
        elif str(previous).lower() in _SOLVED:
            kind = "ticket_reopened"
        else:
            kind = "ticket_updated"
        data["status"] = str(current)[:40] if current else data["status"]
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
    account = str_id(ticket.get("organization_id"))
    if account is None:
        return "unattributed"
    rating = get_in(ticket, "satisfaction_rating", "score")
    status = str(ticket.get("status") or "").lower()
    updated = ticket.get("updated_at") or ticket.get("created_at")
    data: dict[str, Any]
    if rating in ("good", "bad"):
        kind, data = "satisfaction_rating", {"csat": rating}
    else:
        data = _ticket_fields(ticket)
        if status in _SOLVED:
            kind = "ticket_solved"
        elif ticket.get("created_at") and ticket.get("created_at") == ticket.get("updated_at"):
            kind = "ticket_opened"
        else:
            kind = "ticket_updated"
    return {
        "event_id": f"zendesk:{str_id(ticket.get('id'))}:{updated}:{kind}",
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
