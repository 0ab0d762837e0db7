"""Retry delays and what an HTTP status means for an alert (pure)."""

from __future__ import annotations

import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Literal

Outcome = Literal["accepted", "retry", "refused"]


def classify(status: int) -> Outcome:
    """2xx: accepted. 408, 429, 5xx (and 1xx, which a client never sees as final): retried.
    Any other 4xx, and 3xx (a moved endpoint answers the same to every retry): refused for
    good; the alert goes to the undeliverable topic."""
    if 200 <= status < 300:
        return "accepted"
    if status in (408, 429) or status >= 500 or status < 200:
        return "retry"
    return "refused"


def delay(attempt: int, base_s: float, cap_s: float,
          rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry ``attempt`` (1 = the first retry): exponential from ``base_s``,
    capped at ``cap_s``, with "equal jitter" (between half and all of it), so receivers that
    come back are not hit by every sender at the same instant, and no wait is near zero."""
    if attempt < 1:
        return 0.0
    ceiling = min(cap_s, base_s * (2.0 ** min(attempt - 1, 60)))
    return ceiling / 2 + rand() * ceiling / 2


def retry_after(header: str | None, now: float, cap_s: float) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from ``now``, at most
    ``cap_s``; None when absent or unreadable."""
    if not header:
        return None
    text = header.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(cap_s, seconds))
