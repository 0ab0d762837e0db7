"""Usage events without pydantic: a conservative fast check, and a plain event object (pure).

Usage events are the bulk of every stream, and validating one into its pydantic model costs
more than everything else decode does to it. ``usage_event`` accepts a canonical usage dict
only when it is certainly valid under ``schemas.events.UsageEvent`` and gives the same values;
anything it is not sure of (a number where a text is expected, a time written in another
ISO 8601 form, a missing field) returns None, and the caller validates with pydantic as
before, which accepts or rejects it with its usual message. A property test holds the two to
identical results (tests/unit/test_usage_lite.py).

``UsageLite`` is what the core reads of a usage event (the fields as attributes) and dumps as
pydantic would (``model_dump(mode="json", exclude_none=True)``), so the ingest writes the
same pack items either way. The state agent rebuilds pack items into it too (``stream.packs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from churnsignal.schemas.events import SCHEMA_VERSION, USAGE_TYPE_SET

_ID_MAX: Final = 200  # events.Id
_NAME_MAX: Final = 200  # events.Name
_COUNT_MAX: Final = 1_000_000  # UsageData.count
# RFC 3339 as producers write it: what both pydantic and datetime.fromisoformat read alike.
# Any other form (a space for the T, a Unix number, seven fraction digits) takes pydantic's path.
_RFC3339 = re.compile(
    r"\d{4}-[01]\d-[0-3]\dT[0-2]\d:[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-][01]\d:[0-5]\d)")


@dataclass(slots=True)
class UsageDataLite:
    name: str | None
    feature: str | None
    count: int

    # Written out: mypyc compiles an __init__ in the source, while the one dataclasses
    # generates runs interpreted (setup.py); one of each is built per usage event.
    def __init__(self, name: str | None, feature: str | None, count: int) -> None:
        self.name = name
        self.feature = feature
        self.count = count


@dataclass(slots=True)
class UsageLite:
    """A valid usage event: the attributes of ``schemas.events.UsageEvent``, plain."""

    event_id: str
    account_id: str
    type: str
    user_id: str | None
    occurred_at: datetime
    data: UsageDataLite
    schema_version: int = SCHEMA_VERSION
    # occurred_at as model_dump(mode="json") writes it, when known without formatting it
    # (``usage_event`` derives it from the input's text): isoformat costs more than the rest
    # of the dump. Not a field of the event: equality and repr leave it out.
    at_json: str | None = field(default=None, compare=False, repr=False)
    # occurred_at in seconds, when the maker worked it out (the state agent's, which reads
    # it several times an event); 0.0: not known (``stream.state.event_ts``). A copy with
    # another occurred_at must reset it, as ``model_copy`` does (``replace`` does not).
    ts: float = field(default=0.0, compare=False, repr=False)

    def __init__(self, event_id: str, account_id: str, type: str,
                 user_id: str | None, occurred_at: datetime, data: UsageDataLite,
                 schema_version: int = SCHEMA_VERSION, at_json: str | None = None,
                 ts: float = 0.0) -> None:
        self.event_id = event_id
        self.account_id = account_id
        self.type = type
        self.user_id = user_id
        self.occurred_at = occurred_at
        self.data = data
        self.schema_version = schema_version
        self.at_json = at_json
        self.ts = ts

    def model_dump(self, *, mode: str = "python", exclude_none: bool = False) -> dict[str, Any]:
        """As pydantic dumps a UsageEvent (same keys, same order, same time format)."""
        at: Any = self.occurred_at
        if mode == "json":
            if self.at_json is not None:
                at = self.at_json
            else:
                at = at.isoformat()
                if at.endswith("+00:00"):  # pydantic writes UTC as Z
                    at = at[:-6] + "Z"
        d = self.data
        data: dict[str, Any] = {"name": d.name, "feature": d.feature, "count": d.count}
        out: dict[str, Any] = {"event_id": self.event_id, "account_id": self.account_id,
                               "occurred_at": at, "user_id": self.user_id,
                               "schema_version": self.schema_version, "type": self.type,
                               "data": data}
        if exclude_none:
            if d.name is None:
                del data["name"]
            if d.feature is None:
                del data["feature"]
            if self.user_id is None:
                del out["user_id"]
        return out

    def model_copy(self, *, update: dict[str, Any] | None = None) -> UsageLite:
        if update and "occurred_at" in update:
            update = {"at_json": None, "ts": 0.0, **update}  # the time replaced
        return replace(self, **update) if update else replace(self)


def json_time(at: str) -> str:
    """The time ``at`` (text that ``_RFC3339`` matches and ``datetime.fromisoformat`` reads)
    as pydantic writes it in JSON, from the text alone: the fraction in six digits (none when
    it is zero) and a zero offset as Z, which is what isoformat, with UTC as Z, makes of it."""
    if at[-1] == "Z":
        if len(at) == 20 or (len(at) == 27 and at[20:26] != "000000"):
            return at  # whole seconds, or six digits not all zero: written so already
        clock, zone = at[:-1], "Z"
    else:
        clock, zone = at[:-6], ("Z" if at[-5:] == "00:00" else at[-6:])
    fraction = clock[20:]  # after "YYYY-MM-DDTHH:MM:SS."
    if fraction.rstrip("0"):
        return f"{clock[:19]}.{fraction.ljust(6, '0')}{zone}"
    return clock[:19] + zone


def _id(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= _ID_MAX


def _name(value: Any) -> bool:
    return value is None or (type(value) is str and len(value) <= _NAME_MAX)


def usage_event(candidate: dict[str, Any]) -> UsageLite | None:
    """The usage event ``candidate`` certainly is, or None: not certain, validate it with
    pydantic (which may still accept it)."""
    kind = candidate.get("type")
    if type(kind) is not str or kind not in USAGE_TYPE_SET:
        return None
    event_id = candidate.get("event_id")
    account_id = candidate.get("account_id")
    user_id = candidate.get("user_id")
    if not (_id(event_id) and _id(account_id) and (user_id is None or _id(user_id))):
        return None
    version = candidate.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        return None
    at = candidate.get("occurred_at")
    if type(at) is not str or _RFC3339.fullmatch(at) is None:
        return None
    try:
        occurred_at = datetime.fromisoformat(at)
    except ValueError:  # 2026-02-30, hour 24, an offset of 24 hours: pydantic says why
        return None
    data = candidate.get("data", _ABSENT)
    if data is _ABSENT:
        values = UsageDataLite(None, None, 1)
    elif type(data) is dict:
        name = data.get("name")
        feature = data.get("feature")
        count = data.get("count", 1)
        if not (_name(name) and _name(feature) and type(count) is int
                and 1 <= count <= _COUNT_MAX):
            return None
        values = UsageDataLite(name, feature, count)
    else:
        return None
    return UsageLite(event_id, account_id, kind, user_id,  # type: ignore[arg-type]
                     occurred_at, values, SCHEMA_VERSION, json_time(at))


_ABSENT: Final = object()
