"""The gateway's per-message shortcuts (found by profiling `churnsignal bench --gateway`) give
exactly what the long way gives: record keys, partitions, times."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from churnsignal.gateway import segment_api
from churnsignal.gateway.producer import CachedPartitioner
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Rejected

OPTS = DecodeOptions(max_age_s=float("inf"))
ids = st.one_of(st.none(), st.text(min_size=0, max_size=12), st.integers(-5, 10**6),
                st.sampled_from(["~segment:user:u1", "acme", " ", "0"]))


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    call = draw(st.sampled_from(["track", "page", "screen", "identify", "group"]))
    message: dict[str, Any] = {"type": call, "userId": draw(ids), "anonymousId": draw(ids)}
    if call == "track":
        message["event"] = draw(st.sampled_from(["Logged In", "Reports Viewed", "x"]))
    if call == "group":
        message["groupId"] = draw(ids)
    depth = draw(st.sampled_from([0, 0, 0, 3, 253, 254, 255, 300]))
    if draw(st.booleans()):  # without one, a message too deep to hash is refused earlier
        message["messageId"] = "m-1"
    if depth:  # around the 254 levels orjson writes (it reads 1024)
        blob: dict[str, Any] = {}
        for _ in range(depth - 2):
            blob = {"x": blob}
        message["properties"] = {"blob": blob}
    for where in draw(st.lists(st.sampled_from(["context", "properties", "traits"]),
                               max_size=3)):
        account = draw(ids)
        if where == "context":
            message["context"] = {"groupId": account}
        elif where == "properties":
            message.setdefault("properties", {})["account_id"] = account
        else:
            message.setdefault("context", {})["traits"] = {"company": {"id": account}}
    return message


@hsettings(max_examples=300, deadline=None)
@given(messages())
def test_the_key_of_an_accepted_message_is_what_record_key_finds(message: dict[str, Any]
                                                                  ) -> None:
    now = time.time()
    result = segment_api.check(message, 32_768, now, None, OPTS)
    if isinstance(result, segment_api.Record):
        assert result.key == segment_api.record_key(orjson.loads(result.value))
        # the gateway decoded the dict; the worker decodes these bytes: never a rejection
        assert not isinstance(decode(result.value, OPTS, now, "segment"), Rejected), result


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.integers(1, 64))
def test_the_cached_partitioner_is_the_default_one(key: bytes, partitions: int) -> None:
    cached, default = CachedPartitioner(), DefaultPartitioner()
    every = list(range(partitions))
    assert cached(key, every, every) == default(key, every, every)
    assert cached(key, every, every) == default(key, every, every)  # from the cache
    assert cached(None, every, every) in every


def test_times_are_formatted_and_parsed_once_per_request_with_the_same_result() -> None:
    now = time.time()
    sent = "2026-01-01T00:00:05Z"
    first = segment_api.normalise({"timestamp": "2026-01-01T00:00:00Z"}, now, sent)
    second = segment_api.normalise({"timestamp": "2026-01-01T00:00:01Z"}, now, sent)
    assert first["receivedAt"] == second["receivedAt"] == segment_api.iso(now)
    assert abs(segment_api.parse_time(first["timestamp"]) - (now - 5)) < 0.002  # type: ignore[operator]
    assert abs(segment_api.parse_time(second["timestamp"]) - (now - 4)) < 0.002  # type: ignore[operator]
    assert segment_api.normalise({}, now, 12345)["timestamp"] == segment_api.iso(now)


@hsettings(max_examples=2000, deadline=None)
@given(st.one_of(st.floats(-62_135_596_000.0, 253_402_300_000.0, allow_nan=False),
                 st.integers(0, 4_000_000_000).map(lambda ms: ms / 1000),
                 st.integers(0, 4_000_000_000_000).map(lambda us: us / 1e6),
                 st.floats(1.7e9, 1.8e9)))
def test_iso_is_datetimes_own_millisecond_format(seconds: float) -> None:
    from datetime import UTC, datetime
    long_way = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    assert segment_api.iso(seconds) == long_way.replace("+00:00", "Z")


def test_a_message_too_deep_for_orjson_to_write_is_refused_not_written_as_null() -> None:
    # orjson reads 1024 levels but writes 254: the decoder reads the dict, so the bytes
    # written must be checked to exist (a review found b"null" written to usage.events)
    deep: dict[str, Any] = {}
    leaf = deep
    for _ in range(300):
        leaf["x"] = {}
        leaf = leaf["x"]
    message = {"type": "track", "event": "Report Exported", "userId": "u1", "messageId": "m-1",
               "timestamp": "2026-11-20T10:00:00Z", "context": {"groupId": "acme"},
               "properties": {"feature": "reports", "blob": deep}}
    result = segment_api.check(message, 32_768, time.time(), None, OPTS)
    assert isinstance(result, segment_api.Invalid) and result.reason == "invalid", result
    assert result.value.startswith(b'{"type":"track"')  # the dead letter keeps the message
