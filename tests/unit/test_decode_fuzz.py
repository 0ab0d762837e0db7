"""Property-based decoding of provider-shaped payloads and their one-leaf mutants.

The strategies (tests/strategies.py) build payloads as Stripe, Segment and Zendesk document
them, so the mutants reach the adapters' code, not just the JSON parser.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from churnsignal.schemas.decode import REJECT_REASONS, SKIP_REASONS, DecodeOptions, Source, decode
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.schemas.identity import MAX_ID, PREFIX
from churnsignal.schemas.results import Accepted, Decoded, Rejected, Skipped
from tests import strategies

NOW = 1_764_000_000.0
OPTS = DecodeOptions()
PINNED: dict[str, Source] = {"billing": "stripe", "usage": "segment", "support": "zendesk"}
VALID = 300      # per topic
MUTANTS = 700    # per topic; each decoded four times (auto and pinned, twice each)


def _revalidates(event: Any) -> None:
    """What the ingest does with an event (JSON for the pack) reads back as the same event."""
    dumped = event.model_dump(mode="json", exclude_none=True)
    again = EVENT_ADAPTER.validate_python(orjson.loads(orjson.dumps(dumped)))
    # (a usage event may be the fast path's UsageLite: compared by what it dumps)
    assert again.model_dump(mode="json", exclude_none=True) == dumped


def _event_id(result: Decoded) -> str | None:
    event = getattr(result, "event", None)
    return event.event_id if event is not None else None


def check(raw: bytes, source: Source = "auto") -> Decoded:
    """The invariants every decoded message keeps, whatever its bytes."""
    result = decode(raw, OPTS, NOW, source)
    assert isinstance(result, Accepted | Skipped | Rejected), result
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS, result
        assert isinstance(result.detail, str) and len(result.detail) <= 300
    else:
        if isinstance(result, Skipped):
            assert result.reason in SKIP_REASONS, result
            assert result.event is None or result.reason == "too_old"
        if result.event is not None:
            _revalidates(result.event)
        for key, target in result.links:
            assert key.startswith(PREFIX) and len(key) <= len(PREFIX) + MAX_ID + 20
            assert isinstance(target, str) and target
    again = decode(raw, OPTS, NOW, source)
    assert type(again) is type(result) and _event_id(again) == _event_id(result), (result, again)
    return result


def _valid(topic: str, raw: bytes) -> None:
    for source in ("auto", PINNED[topic]):
        result = check(raw, source)
        assert not isinstance(result, Rejected), (result, raw[:500])


def _mutant(topic: str, raw: bytes) -> None:
    check(raw)
    check(raw, PINNED[topic])


@settings(max_examples=VALID, deadline=None)
@given(strategies.payload_bytes("billing", NOW))
def test_documented_stripe_events_are_accepted_or_skipped(raw: bytes) -> None:
    _valid("billing", raw)


@settings(max_examples=VALID, deadline=None)
@given(strategies.payload_bytes("usage", NOW))
def test_documented_segment_calls_are_accepted_or_skipped(raw: bytes) -> None:
    result = check(raw)
    assert not isinstance(result, Rejected), (result, raw[:500])
    if b'"event_id"' not in raw:  # canonical events share the topic, not the pinned source
        _valid("usage", raw)


@settings(max_examples=VALID, deadline=None)
@given(strategies.payload_bytes("support", NOW))
def test_documented_zendesk_payloads_are_accepted_or_skipped(raw: bytes) -> None:
    _valid("support", raw)


@settings(max_examples=MUTANTS, deadline=None)
@given(strategies.mutants("billing", NOW))
def test_stripe_mutants_never_escape_decode(raw: bytes) -> None:
    _mutant("billing", raw)


@settings(max_examples=MUTANTS, deadline=None)
@given(strategies.mutants("usage", NOW))
def test_segment_mutants_never_escape_decode(raw: bytes) -> None:
    _mutant("usage", raw)


@settings(max_examples=MUTANTS, deadline=None)
@given(strategies.mutants("support", NOW))
def test_zendesk_mutants_never_escape_decode(raw: bytes) -> None:
    _mutant("support", raw)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_mutant_differs_from_its_payload_in_one_place(data: st.DataObject) -> None:
    payload = data.draw(strategies.payloads(data.draw(st.sampled_from(strategies.TOPICS)), NOW))
    raw = data.draw(strategies.mutate(payload))
    assert raw != orjson.dumps(payload)


def test_mutants_reach_the_adapters() -> None:
    """The mutants are not all stopped at the parser: most still parse and reach an adapter,
    which accepts many and rejects or skips others, for every topic. Also checks ``sample``,
    the entry point an integration test uses."""
    for topic in strategies.TOPICS:
        raws = strategies.sample(strategies.mutants(topic, NOW), 150, seed=1)
        assert len(raws) == 150 and all(isinstance(r, bytes) for r in raws)
        seen = Counter(type(r).__name__ if isinstance(r, Accepted) else r.reason
                       for r in map(check, raws))
        adapters = {"Accepted", "invalid", *SKIP_REASONS}
        assert sum(n for k, n in seen.items() if k in adapters) > 100, (topic, seen)
        assert seen["Accepted"] > 30, (topic, seen)
        assert sum(n for k, n in seen.items() if k in adapters - {"Accepted"}) > 5, (topic, seen)
