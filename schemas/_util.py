"""Small helpers the provider adapters share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def get_in(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]...; None when any step is missing or not a mapping."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def epoch_to_iso(value: Any) -> str | None:
    """Unix seconds (Stripe, Intercom) to an ISO-8601 UTC string; None when absent."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value, tz=UTC).isoformat()


def str_id(value: Any) -> str | None:
    """An id that may arrive as a string, a number or an expanded object with an ``id``."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str) and str(value):
        return str(value)
    return None
