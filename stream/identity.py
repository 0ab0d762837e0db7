"""Per-identity state: its link, and the events that wait for it (pure, no I/O).

An identity (see ``schemas.identity``) lives in the state table under its key, in the
partition of that key, like an account. Items reach it in packs: events routed to it
because they did not name their account, and links learned from other payloads. Each item
is either forwarded to the linked account or identity, or parked until a link arrives (or,
where the identity has a fallback account, until a grace period has passed: ``settle``).
Forwarded items carry this identity as their source and a sequence number as their offset,
so the receiver skips a re-forwarded item exactly as it skips a redelivered one; a
redelivered pack is skipped here by its own (source, offset) high-water.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from churnsignal.schemas.identity import fallback_account

Item = tuple[str | None, int, dict[str, Any]]
DEFAULT_GRACE_S = 60.0


@dataclass(slots=True)
class IdentityState:
    key: str
    link: str | None = None
    next: int = 0  # sequence number of the next forwarded item
    hw: dict[str, int] = field(default_factory=dict)  # source -> last offset taken
    parked: list[list[Any]] = field(default_factory=list)  # [wall time parked, event dict]

    def to_bytes(self) -> bytes:
        return orjson.dumps({"identity": self.key, "link": self.link, "next": self.next,
                             "hw": self.hw, "parked": self.parked})

    @classmethod
    def from_bytes(cls, raw: bytes) -> IdentityState:
        data = orjson.loads(raw)
        return cls(data["identity"], data.get("link"), data.get("next", 0), data.get("hw", {}),
                   data.get("parked", []))


@dataclass(slots=True)
class Resolution:
    forwards: list[tuple[str, str, int, dict[str, Any]]] = field(default_factory=list)
    parked: int = 0  # events newly waiting for a link
    joined: int = 0  # waiting events forwarded because a link arrived
    overflow: list[dict[str, Any]] = field(default_factory=list)  # beyond max_parked
    changed: bool = False


def link_item(identity: str, target: str) -> dict[str, Any]:
    """The pack item that teaches ``identity -> target`` (routed to the identity's partition)."""
    return {"account_id": identity, "link": target}


def _forward(state: IdentityState, target: str, event: dict[str, Any],
             out: Resolution) -> None:
    out.forwards.append((target, state.key, state.next, {**event, "account_id": target}))
    state.next += 1


def resolve(state: IdentityState, items: list[Item], max_parked: int, wall: float) -> Resolution:
    """Take a pack's items for this identity, in order; forward what can go, park the rest.

    Events wait for a link even where a fallback exists: Stripe relays deliver unkeyed, so
    an invoice often overtakes the subscription whose metadata links its customer."""
    out = Resolution()
    for source, offset, data in items:
        if source is not None:
            if offset <= state.hw.get(source, -1):
                continue  # a redelivered pack
            state.hw[source] = offset
        out.changed = True
        link = data.get("link")
        if link is not None:
            if link == state.key:
                continue  # a self-link teaches nothing (and would loop)
            state.link = str(link)
            _release(state, out)
            continue
        if state.link is not None:
            _forward(state, state.link, data, out)
        elif len(state.parked) < max_parked:
            state.parked.append([wall, data])
            out.parked += 1
        else:
            out.overflow.append(data)
    return out


def _release(state: IdentityState, out: Resolution) -> None:
    assert state.link is not None
    for _, event in state.parked:
        _forward(state, state.link, event, out)
    out.joined += len(state.parked)
    state.parked = []


def settle(state: IdentityState, wall: float, grace_s: float = DEFAULT_GRACE_S) -> Resolution:
    """On the re-score timer: an identity with a fallback (a Stripe customer is its own
    account when nothing links it) stops waiting once its oldest event waited ``grace_s``;
    it then goes to the fallback until a link says otherwise."""
    out = Resolution()
    fallback = fallback_account(state.key)
    if (state.link is None and fallback is not None and state.parked
            and wall - state.parked[0][0] >= grace_s):
        state.link = fallback
        out.changed = True
        _release(state, out)
    return out
