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
from churnsignal.stream.policy import Policy
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


def test_the_written_out_field_reads_and_clone_cover_every_field() -> None:
    state = _examples()[0]
    state.mrr_peak, state.hw, state.types = [[1.0, 900.0]], {"u/0": 19}, ["trial_started"]
    state.attribute_times, state.reopened, state.slow_resolutions = {"a": 1.0}, [2.0], [3.0]
    names = [f.name for f in dataclasses.fields(AccountState)]
    assert list(state.fields_dict()) == names  # in field order: the stored JSON keeps it
    assert state.fields_dict() == {name: getattr(state, name) for name in names}
    copy = state.clone()
    assert copy.fields_dict() == state.fields_dict()
    shared = {id(c) for c in _containers(list(state.fields_dict().values()))[1:]}
    assert not shared & {id(c) for c in _containers(list(copy.fields_dict().values()))[1:]}
    assert copy.to_bytes() == state.to_bytes()
