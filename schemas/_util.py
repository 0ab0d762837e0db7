"""Small helpers the provider adapters share.

Every helper takes whatever JSON produced (any type, any size, any depth) and returns a value
of the one type it promises, or None: the adapters never call ``str()``/``int()``/``round()``
on raw input themselves, because those raise on the extremes (``int(inf)``, ``round(nan)``,
``str()`` of a list nested 1000 deep raises RecursionError) and accept what they should not
(``True`` is an int).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

# datetime's own range, in Unix seconds: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
MIN_EPOCH = -62_135_596_800
MAX_EPOCH = 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def get_in(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]...; None when any step is missing or not a mapping."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def dict_at(obj: Any, *path: str) -> dict[str, Any]:
    """The mapping at ``path``, or an empty one when it is missing or not a mapping."""
    value = get_in(obj, *path)
    return value if isinstance(value, dict) else {}


def number(value: Any, lo: float, hi: float) -> float | None:
    """A finite int or float within [lo, hi]; None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if lo <= value <= hi else None


def integer(value: Any, lo: int, hi: int) -> int | None:
    """A whole number within [lo, hi] (an integral float such as 5.0 counts); else None."""
    n = number(value, lo, hi)
    if n is None or (isinstance(n, float) and not n.is_integer()):
        return None
    return int(n)


def epoch_to_iso(value: Any) -> str | None:
    """Unix seconds (Stripe) to an ISO-8601 UTC string; None when absent, not a number, or
    outside datetime's range (years 1-9999), instead of the platform's OverflowError/OSError.
    Computed as an offset from the epoch, not with fromtimestamp, so the result does not
    depend on the platform's time_t."""
    seconds = number(value, MIN_EPOCH, MAX_EPOCH)
    if seconds is None:
        return None
    return (_EPOCH + timedelta(seconds=seconds)).isoformat()


def text(value: Any, limit: int = 200) -> str | None:
    """A string (or a number written as one), cut to ``limit`` characters; None for
    anything else. Never ``str()`` of a container: it can be huge or nested too deep."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)[:limit]
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)[:limit]
    return None


def show(value: Any, limit: int = 40) -> str:
    """A raw value for an error message: short, and never str() of a container."""
    shown = text(value, limit)
    return repr(shown) if shown is not None else type(value).__name__


def str_id(value: Any) -> str | None:
    """An id that may arrive as a string, a number or an expanded object with an ``id``."""
    if type(value) is str:  # most ids: what the checks below give a str, without them
        return value or None
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str) and str(value):
        return str(value)
    return None
