"""Per-account engagement state and its update rule: pure functions of (state, event, policy).

State is bounded whatever the event volume: daily buckets over the policy horizon, capped maps,
and a capped ring of recent event-id hashes for dedup. It serialises to compact JSON bytes.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from array import array
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

import cramjam
import orjson

from churnsignal.schemas.events import family_of
from churnsignal.schemas.usage_lite import UsageLite
from churnsignal.stream.attributes import apply_traits
from churnsignal.stream.policy import BASE_COLUMNS, Policy

DAY = 86_400.0
# 3: per-type day columns (``types``) and the policy that scored; 2 (still read): days as
# offsets + bucket columns; 1 (still read): rows per day
STATE_VERSION = 3
# A state whose JSON is longer than this is stored LZ4-compressed behind one marker byte (a
# JSON state starts with "{"): a busy account with tracked event types, 90 days of them,
# users and tickets is 5-7 KB of JSON and about 2.4 KB compressed, for ~8 us; the typical
# state (about 1 KB) is left as it is.
COMPRESS_ABOVE = 2048
_LZ4 = b"\x04"
_PRIORITY_LEVEL = {"low": 0, "normal": 0, "high": 1, "urgent": 1}

# Bucket columns: one list per day, indexed by these positions.
EVENTS, USAGE, SESSIONS, USERS, BILLING, SUPPORT, KEY = range(BASE_COLUMNS)
# Then one column per tracked usage event type (the policy's model.event_types, named in
# ``AccountState.types``). Older states have 6 columns: from_bytes pads them.
_BUCKET_WIDTH = BASE_COLUMNS


def day_of(ts: float) -> int:
    """Days since the Unix epoch (UTC) of a timestamp in seconds."""
    return int(ts // DAY)


def id_hash(text: str) -> int:
    """A stable 48-bit hash: process-independent, unlike hash()."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big")


# User ids repeat on every event of their user; event ids never do (a cache would only
# miss, at half again the cost of hashing).
_user_hash = lru_cache(maxsize=1 << 16)(id_hash)


@dataclass(slots=True)
class AccountState:
    """Everything churnsignal remembers about one account."""

    account_id: str
    seq: int = 0  # accepted events applied; a version for rows derived from this state
    first_seen: float = 0.0
    last_active: float = 0.0  # last usage event
    last_event: float = 0.0
    days: dict[int, list[int]] = field(default_factory=dict)  # day -> bucket, in day order
    day_users: dict[int, list[int]] = field(default_factory=dict)  # recent days: user hashes
    features: dict[str, int] = field(default_factory=dict)  # feature -> last day used
    activated_at: float | None = None
    # billing
    sub_status: str | None = None
    sub_seen_at: float = 0.0  # event time of the newest subscription event applied
    plan: str | None = None
    seats: int | None = None
    mrr_cents: int = 0
    mrr_peak: list[list[float]] = field(default_factory=list)  # [[day, mrr]] changes, horizon
    cancel_at_period_end: bool = False
    period_end: float | None = None
    pause_resumes_at: float | None = None
    # failed payment attempts in the horizon, settled or not (the newest FAILURES_KEPT);
    # those after paid_at are the open ones (``open_failures``)
    failed_payments: list[float] = field(default_factory=list)
    retry_pending: bool = False
    payment_seen_at: float = 0.0  # event time of the newest failure or payment applied
    paid_at: float = 0.0
    card_expires_at: float | None = None
    involuntary_end: bool = False  # the subscription ended after failed payments
    # support
    open_tickets: dict[str, int] = field(default_factory=dict)  # ticket id -> 1 if high/urgent
    reopened: list[float] = field(default_factory=list)
    slow_resolutions: list[float] = field(default_factory=list)
    bad_csat_at: float | None = None
    nps: int | None = None
    nps_at: float | None = None
    # dedup
    hw: dict[str, int] = field(default_factory=dict)  # "topic/partition" -> last offset applied
    # Ring of recent event-id hashes, as machine words: a list would hold a separate int
    # object per id (48 bits, above the small ints), each a cache miss to scan or serialise.
    ids: array[int] = field(default_factory=lambda: array("Q"))
    # scoring and alerting
    score: float = 0.0
    band: str = "low"
    alert_band: str = "low"
    last_alert_at: float = 0.0
    alerts: int = 0
    scored_at: float = 0.0
    policy: str = ""  # the policy version that scored it last (a switch re-baselines bands)
    types: list[str] = field(default_factory=list)  # the per-type columns after the base ones
    # acknowledged / snoozed (POST /api/accounts/ID/ack|snooze; stream.alerts.acknowledge):
    # escalations up to ack_band stay quiet until it rises above it, falls to low, or
    # (a snooze) ack_until passes; "" and 0.0: none (older states read as none)
    ack_band: str = ""
    ack_until: float = 0.0
    # account attributes from Segment group traits (policy accounts.traits; at most 8, values
    # at most 64 characters) and, per attribute, the event time of the group call that set
    # or cleared it (newest wins); older states read as none
    attributes: dict[str, str] = field(default_factory=dict)
    attribute_times: dict[str, float] = field(default_factory=dict)
    # What the last score row written from this working copy said (``stream.fold``): held
    # in memory only, never stored; a state read back has none, so its next batch writes
    # a row.
    last_row: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    # Written out: mypyc compiles an __init__ in the source, while the one dataclasses
    # generates runs interpreted (setup.py); a state is built per new account and per clone.
    def __init__(
            self, account_id: str,
            seq: int = 0,
            first_seen: float = 0.0,
            last_active: float = 0.0,
            last_event: float = 0.0,
            days: dict[int, list[int]] | None = None,
            day_users: dict[int, list[int]] | None = None,
            features: dict[str, int] | None = None,
            activated_at: float | None = None,
            sub_status: str | None = None,
            sub_seen_at: float = 0.0,
            plan: str | None = None,
            seats: int | None = None,
            mrr_cents: int = 0,
            mrr_peak: list[list[float]] | None = None,
            cancel_at_period_end: bool = False,
            period_end: float | None = None,
            pause_resumes_at: float | None = None,
            failed_payments: list[float] | None = None,
            retry_pending: bool = False,
            payment_seen_at: float = 0.0,
            paid_at: float = 0.0,
            card_expires_at: float | None = None,
            involuntary_end: bool = False,
            open_tickets: dict[str, int] | None = None,
            reopened: list[float] | None = None,
            slow_resolutions: list[float] | None = None,
            bad_csat_at: float | None = None,
            nps: int | None = None,
            nps_at: float | None = None,
            hw: dict[str, int] | None = None,
            ids: array[int] | list[int] | None = None,
            score: float = 0.0,
            band: str = "low",
            alert_band: str = "low",
            last_alert_at: float = 0.0,
            alerts: int = 0,
            scored_at: float = 0.0,
            policy: str = "",
            types: list[str] | None = None,
            ack_band: str = "",
            ack_until: float = 0.0,
            attributes: dict[str, str] | None = None,
            attribute_times: dict[str, float] | None = None,
            last_row: tuple[Any, ...] | None = None,
    ) -> None:
        self.account_id = account_id
        self.seq = seq
        self.first_seen = first_seen
        self.last_active = last_active
        self.last_event = last_event
        self.days = {} if days is None else days
        self.day_users = {} if day_users is None else day_users
        self.features = {} if features is None else features
        self.activated_at = activated_at
        self.sub_status = sub_status
        self.sub_seen_at = sub_seen_at
        self.plan = plan
        self.seats = seats
        self.mrr_cents = mrr_cents
        self.mrr_peak = [] if mrr_peak is None else mrr_peak
        self.cancel_at_period_end = cancel_at_period_end
        self.period_end = period_end
        self.pause_resumes_at = pause_resumes_at
        self.failed_payments = [] if failed_payments is None else failed_payments
        self.retry_pending = retry_pending
        self.payment_seen_at = payment_seen_at
        self.paid_at = paid_at
        self.card_expires_at = card_expires_at
        self.involuntary_end = involuntary_end
        self.open_tickets = {} if open_tickets is None else open_tickets
        self.reopened = [] if reopened is None else reopened
        self.slow_resolutions = [] if slow_resolutions is None else slow_resolutions
        self.bad_csat_at = bad_csat_at
        self.nps = nps
        self.nps_at = nps_at
        self.hw = {} if hw is None else hw
        # A list from older JSON formats (or a caller) becomes the ring's array.
        self.ids = ids if isinstance(ids, array) else array("Q", () if ids is None else ids)
        self.score = score
        self.band = band
        self.alert_band = alert_band
        self.last_alert_at = last_alert_at
        self.alerts = alerts
        self.scored_at = scored_at
        self.policy = policy
        self.types = [] if types is None else types
        self.ack_band = ack_band
        self.ack_until = ack_until
        self.attributes = {} if attributes is None else attributes
        self.attribute_times = {} if attribute_times is None else attribute_times
        self.last_row = last_row

    def clone(self) -> AccountState:
        """An independent copy (to undo a fold that failed half way): ~10 us at 90 days,
        a sixth of a to_bytes/from_bytes round trip."""
        return AccountState(
            self.account_id,
            self.seq,
            self.first_seen,
            self.last_active,
            self.last_event,
            {d: b[:] for d, b in self.days.items()},
            {d: u[:] for d, u in self.day_users.items()},
            dict(self.features),
            self.activated_at,
            self.sub_status,
            self.sub_seen_at,
            self.plan,
            self.seats,
            self.mrr_cents,
            [p[:] for p in self.mrr_peak],
            self.cancel_at_period_end,
            self.period_end,
            self.pause_resumes_at,
            self.failed_payments[:],
            self.retry_pending,
            self.payment_seen_at,
            self.paid_at,
            self.card_expires_at,
            self.involuntary_end,
            dict(self.open_tickets),
            self.reopened[:],
            self.slow_resolutions[:],
            self.bad_csat_at,
            self.nps,
            self.nps_at,
            dict(self.hw),
            self.ids[:],
            self.score,
            self.band,
            self.alert_band,
            self.last_alert_at,
            self.alerts,
            self.scored_at,
            self.policy,
            self.types[:],
            self.ack_band,
            self.ack_until,
            dict(self.attributes),
            dict(self.attribute_times),
            self.last_row,
        )

    def to_bytes(self) -> bytes:
        # Only the fields that differ from a new state's: ``from_bytes`` (this version's and
        # every earlier one's) reads a missing key as its default. About half the keys and
        # bytes of a typical state, and less for orjson to write; this runs for every state
        # a flush writes. ``test_every_field_survives_the_round_trip`` guards the list.
        data: dict[str, Any] = {"account_id": self.account_id, "v": STATE_VERSION}
        if self.seq:
            data["seq"] = self.seq
        if self.first_seen:
            data["first_seen"] = self.first_seen
        if self.last_active:
            data["last_active"] = self.last_active
        if self.last_event:
            data["last_event"] = self.last_event
        if self.features:
            data["features"] = self.features
        if self.activated_at is not None:
            data["activated_at"] = self.activated_at
        if self.sub_status is not None:
            data["sub_status"] = self.sub_status
        if self.sub_seen_at:
            data["sub_seen_at"] = self.sub_seen_at
        if self.plan is not None:
            data["plan"] = self.plan
        if self.seats is not None:
            data["seats"] = self.seats
        if self.mrr_cents:
            data["mrr_cents"] = self.mrr_cents
        if self.mrr_peak:
            data["mrr_peak"] = self.mrr_peak
        if self.cancel_at_period_end:
            data["cancel_at_period_end"] = True
        if self.period_end is not None:
            data["period_end"] = self.period_end
        if self.pause_resumes_at is not None:
            data["pause_resumes_at"] = self.pause_resumes_at
        if self.failed_payments:
            data["failed_payments"] = self.failed_payments
        if self.retry_pending:
            data["retry_pending"] = True
        if self.payment_seen_at:
            data["payment_seen_at"] = self.payment_seen_at
        if self.paid_at:
            data["paid_at"] = self.paid_at
        if self.card_expires_at is not None:
            data["card_expires_at"] = self.card_expires_at
        if self.involuntary_end:
            data["involuntary_end"] = True
        if self.open_tickets:
            data["open_tickets"] = self.open_tickets
        if self.reopened:
            data["reopened"] = self.reopened
        if self.slow_resolutions:
            data["slow_resolutions"] = self.slow_resolutions
        if self.bad_csat_at is not None:
            data["bad_csat_at"] = self.bad_csat_at
        if self.nps is not None:
            data["nps"] = self.nps
        if self.nps_at is not None:
            data["nps_at"] = self.nps_at
        if self.hw:
            data["hw"] = self.hw
        if self.score:
            data["score"] = self.score
        if self.band != "low":
            data["band"] = self.band
        if self.alert_band != "low":
            data["alert_band"] = self.alert_band
        if self.last_alert_at:
            data["last_alert_at"] = self.last_alert_at
        if self.alerts:
            data["alerts"] = self.alerts
        if self.scored_at:
            data["scored_at"] = self.scored_at
        if self.policy:
            data["policy"] = self.policy
        if self.types:
            data["types"] = self.types
        if self.ack_band:
            data["ack_band"] = self.ack_band
        if self.ack_until:
            data["ack_until"] = self.ack_until
        if self.attributes:
            data["attributes"] = self.attributes
        if self.attribute_times:
            data["attribute_times"] = self.attribute_times
        # The days as offsets from the first, their buckets as columns, columns never used
        # (billing, support, key events) left out; all in C (zip), no Python work per bucket.
        days = self.days
        base = next(iter(days), 0)  # days are in order
        data["d0"] = base
        data["days"] = [d - base for d in days]
        columns: list[Any] = list(zip(*days.values(), strict=True))
        while columns and not any(columns[-1]):
            columns.pop()
        # A column of zeros between used ones (sessions, billing, support, key events
        # before per-type columns) is written as one 0.
        data["cols"] = [c if any(c) else 0 for c in columns]
        data["day_users"] = [[d, *u] for d, u in self.day_users.items()]
        # The dedup ring as 8-byte words in base64: 11 characters an id instead of ~15
        # decimal digits (the ring is most of a busy account's state).
        if self.ids:
            data["ids"] = _pack_ids(self.ids)
        raw = orjson.dumps(data)
        if len(raw) > COMPRESS_ABOVE:
            return _LZ4 + bytes(cramjam.lz4.compress_block(raw))
        return raw

    @staticmethod
    def json_of(raw: bytes) -> bytes:
        """The JSON of a stored state, compressed or not."""
        return bytes(cramjam.lz4.decompress_block(raw[1:])) if raw[:1] == _LZ4 else raw

    @classmethod
    def from_bytes(cls, raw: bytes) -> AccountState:
        data: dict[str, Any] = orjson.loads(cls.json_of(raw))
        version = data.pop("v", 1)
        base = data.pop("d0", 0)
        if version >= 2:
            width = len(data["days"])
            columns = [c if c != 0 else (0,) * width for c in data.pop("cols")]
            pad = [0] * (_BUCKET_WIDTH + len(data.get("types", ())) - len(columns))
            buckets = [[*cells, *pad] for cells in zip(*columns, strict=True)] if columns \
                else [pad[:] for _ in data["days"]]
            data["days"] = {base + d: b for d, b in zip(data["days"], buckets, strict=True)}
        else:  # version 1: [[offset, *bucket without trailing zeros], ...], in any order
            data["days"] = {
                row[0] + base: row[1:] + [0] * (_BUCKET_WIDTH - len(row) + 1)
                for row in sorted(data["days"], key=itemgetter(0))
            }
        data["day_users"] = {row[0]: row[1:] for row in data["day_users"]}
        if isinstance(data.get("ids"), str):  # format 3
            data["ids"] = _unpack_ids(data["ids"])
        return cls(**data)


def _pack_ids(ids: array[int]) -> str:
    if sys.byteorder == "big":
        ids = ids[:]
        ids.byteswap()
    return base64.b64encode(ids.tobytes()).decode()


def _unpack_ids(text: str) -> array[int]:
    words = array("Q", base64.b64decode(text))
    if sys.byteorder == "big":
        words.byteswap()
    return words


_users_of = itemgetter(USERS)


class FoldParams:
    """What folding an event reads of a policy, as native attributes: a policy is a tree of
    pydantic models, and reading through two of them costs ~0.05-0.07 us, several an event
    (``fold_params`` makes one per policy)."""

    def __init__(self, policy: Policy) -> None:
        limits = policy.limits
        self.dedup_ids: int = limits.dedup_ids
        self.features: int = limits.features
        self.day_users: int = limits.day_users
        self.grace_days: int = policy.windows.grace_days
        self.tracked: bool = bool(policy.tracked_types)
        self.key_events: frozenset[str] = frozenset(policy.usage.key_events)
        self.type_columns: dict[str, int] = policy.type_columns
        self.activation_events: frozenset[str] = frozenset(
            policy.onboarding.activation_events)


# policy id -> (the policy, its params): kept with the policy so its id is not reused.
_PARAMS: dict[int, tuple[Policy, FoldParams]] = {}


def fold_params(policy: Policy) -> FoldParams:
    entry = _PARAMS.get(id(policy))
    if entry is not None and entry[0] is policy:
        return entry[1]
    if len(_PARAMS) >= 64:  # policies are few and long-lived; tests make many
        _PARAMS.clear()
    params = FoldParams(policy)
    _PARAMS[id(policy)] = (policy, params)
    return params


def event_ts(event: Any) -> float:
    """An event's time in seconds: a pack's usage event carries it (``packs.event_of``)."""
    if isinstance(event, UsageLite) and event.ts:
        return event.ts
    ts: float = event.occurred_at.timestamp()
    return ts


def is_duplicate(state: AccountState, source: str | None, offset: int, id_h: int) -> bool:
    """Seen before: a redelivered Kafka record (offset high-water) or a repeated event id
    (``id_h``: its ``id_hash``)."""
    if source is not None and offset <= state.hw.get(source, -1):
        return True
    return in_ring(state.ids, id_h)


def in_ring(ids: array[int], id_h: int) -> bool:
    """``id_h in ids``, as a search of the ring's bytes: array's own test makes an int
    object of every word it compares (~1.2 us for a full ring of 64, against ~0.3)."""
    if len(ids) < 8 or not 0 <= id_h < 1 << 64:
        return id_h in ids
    key = id_h.to_bytes(8, sys.byteorder)
    raw = ids.tobytes()
    at = raw.find(key)
    while at > 0 and at % 8:  # bytes that span two words are no word
        at = raw.find(key, at + 1)
    return at >= 0


def _remember(state: AccountState, source: str | None, offset: int, id_h: int,
              keep: int) -> None:
    """Note an applied record: its offset and, in a ring of ``keep``, its id's hash."""
    if source is not None:
        hw = state.hw
        if offset > hw.get(source, -1):
            hw[source] = offset
    if keep:
        ids = state.ids
        ids.append(id_h)
        overflow = len(ids) - keep
        if overflow > 0:
            del ids[:overflow]


def _track_types(state: AccountState, policy: Policy) -> None:
    """Make the state's per-type columns the policy's: a new policy keeps the counts of the
    types both track, starts the others at zero and drops the rest."""
    wanted = policy.tracked_types
    if state.types == wanted:
        return
    old = {name: BASE_COLUMNS + i for i, name in enumerate(state.types)}
    picks = [old.get(name) for name in wanted]
    for day, bucket in state.days.items():
        state.days[day] = bucket[:BASE_COLUMNS] + [bucket[i] if i is not None else 0
                                                   for i in picks]
    state.types = list(wanted)


def _bucket(state: AccountState, day: int) -> list[int]:
    days = state.days
    bucket = days.get(day)
    if bucket is None:
        bucket = [0] * (_BUCKET_WIDTH + len(state.types))
        late = bool(days) and day < next(reversed(days))
        days[day] = bucket
        if late:  # keep days in order: windows read the newest, prune drops the oldest
            state.days = dict(sorted(days.items()))
    return bucket


def _count_user(state: AccountState, day: int, user_id: str | None, today: int,
                params: FoldParams) -> None:
    """Distinct users per day stay exact for the grace window; older days are frozen."""
    if user_id is None or day < today - params.grace_days:
        return
    users = state.day_users.setdefault(day, [])
    h = _user_hash(user_id) & 0xFFFFFFFF
    if h not in users and len(users) < params.day_users:
        users.append(h)
        state.days[day][USERS] = len(users)


def apply_event(state: AccountState, event: Any, source: str | None, offset: int,
                policy: Policy, now: float) -> int | None:
    """Fold one canonical event into ``state``. Returns the day it touched, None if a duplicate."""
    return apply_event_at(state, event, event_ts(event), source, offset, policy,
                          fold_params(policy), now)


def apply_event_at(state: AccountState, event: Any, ts: float, source: str | None,
                   offset: int, policy: Policy, params: FoldParams, now: float) -> int | None:
    """``apply_event`` of an event whose time (``event_ts``) and policy's ``fold_params``
    the caller has at hand (a batch reads them once)."""
    id_h = id_hash(event.event_id)
    if is_duplicate(state, source, offset, id_h):
        return None
    _remember(state, source, offset, id_h, params.dedup_ids)
    if params.tracked or state.types:
        _track_types(state, policy)
    day = day_of(ts)
    if isinstance(event, UsageLite):  # the bulk of any stream: read natively when compiled
        _start(state, ts)
        bucket = _bucket(state, day)
        bucket[EVENTS] += 1
        kind = event.type
        d = event.data
        _use_event(state, bucket, day, kind, d.name, d.feature, d.count, event.user_id, ts,
                   now, params)
        return day
    kind = event.type
    if kind == "subscription_snapshot":  # a backfill fact, not activity: no bucket
        state.seq += 1
        _apply_snapshot(state, event, ts)
        return day
    if kind == "account_traits":  # the account's attributes, not activity: no bucket
        state.seq += 1
        apply_traits(state.attributes, state.attribute_times, event.data.traits, ts,
                     policy.accounts.traits)
        return day
    _start(state, ts)
    bucket = _bucket(state, day)
    bucket[EVENTS] += 1
    family = family_of(kind)
    if family == "usage":
        # (not ``d``: the compiled build would take it for the UsageDataLite above)
        data: Any = event.data
        _use_event(state, bucket, day, kind, data.name, data.feature, data.count,
                   event.user_id, ts, now, params)
    elif family == "billing":
        bucket[BILLING] += 1
        _apply_billing(state, event, ts)
    else:
        bucket[SUPPORT] += 1
        _apply_support(state, event, ts, policy)
    return day


def _start(state: AccountState, ts: float) -> None:
    """An activity event applied at ``ts``: counted, and the account's span widened."""
    state.seq += 1
    if not state.first_seen or ts < state.first_seen:
        state.first_seen = ts
    if ts > state.last_event:
        state.last_event = ts


def _use_event(state: AccountState, bucket: list[int], day: int, kind: str,
               name: str | None, feature: str | None, count: int, user_id: str | None,
               ts: float, now: float, params: FoldParams) -> None:
    if kind == "session":
        bucket[SESSIONS] += 1
    # An event without a name (a canonical session, say) goes by its type.
    _use(state, bucket, day, name or kind, feature, count, ts, ts, kind == "activation",
         params)
    _count_user(state, day, user_id, day_of(now), params)


def _use(state: AccountState, bucket: list[int], day: int, name: str | None,
         feature: str | None, count: int, first_ts: float, last_ts: float, activation: bool,
         params: FoldParams) -> None:
    """Usage of one name on one day: a single event, or all of a day's events of that name
    folded at once (``fold_day``); both give the same state."""
    bucket[USAGE] += count
    if last_ts > state.last_active:
        state.last_active = last_ts
    if feature:
        features = state.features
        last = features.get(feature)
        if last is None:
            if len(features) < params.features:
                features[feature] = day
        elif day > last:
            features[feature] = day
    key_events = params.key_events
    columns = params.type_columns
    names = params.activation_events
    if not (key_events or columns or names):
        if activation and state.activated_at is None:
            state.activated_at = first_ts
        return
    lowered = (name or "").lower()
    feature_lowered = (feature or "").lower()
    if key_events and (lowered in key_events or feature_lowered in key_events):
        bucket[KEY] += count
    if columns:
        column = columns.get(lowered)
        if column is None:
            column = columns.get(feature_lowered)
        if column is not None:
            bucket[column] += count
    if state.activated_at is None and (activation or (names and lowered in names)):
        state.activated_at = first_ts


@dataclass(slots=True)
class DayUsage:
    """One account's usage events of one day, already counted (a warehouse export read by
    ``history.warehouse_days``): folding it equals folding its events one by one, in time
    order, apart from the dedup ring (warehouse rows have no identity to dedup by)."""

    account_id: str
    occurred_at: datetime  # its first event: where it sorts among other events
    last_ts: float
    events: int
    kinds: list[tuple[str, int, float, float]]  # (name, count, first ts, last ts), by first ts
    users: list[str]  # distinct user ids of the day (at most policy.limits.day_users)


def fold_day(state: AccountState, usage: DayUsage, now: float, policy: Policy) -> int:
    """Fold a day's counted usage into ``state``; returns the day."""
    first_ts = usage.occurred_at.timestamp()
    day = day_of(first_ts)
    params = fold_params(policy)
    if params.tracked or state.types:
        _track_types(state, policy)
    state.seq += usage.events
    if not state.first_seen or first_ts < state.first_seen:
        state.first_seen = first_ts
    state.last_event = max(state.last_event, usage.last_ts)
    bucket = _bucket(state, day)
    bucket[EVENTS] += usage.events
    for name, count, kind_first, kind_last in usage.kinds:
        _use(state, bucket, day, name, name, count, kind_first, kind_last, False, params)
    today = day_of(now)
    for user in usage.users:
        _count_user(state, day, user, today, params)
    return day


def _apply_billing(state: AccountState, event: Any, ts: float) -> None:
    t, d = event.type, event.data
    # Billing relays often key by customer or not at all, so these may arrive out of order:
    # only the newest payment event decides whether the provider is still retrying.
    if t in ("payment_failed", "charge_failed"):
        if ts not in state.failed_payments:
            # a failure that a later payment already settled still counts as history
            state.failed_payments = sorted([*state.failed_payments, ts])[-FAILURES_KEPT:]
        if ts <= state.paid_at:
            return
        if t == "payment_failed" and ts >= state.payment_seen_at:
            state.retry_pending = d.next_attempt_at is not None
        state.payment_seen_at = max(state.payment_seen_at, ts)
    elif t == "invoice_paid":
        state.paid_at = max(state.paid_at, ts)
        if ts >= state.payment_seen_at:
            state.retry_pending = False
        state.payment_seen_at = max(state.payment_seen_at, ts)
    elif t in ("card_expiring", "payment_method_updated"):
        if d.expires_at is not None:
            state.card_expires_at = d.expires_at.timestamp()
    elif t.startswith("subscription_") or t == "trial_will_end":
        # Subscription events carry the full object: only a newer one may overwrite.
        if ts < state.sub_seen_at:
            return
        state.sub_seen_at = ts
        ended = d.status == "canceled" or (d.status is None and t == "subscription_deleted")
        if d.status is not None or ended:
            # Decided afresh by each subscription event: a reactivated account that later
            # cancels of its own accord is not involuntary because of an earlier ending.
            state.involuntary_end = ended and bool(
                open_failures(state, ts) or d.cancellation_reason in _INVOLUNTARY)
            state.sub_status = d.status or state.sub_status
        if t == "subscription_paused":
            state.sub_status = "paused"
        elif t == "subscription_resumed" and state.sub_status == "paused":
            state.sub_status = "active"
        state.plan = d.plan or state.plan
        state.seats = d.seats if d.seats is not None else state.seats
        if d.mrr_cents is not None and t != "subscription_deleted":
            state.mrr_cents = d.mrr_cents
            state.mrr_peak.append([float(day_of(ts)), float(d.mrr_cents)])
            del state.mrr_peak[:-12]
        if d.cancel_at_period_end is not None:
            state.cancel_at_period_end = d.cancel_at_period_end
        state.period_end = d.current_period_end.timestamp() if d.current_period_end else None
        state.pause_resumes_at = (
            d.pause_resumes_at.timestamp() if d.pause_resumes_at else None
        )


def _apply_snapshot(state: AccountState, event: Any, ts: float) -> None:
    """A subscription as a backfill saw it at ``ts``: it seeds status, plan and MRR like a
    subscription event of that time, so a newer live event wins and an older one (applied
    before or after it) does not undo it."""
    d = event.data
    ended = d.ended_at is not None and d.ended_at.timestamp() <= ts
    # Scored at its subscription's own last moment: an import of long-ended subscriptions
    # is history, never live enough to page anyone.
    state.last_event = max(state.last_event, d.ended_at.timestamp() if ended else ts)
    if not state.first_seen or ts < state.first_seen:
        state.first_seen = ts
    if ts < state.sub_seen_at:
        return
    state.sub_seen_at = ts
    status = "canceled" if ended else d.status
    if status == "canceled":
        state.involuntary_end = d.cancellation_reason in _INVOLUNTARY
        # A cancellation the import reports is past news: mark it as already alerted on.
        state.alert_band = "critical"
    state.sub_status = status
    state.plan = d.plan or state.plan
    state.mrr_cents = d.mrr_cents
    state.mrr_peak.append([float(day_of(ts)), float(d.mrr_cents)])
    del state.mrr_peak[:-12]
    state.cancel_at_period_end = d.cancel_at_period_end and not ended
    period_end = d.current_period_end or (d.ended_at if not ended else None)
    state.period_end = period_end.timestamp() if period_end is not None else None
    state.pause_resumes_at = None


_INVOLUNTARY = ("payment_failed", "payment_disputed")
FAILURES_KEPT = 16  # failed attempts remembered (Stripe makes at most ~8 per invoice)


def open_failures(state: AccountState, now: float) -> list[float]:
    """Failed attempts no later payment settled, in the 30 days before ``now``."""
    since = max(state.paid_at, now - 30 * DAY)
    return [t for t in state.failed_payments if t > since]


def _apply_support(state: AccountState, event: Any, ts: float, policy: Policy) -> None:
    t, d = event.type, event.data
    if t in ("ticket_opened", "ticket_updated", "ticket_reopened"):
        if d.ticket_id in state.open_tickets or len(state.open_tickets) < policy.limits.open_tickets:
            state.open_tickets[d.ticket_id] = _PRIORITY_LEVEL.get(d.priority or "normal", 0)
        if t == "ticket_reopened":
            state.reopened.append(ts)
    elif t == "ticket_solved":
        state.open_tickets.pop(d.ticket_id, None)
        if d.resolution_s is not None and d.resolution_s > policy.limits.slow_resolution_hours * 3600:
            state.slow_resolutions.append(ts)
    elif t == "satisfaction_rating":
        if d.csat == "bad":
            state.bad_csat_at = max(ts, state.bad_csat_at or 0.0)
    elif t == "nps_response" and d.score is not None and ts >= (state.nps_at or 0.0):
        state.nps, state.nps_at = d.score, ts


def generic_activation(state: AccountState, policy: Policy) -> bool:
    """Activation by the generic rule: enough active days and distinct users, whatever the
    product's event names (used when the policy names no milestone events)."""
    ob = policy.onboarding
    days = state.days.values()
    # Both counts only grow day by day, so over all days is the same test as at the first
    # day both are met. Users first, in C (max()); prune asks this of every account not
    # activated yet, every batch.
    if not days or max(map(_users_of, days)) < ob.min_active_users:
        return False
    active = 0
    for b in days:
        if b[USAGE] or b[SESSIONS]:
            active += 1
            if active >= ob.min_active_days:
                return True
    return False


def prune(state: AccountState, now: float, policy: Policy) -> None:
    """Forget what fell out of the horizon, so state stays bounded; note a generic
    activation once reached (scoring then need not recount it every time)."""
    # Cheap tests first: this runs for every account of every pack, and most accounts
    # have nothing to prune (min() runs in C; the comprehensions only when needed).
    if (state.activated_at is None and not policy.onboarding.activation_events
            and len(state.days) >= policy.onboarding.min_active_days
            and generic_activation(state, policy)):
        state.activated_at = now
    today = day_of(now)
    oldest = today - policy.windows.horizon_days
    days = state.days
    while days and (first := next(iter(days))) < oldest:  # days are in order: oldest first
        del days[first]
    grace = today - policy.windows.grace_days
    if state.day_users and min(state.day_users) < grace:
        for d in [d for d in state.day_users if d < grace]:
            del state.day_users[d]
    month_ago = now - 30 * DAY
    horizon_ago = now - policy.windows.horizon_days * DAY
    if state.failed_payments and min(state.failed_payments) < horizon_ago:
        state.failed_payments = [t for t in state.failed_payments if t >= horizon_ago]
    if state.reopened:
        state.reopened = [t for t in state.reopened if t >= month_ago]
    if state.slow_resolutions:
        state.slow_resolutions = [t for t in state.slow_resolutions if t >= month_ago]
    if state.mrr_peak:
        state.mrr_peak = [p for p in state.mrr_peak if p[0] >= oldest]
    if state.features and min(state.features.values()) < oldest:
        for name in [n for n, d in state.features.items() if d < oldest]:
            del state.features[name]
