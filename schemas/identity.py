"""Identity keys: how an event that does not name its account still finds it (pure).

Providers often leave the account out: a Stripe invoice without metadata names only its
customer, a dispute only its charge, a Segment track call only its user. Such an event is
routed to an identity key (``~stripe:customer:cus_1``, ``~segment:user:u1``, ...) instead of an
account. Links between keys and accounts are learned from the payloads that carry both (a
subscription with ``metadata.account_id`` and a customer, a Segment Group call, an Identify
call, an invoice naming its charge and customer, a Zendesk user event or a ticket naming both
its requester and its organization). The state agent keeps each identity's link
and the events waiting for it, and forwards them once the link is known.
"""

from __future__ import annotations

PREFIX = "~"
MAX_ID = 180  # identity keys must fit the canonical account_id (200 characters)

# Identity kinds whose own id is the account when nothing better is known (Stripe: "else the
# customer id"); the others wait for a link.
_FALLBACK = {"stripe:customer:"}


def key(kind: str, value: str) -> str:
    return f"{PREFIX}{kind}:{value[:MAX_ID]}"


def is_identity(account_id: str) -> bool:
    return account_id.startswith(PREFIX)


def fallback_account(identity: str) -> str | None:
    """The account an identity stands for while no link is known, or None to wait."""
    body = identity[len(PREFIX):]
    for kind in _FALLBACK:
        if body.startswith(kind):
            return body[len(kind):]
    return None


def stripe_customer(customer: str) -> str:
    return key("stripe:customer", customer)


def stripe_charge(charge: str) -> str:
    return key("stripe:charge", charge)


def segment_user(user: str) -> str:
    return key("segment:user", user)


def segment_anonymous(anonymous: str) -> str:
    return key("segment:anon", anonymous)


def zendesk_user(user: str) -> str:
    """A Zendesk user (a ticket's requester): waits for the organization it belongs to. No
    fallback: a person is not an account."""
    return key("zendesk:user", user)
