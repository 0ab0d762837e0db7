"""Dataclasses whose ``__init__`` is written out (mypyc compiles it; setup.py) still take
every field, by position in field order and by name, with the fields' defaults."""

from __future__ import annotations

import dataclasses
from array import array
from datetime import UTC, datetime
from typing import Any

import pytest

from churnsignal.schemas.usage_lite import UsageDataLite, UsageLite
from churnsignal.stream import packs
from churnsignal.stream.engine import Outcome, apply_batch
from churnsignal.stream.policy import BASE_COLUMNS, Policy
from churnsignal.stream.reasons import Reason, Score
from churnsignal.stream.state import AccountState
from tests.unit.test_fold import NOW, usage


def _examples() -> list[Any]:
    state = apply_batch(None, "acme", [("u/0", n, packs.event_of(usage(n, n % 5)))
                                       for n in range(20)], NOW, Policy()).state
    state.failed_payments, state.open_tickets, state.attributes = [1.0], {"t": 1}, {"a": "b"}
    reason = Reason("inactivity", 3.0, 12.5, "voluntary", "csm_check_in", "3 days")
    data = UsageDataLite("Report Exported", "reports", 2)
    return [state, reason, Score(12.5, "low", (reason,)), data,
            UsageLite("e-1", "acme", "track", "u1", datetime(2026, 1, 2, tzinfo=UTC), data,
                      1, "2026-01-02T00:00:00Z"),
            Outcome(state, 1, 2, 1, {5}, None, True, None, [], "newest")]


@pytest.mark.parametrize("example", _examples(), ids=lambda e: type(e).__name__)
def test_a_written_out_init_takes_every_field_by_position_and_by_name(example: Any) -> None:
    cls = type(example)
    names = [f.name for f in dataclasses.fields(cls)]
    values = [getattr(example, name) for name in names]
    for built in (cls(*values), cls(**dict(zip(names, values, strict=True)))):
        assert [getattr(built, name) for name in names] == values
        # the very containers passed (numbers may be unboxed and boxed again when compiled)
        assert all(getattr(built, n) is v for n, v in zip(names, values, strict=True)
                   if isinstance(v, list | dict | set | tuple))


@pytest.mark.parametrize("cls", [AccountState, Outcome, UsageLite])
def test_a_written_out_init_gives_the_fields_defaults(cls: type) -> None:
    required = {AccountState: ("acme",), Outcome: (AccountState("acme"),),
                UsageLite: ("e-1", "acme", "track", None, datetime(2026, 1, 2, tzinfo=UTC),
                            UsageDataLite(None, None, 1))}[cls]
    first, second = cls(*required), cls(*required)
    for f in dataclasses.fields(cls)[len(required):]:
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(first, f.name) == f.default_factory(), f.name
            assert getattr(first, f.name) is not getattr(second, f.name), f.name  # not shared
        else:
            assert getattr(first, f.name) == f.default, f.name


def _containers(value: Any) -> list[Any]:
    """The mutable containers in a field's value, nested ones too."""
    if isinstance(value, dict):
        return [value, *(c for v in value.values() for c in _containers(v))]
    if isinstance(value, list):
        return [value, *(c for v in value for c in _containers(v))]
    if isinstance(value, array):
        return [value]
    return []


def test_the_written_out_clone_covers_every_field() -> None:
    state = _examples()[0]
    state.mrr_peak, state.hw, state.types = [[1.0, 900.0]], {"u/0": 19}, ["trial_started"]
    state.attribute_times, state.reopened, state.slow_resolutions = {"a": 1.0}, [2.0], [3.0]
    names = [f.name for f in dataclasses.fields(AccountState)]

    def fields(of: AccountState) -> list[Any]:
        return [getattr(of, name) for name in names]

    copy = state.clone()
    assert fields(copy) == fields(state)
    shared = {id(c) for c in _containers(fields(state))[1:]}
    assert not shared & {id(c) for c in _containers(fields(copy))[1:]}
    assert copy.to_bytes() == state.to_bytes()


# A value other than the default for every stored field but the key (the test below checks
# that this covers them all, so a new field fails it until it is here).
_NOT_DEFAULT: dict[str, Any] = {
    "seq": 7, "first_seen": 1.5, "last_active": 2.5, "last_event": 3.5,
    "days": {20_000: [1, 2, 0, 1, 0, 0, 0], 20_001: [3, 3, 1, 1, 0, 0, 1]},
    "day_users": {20_001: [11, 12]}, "features": {"reports": 20_001}, "activated_at": 0.0,
    "sub_status": "active", "sub_seen_at": 4.5, "plan": "pro", "seats": 0, "mrr_cents": 4_900,
    "mrr_peak": [[20_000.0, 4_900.0]], "cancel_at_period_end": True, "period_end": 0.0,
    "pause_resumes_at": 0.0, "failed_payments": [5.5], "retry_pending": True,
    "payment_seen_at": 6.5, "paid_at": 7.5, "card_expires_at": 0.0, "involuntary_end": True,
    "open_tickets": {"t1": 1}, "reopened": [8.5], "slow_resolutions": [9.5],
    "bad_csat_at": 0.0, "nps": 0, "nps_at": 0.0, "hw": {"usage/0": 0},
    "ids": array("Q", [1, 2**63]), "score": 0.25, "band": "high", "alert_band": "medium",
    "last_alert_at": 10.5, "alerts": 2, "scored_at": 11.5, "policy": "v2",
    "types": ["export"], "ack_band": "high", "ack_until": 12.5,
    "attributes": {"tier": "gold"}, "attribute_times": {"tier": 13.5},
}


def test_every_field_survives_the_round_trip_on_its_own() -> None:
    """``to_bytes`` writes only what differs from a new state's defaults (a written-out
    list): each field set on its own (0 and 0.0 where the default is None) reads back."""
    names = [f.name for f in dataclasses.fields(AccountState)]
    assert set(_NOT_DEFAULT) == set(names) - {"account_id", "last_row"}
    assert all(len(bucket) == BASE_COLUMNS for bucket in _NOT_DEFAULT["days"].values())
    blank = AccountState("acme")
    assert AccountState.from_bytes(blank.to_bytes()) == blank
    for name, value in _NOT_DEFAULT.items():
        state = AccountState("acme")
        assert getattr(state, name) != value, name
        setattr(state, name, value)
        back = AccountState.from_bytes(state.to_bytes())
        assert back == state, name
        assert type(getattr(back, name)) is type(value), name
    # all at once (a tracked type is a bucket column more)
    every = AccountState("acme", **{**_NOT_DEFAULT, "days": {
        d: [*b, n] for n, (d, b) in enumerate(_NOT_DEFAULT["days"].items())}})
    assert AccountState.from_bytes(every.to_bytes()) == every
    # what the last score row said is held in memory only: read back, a state has none
    every.last_row = (10, "low", (), 0, None, None, "v2")
    assert AccountState.from_bytes(every.to_bytes()).last_row is None
