"""Hypothesis strategies for the payloads producers really send, and one-leaf mutants of them.

Valid payloads follow the shapes the providers' own documentation prints:
- billing: Stripe webhook Event objects of every type in ``stripe.TYPE_MAP`` (subscription,
  invoice, charge, dispute, card and payment_method objects with their usual fields, both the
  ``price`` and the legacy ``plan`` item shapes), plus a few types churnsignal does not use;
- usage: Segment track / page / screen / identify / group / alias calls (with or without
  ``messageId``, ``timestamp``, ``properties``; ``context.groupId`` or ``context.traits``; HTTP
  API track bodies without ``type``; numeric user ids), plus canonical events;
- support: Zendesk event webhooks (``zen:event-type:ticket.*`` and user, organization and
  other domains) and ticket objects (``{"ticket": {...}}``).

Every strategy yields what Kafka carries: bytes.

- ``payload_bytes(topic, now)``: valid payloads of a source topic ("usage", "billing",
  "support", or the topic names "usage.events", ...), timestamped within the 80 days before
  ``now`` (inside the default 90-day horizon), so decode accepts or skips them, never rejects.
- ``mutants(topic, now)``: the same payloads with ONE node changed: a hostile value (numbers at
  and beyond the platform's limits, type swaps, 100 KB / NUL / RTL / emoji strings, deep
  nesting), a raw JSON literal no Python value serialises to (1e400, 2**64, lone surrogates,
  NaN, nesting beyond 1024), a deleted key, or the key written twice in the raw bytes.
- ``mutate(payload)``: the mutants of one given payload.
- ``sample(strategy, n, seed)``: ``n`` examples as a list, outside ``@given`` (for an
  integration test that sends them to a running worker).
"""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from churnsignal.schemas.stripe import TYPE_MAP

Json = Any
Draw = st.DrawFn

DAY = 86_400
HISTORY_S = 80 * DAY  # inside the default 90-day horizon: valid payloads are never too old
TOPICS = ("usage", "billing", "support")

# --- small pieces --------------------------------------------------------------------------

_ALNUM = string.ascii_letters + string.digits


def _token(prefix: str, size: int = 14) -> st.SearchStrategy[str]:
    return st.text(_ALNUM, min_size=size, max_size=size).map(lambda s: prefix + s)


accounts = st.one_of(
    st.text(_ALNUM + "-_.", min_size=1, max_size=40),
    st.sampled_from(["acme", "globex", "initech", "acct-00042", "Société Générale", "株式会社",
                     "0e8c78ea9d97a7b8185e8632", "12345"]),
)


def _epoch(now: float) -> st.SearchStrategy[int]:
    return st.integers(int(now - HISTORY_S), int(now) - 1)


def _iso(ts: float, style: int) -> str:
    """The ISO-8601 forms the providers print: Z, milliseconds, an explicit offset."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    if style == 0:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == 1:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.isoformat()


def _iso_time(now: float) -> st.SearchStrategy[str]:
    return st.builds(_iso, _epoch(now), st.integers(0, 2))


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def _put(draw: Draw, obj: dict[str, Json], key: str, strategy: st.SearchStrategy[Any]) -> None:
    """Set ``key`` or leave it out: optional fields are sometimes absent."""
    if draw(st.booleans()):
        obj[key] = draw(strategy)


# --- Stripe (https://docs.stripe.com/api/events/object and the objects it carries) ---------

_UNUSED_STRIPE = ("customer.created", "customer.updated", "invoice.finalized",
                  "checkout.session.completed", "price.updated", "payment_intent.succeeded")
_STATUSES = ("trialing", "active", "past_due", "unpaid", "paused", "canceled", "incomplete",
             "incomplete_expired")


@st.composite
def _stripe_item(draw: Draw, now: float) -> dict[str, Json]:
    interval = draw(st.sampled_from(["day", "week", "month", "year"]))
    count = draw(st.sampled_from([1, 1, 1, 3, 6]))
    amount = draw(st.one_of(st.integers(0, 500_000), st.none()))  # None: tiered prices
    item: dict[str, Json] = {"id": draw(_token("si_")), "object": "subscription_item",
                             "created": draw(_epoch(now)), "metadata": {}}
    if draw(st.booleans()):
        item["price"] = {
            "id": draw(_token("price_")), "object": "price", "active": True, "currency": "usd",
            "lookup_key": draw(_maybe(st.sampled_from(["pro_monthly", "team_yearly"]))),
            "nickname": draw(_maybe(st.sampled_from(["Pro", "Team"]))),
            "product": draw(_token("prod_")), "type": "recurring", "unit_amount": amount,
            "unit_amount_decimal": None if amount is None else str(amount),
            "recurring": {"interval": interval, "interval_count": count,
                          "usage_type": draw(st.sampled_from(["licensed", "metered"]))},
        }
    else:  # the legacy plan object, still on older API versions
        item["plan"] = {"id": draw(_token("plan_")), "object": "plan", "amount": amount,
                        "currency": "usd", "interval": interval, "interval_count": count}
    _put(draw, item, "quantity", st.integers(0, 500))
    _put(draw, item, "current_period_end", _epoch(now).map(lambda t: t + 30 * DAY))
    return item


def _metadata(draw: Draw, account: str | None) -> dict[str, Json]:
    meta: dict[str, Json] = {"plan_tier": "pro"} if draw(st.booleans()) else {}
    if account is not None:
        meta["account_id"] = account
    return meta


@st.composite
def _stripe_subscription(draw: Draw, now: float, account: str | None,
                         customer: str) -> dict[str, Json]:
    start = draw(_epoch(now))
    items = draw(st.lists(_stripe_item(now), min_size=0, max_size=3))
    sub: dict[str, Json] = {
        "id": draw(_token("sub_")), "object": "subscription", "application": None,
        "billing_cycle_anchor": start, "cancel_at": draw(_maybe(_epoch(now))),
        "cancel_at_period_end": draw(st.booleans()), "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": draw(_maybe(
            st.sampled_from(["cancellation_requested", "payment_failed", "payment_disputed"])))},
        "collection_method": "charge_automatically", "created": start, "currency": "usd",
        "customer": customer, "livemode": False, "metadata": _metadata(draw, account),
        "items": {"object": "list", "data": items, "has_more": False,
                  "url": "/v1/subscription_items"},
        "pause_collection": draw(_maybe(st.fixed_dictionaries({
            "behavior": st.sampled_from(["void", "keep_as_draft", "mark_uncollectible"]),
            "resumes_at": _maybe(_epoch(now).map(lambda t: t + 20 * DAY))}))),
        "status": draw(st.sampled_from(_STATUSES)),
        "trial_end": draw(_maybe(_epoch(now))), "trial_start": None,
    }
    _put(draw, sub, "current_period_start", st.just(start))
    _put(draw, sub, "current_period_end", st.just(start + 30 * DAY))
    _put(draw, sub, "discount", st.fixed_dictionaries({"coupon": st.fixed_dictionaries({
        "id": _token("co_"), "object": st.just("coupon"), "percent_off": _maybe(st.integers(1, 100))})}))
    return sub


@st.composite
def _stripe_invoice(draw: Draw, now: float, account: str | None, customer: str) -> dict[str, Json]:
    due = draw(st.integers(0, 1_000_000))
    subscription = draw(_token("sub_"))
    invoice: dict[str, Json] = {
        "id": draw(_token("in_")), "object": "invoice", "account_country": "US",
        "amount_due": due, "amount_paid": 0, "amount_remaining": due,
        "attempt_count": draw(st.integers(0, 8)), "attempted": True,
        "billing_reason": "subscription_cycle", "charge": draw(_maybe(_token("ch_"))),
        "collection_method": "charge_automatically", "created": draw(_epoch(now)),
        "currency": "usd", "customer": customer, "customer_email": "jenny@example.com",
        "livemode": False, "metadata": {},
        "next_payment_attempt": draw(_maybe(_epoch(now).map(lambda t: t + 3 * DAY))),
        "paid": False, "status": "open", "subscription": subscription, "total": due,
    }
    where = draw(st.sampled_from(["details", "parent", "none"]))
    if where == "details":
        invoice["subscription_details"] = {"metadata": _metadata(draw, account)}
    elif where == "parent":  # newer API versions moved it under parent
        invoice["parent"] = {"type": "subscription_details", "subscription_details": {
            "metadata": _metadata(draw, account), "subscription": subscription}}
    return invoice


@st.composite
def _stripe_charge(draw: Draw, now: float, customer: str | None) -> dict[str, Json]:
    return {
        "id": draw(_token("ch_")), "object": "charge", "amount": draw(st.integers(50, 10**6)),
        "amount_captured": 0, "amount_refunded": 0, "captured": False,
        "created": draw(_epoch(now)), "currency": "usd", "customer": customer,
        "failure_code": "card_declined", "failure_message": "Your card was declined.",
        "invoice": draw(_maybe(_token("in_"))), "livemode": False, "metadata": {},
        "outcome": {"network_status": "declined_by_network", "reason": "generic_decline",
                    "risk_level": "normal", "type": "issuer_declined"},
        "paid": False, "payment_intent": draw(_token("pi_")),
        "payment_method": draw(_token("pm_")), "status": "failed",
    }


@st.composite
def _stripe_dispute(draw: Draw, now: float) -> dict[str, Json]:
    return {
        "id": draw(_token("dp_")), "object": "dispute", "amount": draw(st.integers(50, 10**6)),
        "charge": draw(_token("ch_")), "created": draw(_epoch(now)), "currency": "usd",
        "evidence_details": {"due_by": draw(_epoch(now)), "has_evidence": False,
                             "past_due": False, "submission_count": 0},
        "is_charge_refundable": False, "livemode": False, "metadata": {},
        "payment_intent": draw(_token("pi_")), "reason": "fraudulent",
        "status": "needs_response",
    }


def _card(draw: Draw) -> dict[str, Json]:
    return {"brand": "visa", "country": "US", "exp_month": draw(st.integers(1, 12)),
            "exp_year": draw(st.integers(2024, 2035)), "funding": "credit", "last4": "4242"}


@st.composite
def stripe_events(draw: Draw, now: float) -> dict[str, Json]:
    """A Stripe webhook Event of any type churnsignal reads, or of one it skips."""
    used = draw(st.integers(0, 9)) < 8  # Hypothesis leans to small draws: common ones first
    kind = draw(st.sampled_from(sorted(TYPE_MAP) if used else _UNUSED_STRIPE))
    account = draw(_maybe(accounts))
    customer = draw(_token("cus_"))
    data: dict[str, Json]
    if kind.startswith("customer.subscription."):
        obj = draw(_stripe_subscription(now, account, customer))
        data = {"object": obj}
        if kind == "customer.subscription.updated" and draw(st.booleans()):
            data["previous_attributes"] = draw(st.sampled_from([
                {"cancel_at_period_end": False}, {"status": "trialing"},
                {"items": {"object": "list", "data": draw(st.lists(_stripe_item(now),
                                                                   max_size=2))}}]))
    elif kind.startswith("invoice."):
        data = {"object": draw(_stripe_invoice(now, account, customer))}
    elif kind == "charge.failed":
        data = {"object": draw(_stripe_charge(now, draw(_maybe(st.just(customer)))))}
    elif kind == "charge.dispute.created":
        data = {"object": draw(_stripe_dispute(now))}
    elif kind == "customer.source.expiring":
        data = {"object": {"id": draw(_token("card_")), "object": "card", "customer": customer,
                           "metadata": _metadata(draw, account), **_card(draw)}}
    elif kind == "payment_method.automatically_updated":
        data = {"object": {"id": draw(_token("pm_")), "object": "payment_method",
                           "billing_details": {"email": None, "name": "Jenny Rosen"},
                           "card": _card(draw), "created": draw(_epoch(now)),
                           "customer": customer, "livemode": False,
                           "metadata": _metadata(draw, account), "type": "card"}}
    else:
        data = {"object": {"id": customer, "object": "customer", "email": "jenny@example.com",
                           "metadata": _metadata(draw, account)}}
    return {
        "id": draw(_token("evt_", 24)), "object": "event",
        "api_version": draw(st.sampled_from(["2020-08-27", "2024-06-20", "2025-03-31.basil"])),
        "created": draw(_epoch(now)), "data": data, "livemode": False,
        "pending_webhooks": draw(st.integers(0, 3)),
        "request": {"id": draw(_maybe(_token("req_"))), "idempotency_key": None},
        "type": kind,
    }


# --- Segment (https://segment.com/docs/connections/spec/) ----------------------------------

_TRACK_NAMES = ("Logged In", "Signed In", "Report Exported", "Integration Connected",
                "Dashboard Viewed", "Order Completed", "Registered", "Course Clicked")


@st.composite
def segment_calls(draw: Draw, now: float) -> dict[str, Json]:
    """A Segment track, page, screen, identify, group or alias call."""
    roll = draw(st.integers(0, 9))
    call = "track" if roll < 6 else draw(st.sampled_from(
        ["page", "screen"] if roll < 8 else ["identify", "group", "alias"]))
    ts = draw(_epoch(now))
    msg: dict[str, Json] = {"type": call}
    user = draw(st.one_of(_token("u", 8), st.integers(1, 10**9)))  # "String or Number"
    who = draw(st.sampled_from(["user", "anonymous", "both"]))
    if who in ("user", "both"):
        msg["userId"] = user
    if who in ("anonymous", "both"):
        msg["anonymousId"] = draw(st.uuids().map(str))
    _put(draw, msg, "messageId", st.one_of(st.uuids().map(str), _token("ajs-", 32)))
    # At least one timestamp: Segment's timestamp, else the client's, else the server's.
    stamps = draw(st.sets(st.sampled_from(["timestamp", "originalTimestamp", "receivedAt"]),
                          min_size=1))
    style = draw(st.integers(0, 2))
    for field in stamps:
        msg[field] = _iso(ts, style)
    _put(draw, msg, "sentAt", st.just(_iso(ts + 1, 1)))
    context: dict[str, Json] = {"library": {"name": draw(st.sampled_from(
        ["analytics.js", "analytics-python", "analytics-java", "analytics-ios"])),
        "version": "2.11.1"}, "ip": "8.8.8.8", "locale": "en-US"}
    _put(draw, context, "groupId", accounts)
    _put(draw, context, "traits", st.one_of(
        st.fixed_dictionaries({"email": st.just("peter@example.com"), "groupId": accounts}),
        st.fixed_dictionaries({"company": st.fixed_dictionaries({
            "id": st.one_of(accounts, st.integers(1, 10**6)), "name": st.just("Initech")})}),
        st.fixed_dictionaries({"name": st.just("Peter Gibbons"), "plan": st.just("premium")})))
    _put(draw, context, "page", st.just({"path": "/academy/", "referrer": "", "search": "",
                                         "title": "Analytics Academy",
                                         "url": "https://segment.com/academy/"}))
    msg["context"] = context
    _put(draw, msg, "integrations", st.just({"All": True, "Mixpanel": False}))
    _put(draw, msg, "version", st.sampled_from([2, "1.1"]))
    _put(draw, msg, "channel", st.sampled_from(["server", "browser", "client"]))
    if call == "track":
        msg["event"] = draw(st.sampled_from(_TRACK_NAMES))
        _put(draw, msg, "properties", st.fixed_dictionaries({}, optional={
            "feature": st.sampled_from(["api", "reports", "sso"]), "revenue": st.just(19.99),
            "account_id": accounts, "plan": st.just("Pro Annual")}))
        if draw(st.integers(0, 4)) == 4:  # a body for the HTTP API's /v1/track: no type
            del msg["type"]
    elif call in ("page", "screen"):
        _put(draw, msg, "name", st.sampled_from(["Home", "Settings", "Billing"]))
        _put(draw, msg, "category", st.just("Docs"))
        _put(draw, msg, "properties", st.fixed_dictionaries({}, optional={
            "path": st.just("/academy/"), "title": st.just("Welcome | Initech"),
            "url": st.just("http://www.example.com")}))
    elif call == "identify":
        msg["traits"] = draw(st.fixed_dictionaries({"email": st.just("peter@example.com")},
                                                   optional={"groupId": accounts,
                                                             "account_id": accounts,
                                                             "company": st.fixed_dictionaries(
                                                                 {"id": accounts})}))
    elif call == "group":
        msg["groupId"] = draw(accounts)
        msg["traits"] = {"name": "Initech", "industry": "Technology", "employees": 329}
    else:
        msg["previousId"] = draw(_token("anon", 8))
    return msg


@st.composite
def canonical_events(draw: Draw, now: float) -> dict[str, Json]:
    """The canonical envelope (schemas/json/event.schema.json), usage family."""
    event: dict[str, Json] = {
        "event_id": draw(_token("e-", 16)), "account_id": draw(accounts),
        "type": draw(st.sampled_from(["session", "feature_used", "seat_activity", "activation",
                                      "export", "integration", "track"])),
        "occurred_at": draw(_iso_time(now)),
        "data": draw(st.fixed_dictionaries({}, optional={
            "name": st.sampled_from(["Logged In", "Report Exported"]),
            "feature": st.sampled_from(["api", "reports"]), "count": st.integers(1, 100)})),
    }
    _put(draw, event, "user_id", _token("u", 8))
    return event


# --- Zendesk (https://developer.zendesk.com/api-reference/webhooks/event-types/) -----------

_TICKET_ACTIONS = ("created", "status_changed", "priority_changed", "comment_added",
                   "tags_changed", "agent_assignment_changed", "custom_field_changed",
                   "organization_changed", "csat_received", "csat_requested", "marked_as_spam",
                   "soft_deleted", "merged")
_TICKET_STATUSES = ("NEW", "OPEN", "PENDING", "HOLD", "SOLVED", "CLOSED")
_OTHER_EVENTS = ("organization.created", "organization.name_changed", "article.published",
                 "community_post.created", "agent.state_changed",
                 "messaging_ticket.message_added", "omnichannel_config.group_queue_assignment")
_USER_EVENTS = ("user.created", "user.active_changed", "user.organization_membership_created",
                "user.deleted")


def _zendesk_id() -> st.SearchStrategy[str]:
    return st.integers(1, 10**13).map(str)  # "returned as a string"


@st.composite
def _zendesk_ticket_detail(draw: Draw, now: float, ticket_id: str) -> dict[str, Json]:
    created = draw(_iso_time(now))
    detail: dict[str, Json] = {
        "actor_id": draw(_zendesk_id()), "assignee_id": draw(_maybe(_zendesk_id())),
        "brand_id": draw(_zendesk_id()), "created_at": created, "custom_status": "1",
        "description": "The fire is very colorful.", "external_id": draw(_maybe(_token("x"))),
        "form_id": draw(_zendesk_id()), "group_id": draw(_maybe(_zendesk_id())),
        "id": ticket_id, "is_public": True,
        "priority": draw(_maybe(st.sampled_from(["LOW", "NORMAL", "HIGH", "URGENT"]))),
        "status": draw(st.sampled_from(_TICKET_STATUSES)), "subject": "Printer on fire",
        "submitter_id": draw(_zendesk_id()), "tags": ["enterprise"],
        "type": draw(_maybe(st.sampled_from(["QUESTION", "INCIDENT", "PROBLEM", "TASK"]))),
        "updated_at": draw(st.one_of(st.just(created), _iso_time(now))),
        "via": {"channel": draw(st.sampled_from(["web_form", "email", "api", "chat"]))},
    }
    # Organization and requester: both, one, or neither (all real), mostly both.
    if draw(st.integers(0, 4)) < 4:
        detail["organization_id"] = draw(st.one_of(_zendesk_id(), accounts))
    elif draw(st.booleans()):
        detail["organization_id"] = None
    if draw(st.integers(0, 4)) < 4:
        detail["requester_id"] = draw(_zendesk_id())
    return detail


def _ticket_change(draw: Draw, action: str) -> dict[str, Json]:
    statuses = st.sampled_from(_TICKET_STATUSES)
    meta = {"meta": {"sequence": {"id": "CE4A698AF24F35B3208649C6951E000E", "position": 1,
                                  "total": 1}}}
    if action == "status_changed":
        return {**meta, "current": draw(statuses), "previous": draw(statuses)}
    if action == "priority_changed":
        return {**meta, "current": "HIGH", "previous": "LOW"}
    if action == "comment_added":
        return {**meta, "comment": {"id": "101", "body": "Thanks!", "is_public": True,
                                    "author": {"id": "35436", "is_staff": False,
                                               "name": "Jenny"}}}
    if action == "tags_changed":
        return {**meta, "tags": {"added": ["vip"], "removed": []}}
    if action == "csat_received":
        score = draw(st.sampled_from(["good", "bad", "GOOD", "BAD", "offered"]))
        return {**meta, "satisfaction_score": {"score": score,
                                               "comment": draw(_maybe(st.just("Slow.")))}}
    return meta


@st.composite
def zendesk_webhooks(draw: Draw, now: float) -> dict[str, Json]:
    """A Zendesk event webhook: a ticket event, a user event, or another domain's."""
    roll = draw(st.integers(0, 9))
    family = "ticket" if roll < 7 else "user" if roll < 9 else "other"
    payload: dict[str, Json] = {
        "account_id": draw(st.integers(1, 10**8)), "id": draw(st.uuids().map(str)),
        "time": draw(_iso_time(now)), "zendesk_event_version": "2022-11-06",
    }
    if family == "ticket":
        action = draw(st.sampled_from(_TICKET_ACTIONS))
        ticket_id = draw(_zendesk_id())
        payload.update({"type": f"zen:event-type:ticket.{action}",
                        "subject": f"zen:ticket:{ticket_id}",
                        "detail": draw(_zendesk_ticket_detail(now, ticket_id)),
                        "event": _ticket_change(draw, action)})
    elif family == "user":
        user_id = draw(_zendesk_id())
        payload.update({
            "type": f"zen:event-type:{draw(st.sampled_from(_USER_EVENTS))}",
            "subject": f"zen:user:{user_id}",
            "detail": {"created_at": draw(_iso_time(now)), "email": "jenny@example.com",
                       "external_id": "", "default_group_id": "0", "id": user_id,
                       "organization_id": draw(st.one_of(st.just("0"), _zendesk_id())),
                       "role": draw(st.sampled_from(["end-user", "agent", "admin"])),
                       "updated_at": draw(_iso_time(now))},
            "event": draw(st.sampled_from([{}, {"current": False, "previous": True}])),
        })
    else:
        kind = draw(st.sampled_from(_OTHER_EVENTS))
        domain = kind.split(".")[0]
        payload.update({"type": f"zen:event-type:{kind}",
                        "subject": f"zen:{domain}:{draw(_zendesk_id())}",
                        "detail": {"id": draw(_zendesk_id()), "name": "Acme",
                                   "created_at": draw(_iso_time(now))},
                        "event": {}})
    return payload


@st.composite
def zendesk_tickets(draw: Draw, now: float) -> dict[str, Json]:
    """A ticket object as the Tickets API and trigger webhooks send it."""
    created = draw(_iso_time(now))
    ticket: dict[str, Json] = {
        "id": draw(st.integers(1, 10**9)), "url": "https://acme.zendesk.com/api/v2/tickets/4.json",
        "created_at": created, "updated_at": draw(st.one_of(st.just(created), _iso_time(now))),
        "type": draw(_maybe(st.sampled_from(["question", "incident", "problem", "task"]))),
        "subject": "Help, my printer is on fire!", "description": "The fire is very colorful.",
        "priority": draw(_maybe(st.sampled_from(["low", "normal", "high", "urgent"]))),
        "status": draw(st.sampled_from(["new", "open", "pending", "hold", "solved", "closed"])),
        "submitter_id": draw(st.integers(1, 10**9)), "assignee_id": draw(_maybe(
            st.integers(1, 10**9))), "group_id": draw(st.integers(1, 10**9)),
        "tags": ["enterprise", "other_tag"],
        "via": {"channel": draw(st.sampled_from(["web", "email", "api"])),
                "source": {"from": {}, "to": {}, "rel": None}},
    }
    if draw(st.integers(0, 4)) < 4:
        ticket["organization_id"] = draw(st.one_of(st.integers(1, 10**12), accounts))
    elif draw(st.booleans()):
        ticket["organization_id"] = None
    if draw(st.integers(0, 4)) < 4:
        ticket["requester_id"] = draw(st.integers(1, 10**12))
    _put(draw, ticket, "satisfaction_rating", st.fixed_dictionaries({
        "id": st.integers(1, 10**6),
        "score": st.sampled_from(["good", "bad", "offered", "unoffered"]),
        "comment": _maybe(st.just("Great support!"))}))
    return {"ticket": ticket}


# --- per topic -----------------------------------------------------------------------------

def _topic(name: str) -> str:
    kind = name.split(".")[0]
    if kind not in TOPICS:
        raise ValueError(f"topic {name!r}: expected one of {TOPICS} (or their .events topics)")
    return kind


def payloads(topic: str, now: float) -> st.SearchStrategy[dict[str, Json]]:
    """Valid payloads (as dicts) of a source topic: usage, billing or support."""
    kind = _topic(topic)
    if kind == "billing":
        return stripe_events(now)
    if kind == "usage":
        return st.one_of(segment_calls(now), segment_calls(now), canonical_events(now))
    return st.one_of(zendesk_webhooks(now), zendesk_webhooks(now), zendesk_tickets(now))


def payload_bytes(topic: str, now: float) -> st.SearchStrategy[bytes]:
    """Valid payloads of a source topic, as the bytes a producer puts on Kafka."""
    return payloads(topic, now).map(orjson.dumps)


# --- mutation: one node at a time ----------------------------------------------------------

_HUGE = "x" * 100_000  # 100 KB: under the 256 KB limit, so it reaches the adapters
HOSTILE_VALUES: tuple[Json, ...] = (
    # numbers at the platform's limits and beyond (what a Python value can carry)
    0, -1, 1, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53, 2**53 + 1, 2**62, 2**63 - 1, -(2**63),
    2**64 - 1, 1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 0.5, 12.0, 1.5e12,
    253_402_300_800, -62_135_596_801,
    # type swaps
    None, True, False, [], {}, [None], [1, "a", None], {"id": None}, {"": ""}, {"id": {"id": 1}},
    # strings: empty, huge, odd
    "", " ", _HUGE, "\x00", "a\x00b", "\u202egnp.exe", "مرحبا بالعالم", "שלום", "😀" * 50,
    "👨\u200d👩\u200d👧\u200d👦", "\ufeffBOM", "e\u0301", "\n\r\t", "null", "true", "0", "-1",
    "1e400", "NaN", "2025-13-45T99:99:99Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00",
    "2025-11-24T10:00:00", "zen:event-type:", "zen:event-type:ticket.csat_received",
    "customer.subscription.updated", "track", "Track", "'; DROP TABLE events; --",
    "<script>alert(1)</script>", "%s%n%x", "../../etc/passwd", "\\", '"', "~stripe:customer:x",
)

_HOSTILE_ENCODED = [(value, orjson.dumps(value)) for value in HOSTILE_VALUES]

# Raw JSON no Python value serialises to: beyond a double, beyond 64 bits, not JSON at all,
# escaped lone surrogates and NUL, and nesting at and beyond the parser's depth limit (1024).
RAW_LITERALS: tuple[str, ...] = (
    "1e400", "-1e400", "1E+2", "-0", "1.0e-400", "18446744073709551616", "-9223372036854775809",
    "123456789012345678901234567890", "NaN", "Infinity", "-Infinity", '"\\ud800"',
    '"\\udc00x"', '"\\u0000"', '"a\\u0000b"', '"\\ud83d\\ude00"',
    *("[" * d + "1" + "]" * d for d in (100, 254, 1000, 1100)),
    *('{"a":' * d + "1" + "}" * d for d in (100, 254, 1000, 1100)),
)

_PLACEHOLDER = "@@churnsignal-raw-json@@"
Path = tuple[str | int, ...]


def _nodes(value: Json, path: Path = ()) -> list[Path]:
    """Every node under the root (containers and leaves), by path."""
    out: list[Path] = []
    if isinstance(value, dict):
        for key, child in value.items():
            out.append((*path, key))
            out.extend(_nodes(child, (*path, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out.append((*path, index))
            out.extend(_nodes(child, (*path, index)))
    return out


def _copy(value: Json) -> Json:
    return orjson.loads(orjson.dumps(value))


def _parent(root: Json, path: Path) -> Any:
    node = root
    for step in path[:-1]:
        node = node[step]
    return node


def _encodable(value: Json) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:  # e.g. an int beyond 64 bits after * 1000
        return False
    return True


def _swaps(original: Json) -> list[Json]:
    """Type swaps of one value: the same content in another JSON type."""
    return [swap for swap in _raw_swaps(original) if _encodable(swap)]


def _raw_swaps(original: Json) -> list[Json]:
    if isinstance(original, bool):
        return [str(original).lower(), int(original), [original], None, not original]
    if isinstance(original, int | float):
        return [str(original), [original], {"id": original}, original * 1000, -original,
                original + 0.5, original > 0]
    if isinstance(original, str):
        swaps: list[Json] = [[original], {"id": original}, original.upper(), original * 100,
                             original[:1], len(original)]
        if original.lstrip("-").isdigit():
            swaps.append(int(original))
        return swaps
    if isinstance(original, dict):
        return [list(original.values()), [original], {}, str(len(original))]
    if isinstance(original, list):
        return [{str(i): v for i, v in enumerate(original)}, original * 3, [], {}]
    return [0, "", [], {}]


def _nest(depth: int, leaf: Json, as_dict: bool) -> Json:
    value = leaf
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


def _dumps(root: Json, raw: str | None) -> bytes:
    encoded = orjson.dumps(root)
    if raw is None:
        return encoded
    return encoded.replace(orjson.dumps(_PLACEHOLDER), raw.encode("utf-8", "surrogatepass"), 1)


@st.composite
def mutate(draw: Draw, payload: dict[str, Json]) -> bytes:
    """``payload`` with exactly one node changed, as bytes: replaced by a hostile value, a
    type swap, a nested structure or a raw JSON literal; deleted; or its key duplicated in the
    raw bytes (the original and a hostile value, in either order).

    The node and the change are chosen uniformly by a ``random.Random`` seeded from one
    Hypothesis draw (so a failure still replays): Hypothesis's own choices lean to the first
    element, which would mutate the first key of most payloads (their ``type``) over and over."""
    rnd = random.Random(draw(st.integers(0, 2**64 - 1)))  # noqa: S311 - test data, not secrets
    root = _copy(payload)
    paths = _nodes(root)
    if not paths:
        return _dumps(root, None)
    path = rnd.choice(paths)
    parent = _parent(root, path)
    key = path[-1]
    original = parent[key]
    operation = rnd.choice(["value", "value", "swap", "raw", "nest", "delete", "duplicate"])
    if operation == "delete":
        del parent[key]
        return _dumps(root, None)
    if operation == "duplicate" and isinstance(parent, dict):
        hostile = (rnd.choice(RAW_LITERALS) if rnd.random() < 0.4
                   else rnd.choice(_HOSTILE_ENCODED)[1].decode())
        first, second = orjson.dumps(original).decode(), hostile
        if rnd.random() < 0.5:
            first, second = second, first
        parent[key] = _PLACEHOLDER  # the bytes become "key":first,"key":second
        return _dumps(root, f"{first},{orjson.dumps(key).decode()}:{second}")
    if operation == "raw":
        parent[key] = _PLACEHOLDER
        return _dumps(root, rnd.choice(RAW_LITERALS))
    if operation == "nest":  # within the encoder's depth limit; deeper ones are raw
        parent[key] = _nest(rnd.randint(2, 200), original, rnd.random() < 0.5)
        return _dumps(root, None)
    before = orjson.dumps(original)  # by bytes: 1, 1.0 and true are different mutants
    pool = ([(v, orjson.dumps(v)) for v in _swaps(original)] if operation == "swap"
            else _HOSTILE_ENCODED)
    parent[key] = rnd.choice([value for value, encoded in pool if encoded != before])
    return _dumps(root, None)


def mutants(topic: str, now: float) -> st.SearchStrategy[bytes]:
    """One-node mutants of a source topic's valid payloads, as bytes."""
    return payloads(topic, now).flatmap(mutate)


def sample(strategy: st.SearchStrategy[Any], n: int, seed: int = 0) -> list[Any]:
    """``n`` examples of ``strategy``, reproducibly, outside a ``@given`` test. For example,
    ``sample(mutants("billing", time.time()), 2000)`` gives 2000 payloads to send to
    ``billing.events``."""
    seen: dict[Any, None] = {}  # distinct, in order: Hypothesis repeats itself now and then

    for attempt in range(8):
        @hypothesis_seed(seed * 1000 + attempt)
        @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def collect(value: Any) -> None:
            if len(seen) < n:
                seen[value] = None

        collect()
        if len(seen) >= n:
            break
    return list(seen)
