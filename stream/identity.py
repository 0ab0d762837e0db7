"""Per-identity state: its link, and the events that wait for it (pure, no I/O).

An identity (see ``schemas.identity``) lives in the state table under its key, in the
partition of that key, like an account. Items reach it in packs: events routed to it
because they did not name their account, and links learned from other payloads. Each item
is either forwarded to the linked account or identity, or parked until a link arrives (or,
where the identity has a fallback account, until a grace period has passed: ``settle``).
Forwarded items carry this identity as their source and a sequence number as their offset,
so the receiver skips a re-forwarded item exactly as it skips a redelivered one; a
redelivered pack is skipped here by its own (source, offset) high-water.

Waiting is bounded, so memory is bounded whatever arrives: an event waits at most ``ttl_s``
(``expire``), an identity holds at most ``max_parked`` events (``resolve``: the rest is
``overflow``), and a partition holds at most ``max_identities`` waiting identities, the
oldest expiring first (``evict``). ``sweep`` applies the grace, the time and the count on
the re-score tick, so between two ticks the count may exceed its bound by what arrived
meanwhile. Expired events are handed back (``Resolution.expired``) to be dead-lettered,
never dropped silently. An identity with a fallback account (a Stripe customer) never
expires: when its time is up it takes the fallback, as ``settle`` does after the grace.

Which identities are deleted. The receiver of forwards dedups them by (identity, sequence)
against its high-water for this identity, so a sequence must never restart at or below a
number already forwarded: the receiver would silently skip every event that reuses one.
Hence only an identity that never forwarded anything (no link, ``next == 0``, so no receiver
holds a high-water for it) is tombstoned (``Resolution.tombstone``), once its last waiting
event has expired; its state is then blank (``is_blank``), as the key reads once deleted,
and a new identity under the same key starts at 0 again, safely. A joined identity is kept,
in its compact form: link, next sequence and its sources' high-waters (no events;
``to_bytes`` leaves out what is empty), a few dozen bytes. Deleting it would lose
its ``next`` (the skip above) and its link (a dispute names only its charge, and may come
months after the invoice that linked the charge). A sequence restarted from the wall clock
instead was rejected: redelivered packs may be grouped differently, so the numbers would
depend on batching and the exact dedup of a redelivery would become a matter of timing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from churnsignal.schemas.identity import fallback_account

Item = tuple[str | None, int, dict[str, Any]]
DEFAULT_GRACE_S = 60.0
DEFAULT_TTL_S = 7 * 86_400.0
DEFAULT_MAX_IDENTITIES = 20_000


@dataclass(slots=True)
class IdentityState:
    key: str
    link: str | None = None
    next: int = 0  # sequence number of the next forwarded item
    hw: dict[str, int] = field(default_factory=dict)  # source -> last offset taken
    # [wall time parked, event dict, source, offset]: where it came from, for the DLQ
    parked: list[list[Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        # Compact: a joined identity is {identity, next, link, hw}, nothing else.
        data: dict[str, Any] = {"identity": self.key, "next": self.next}
        if self.link is not None:
            data["link"] = self.link
        if self.hw:
            data["hw"] = self.hw
        if self.parked:
            data["parked"] = self.parked  # last: ``waiting_bytes`` looks for it
        # A right-sized copy: orjson (3.12+) returns a buffer of at least 4 KiB and never
        # shrinks it, and the store keeps these bytes for every key it holds.
        return bytes(memoryview(orjson.dumps(data)))

    @classmethod
    def from_bytes(cls, raw: bytes) -> IdentityState:
        data = orjson.loads(raw)
        # Records written before the origin was kept hold [wall, event] only.
        parked = [p if len(p) == 4 else [p[0], p[1], None, -1] for p in data.get("parked", ())]
        return cls(data["identity"], data.get("link"), data.get("next", 0), data.get("hw", {}),
                   parked)


@dataclass(slots=True)
class Resolution:
    key: str = ""  # the identity resolved
    forwards: list[tuple[str, str, int, dict[str, Any]]] = field(default_factory=list)
    parked: int = 0  # events newly waiting for a link
    joined: int = 0  # waiting events forwarded because a link arrived (or the fallback)
    overflow: list[dict[str, Any]] = field(default_factory=list)  # beyond max_parked
    # Waited too long, or the oldest beyond the count: (source, offset, event) as parked.
    expired: list[Item] = field(default_factory=list)
    expired_by: Literal["ttl", "count"] | None = None  # "count" if the count took any
    tombstone: bool = False  # delete the key (implies changed): it never forwarded anything
    changed: bool = False


@dataclass(slots=True)
class Sweep:
    resolutions: list[Resolution] = field(default_factory=list)  # changed identities only
    waiting: int = 0  # identities still waiting for a link after the sweep


def link_item(identity: str, target: str) -> dict[str, Any]:
    """The pack item that teaches ``identity -> target`` (routed to the identity's partition)."""
    return {"account_id": identity, "link": target}


def is_waiting(state: IdentityState) -> bool:
    return state.link is None and bool(state.parked)


def is_blank(state: IdentityState) -> bool:
    """Equal to an unknown key's state (as after a tombstone): store it as a deletion."""
    return state.link is None and state.next == 0 and not state.hw and not state.parked


def waiting_bytes(raw: bytes) -> bool:
    """Whether a stored identity may be waiting, without decoding it: a tick can pass over
    the joined identities, which are most of them. No false negatives; a false positive
    (which the escaping of quotes in strings all but rules out) costs only a decode."""
    return b'"parked":' in raw


def _forward(state: IdentityState, target: str, event: dict[str, Any],
             out: Resolution) -> None:
    out.forwards.append((target, state.key, state.next, {**event, "account_id": target}))
    state.next += 1


def resolve(state: IdentityState, items: list[Item], max_parked: int, wall: float) -> Resolution:
    """Take a pack's items for this identity, in order; forward what can go, park the rest.

    Events wait for a link even where a fallback exists: Stripe relays deliver unkeyed, so
    an invoice often overtakes the subscription whose metadata links its customer."""
    out = Resolution(state.key)
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
            state.parked.append([wall, data, source, offset])
            out.parked += 1
        else:
            out.overflow.append(data)
    return out


def _release(state: IdentityState, out: Resolution) -> None:
    assert state.link is not None
    for entry in state.parked:
        _forward(state, state.link, entry[1], out)
    out.joined += len(state.parked)
    state.parked = []


def _take_fallback(state: IdentityState, fallback: str, out: Resolution) -> None:
    state.link = fallback
    out.changed = True
    _release(state, out)


def settle(state: IdentityState, wall: float, grace_s: float = DEFAULT_GRACE_S) -> Resolution:
    """On the re-score timer: an identity with a fallback (a Stripe customer is its own
    account when nothing links it) stops waiting once its oldest event waited ``grace_s``;
    it then goes to the fallback until a link says otherwise."""
    out = Resolution(state.key)
    fallback = fallback_account(state.key)
    if (fallback is not None and is_waiting(state)
            and wall - state.parked[0][0] >= grace_s):
        _take_fallback(state, fallback, out)
    return out


def _expire(state: IdentityState, keep: list[list[Any]], gone: list[list[Any]],
            out: Resolution, why: Literal["ttl", "count"]) -> None:
    out.expired.extend((p[2], p[3], p[1]) for p in gone)
    if out.expired_by != "count":
        out.expired_by = why
    out.changed = True
    state.parked = keep
    # Only a key that never forwarded may go: nobody holds a high-water for it (see above).
    out.tombstone = not keep and state.link is None and state.next == 0
    if out.tombstone:
        state.hw = {}  # now what the deleted key reads back as: ``is_blank``


def expire(state: IdentityState, wall: float, ttl_s: float = DEFAULT_TTL_S) -> Resolution:
    """Events that waited ``ttl_s`` for a link leave (``expired``, to be dead-lettered); an
    identity left with nothing that never forwarded anything is to be deleted
    (``tombstone``). An identity with a fallback takes it instead."""
    out = Resolution(state.key)
    if not is_waiting(state) or wall - min(p[0] for p in state.parked) < ttl_s:
        return out
    fallback = fallback_account(state.key)
    if fallback is not None:
        _take_fallback(state, fallback, out)
        return out
    keep: list[list[Any]] = []
    gone: list[list[Any]] = []
    for entry in state.parked:
        (keep if wall - entry[0] < ttl_s else gone).append(entry)
    _expire(state, keep, gone, out, "ttl")
    return out


def evict(states: Iterable[IdentityState], max_identities: int) -> list[Resolution]:
    """Bound the waiting identities of a partition: beyond ``max_identities``, those whose
    oldest event waits longest expire whole (ties by key, so every worker and every replay
    picks the same). An identity with a fallback takes it instead."""
    waiting = [s for s in states if is_waiting(s)]
    excess = len(waiting) - max_identities
    if excess <= 0:
        return []
    out = []
    for state in heapq.nsmallest(excess, waiting, key=lambda s: (s.parked[0][0], s.key)):
        res = Resolution(state.key)
        fallback = fallback_account(state.key)
        if fallback is not None:
            _take_fallback(state, fallback, res)
        else:
            _expire(state, [], state.parked, res, "count")
        out.append(res)
    return out


def sweep(states: Iterable[IdentityState], wall: float, grace_s: float = DEFAULT_GRACE_S,
          ttl_s: float = DEFAULT_TTL_S,
          max_identities: int = DEFAULT_MAX_IDENTITIES) -> Sweep:
    """The re-score tick for one partition's identities: the grace (``settle``), the time
    (``expire``), then the count (``evict``). One resolution per changed identity."""
    by_key: dict[str, Resolution] = {}
    candidates = []
    for state in states:
        if not is_waiting(state):
            continue  # joined: nothing to do
        res = settle(state, wall, grace_s)
        if not res.changed:
            res = expire(state, wall, ttl_s)
        if res.changed:
            by_key[state.key] = res
        if is_waiting(state):
            candidates.append(state)
    for res in evict(candidates, max_identities):
        earlier = by_key.get(res.key)
        if earlier is not None:  # expired in part by time, now the rest by count
            earlier.expired.extend(res.expired)
            earlier.forwards.extend(res.forwards)
            earlier.joined += res.joined
            earlier.expired_by = "count"
            earlier.tombstone = res.tombstone
        else:
            by_key[res.key] = res
    return Sweep(list(by_key.values()), sum(1 for s in candidates if is_waiting(s)))
