"""Outcomes of decoding one message: data problems are values, never exceptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# Not frozen: one or more of these is made per message, and a frozen init costs 3x.
@dataclass(slots=True)
class Accepted:
    """A valid event churnsignal uses."""

    event: Any  # one of schemas.events.Event
    # (identity key, account or identity key) pairs the payload teaches; see schemas.identity
    links: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Skipped:
    """Valid input churnsignal does not use (a Stripe type it ignores, an unattributable call).

    Counted by ``reason``, never dead-lettered.
    """

    reason: str
    links: tuple[tuple[str, str], ...] = ()  # a skipped call may still link identities
    # A billing or support event older than the horizon (reason "too_old"): history, not
    # state; its facts still reach billing_events / support_events.
    event: Any = None


@dataclass(slots=True)
class Rejected:
    """Input that cannot be decoded or validated: goes to the dead-letter topic with ``reason``."""

    reason: str  # machine-readable, bounded set: not_json, invalid, too_large, ...
    detail: str  # human-readable, truncated


Decoded = Accepted | Skipped | Rejected
