"""Billing and support rows read their events' data without getattr's exception path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings

from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.stream.rows import _field
from tests import strategies

NOW = 1_764_000_000.0
# Every field of an event's data that stream.rows reads through _field.
READ = ("ticket_id", "status", "priority", "channel", "first_response_s", "resolution_s",
        "csat", "score", "plan", "cancel_at_period_end", "invoice_id", "amount_cents",
        "attempt_count", "currency", "previous_mrr_cents", "cancellation_reason")


def _same_as_getattr(raw: bytes) -> None:
    result = decode(raw, DecodeOptions(), NOW)
    event: Any = getattr(result, "event", None)
    if event is None:
        return
    for name in READ:
        for default in (None, "", False):
            assert _field(event.data, name, default) == getattr(event.data, name, default), (
                event.type, name)


@settings(max_examples=300, deadline=None)
@given(strategies.payload_bytes("billing", NOW))
def test_a_stripe_event_reads_as_getattr_would(raw: bytes) -> None:
    _same_as_getattr(raw)


@settings(max_examples=300, deadline=None)
@given(strategies.payload_bytes("support", NOW))
def test_a_zendesk_event_reads_as_getattr_would(raw: bytes) -> None:
    _same_as_getattr(raw)


@pytest.mark.parametrize("data", [object(), 3, "text"])
def test_data_without_a_dict_falls_back_to_getattr(data: object) -> None:
    assert _field(data, "status", "none") == getattr(data, "status", "none")
