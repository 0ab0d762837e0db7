"""Packs: the batched consumer's output, one message per internal partition per batch (pure).

A pack carries the decoded events of many accounts that share an internal partition, so Faust
pays its per-message cost once per pack instead of once per event.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

from churnsignal.schemas.events import EVENT_ADAPTER, SCHEMA_VERSION, USAGE_TYPE_SET
from churnsignal.schemas.usage_lite import UsageDataLite, UsageLite

MAX_PACK_ITEMS = 2000  # keeps a pack well under Kafka's default 1 MB message limit


@lru_cache(maxsize=1 << 18)
def partition_for(account_id: str, partitions: int) -> int:
    """Account -> partition, exactly as Kafka's default partitioner places the key.

    The state table's changelog is written with the producer's partitioner, so the pack
    holding an account's events and the changelog holding its state share a partition.
    """
    hashed: int = murmur2(account_id.encode())  # aiokafka leaves murmur2 unannotated
    return (hashed & 0x7FFFFFFF) % partitions


# A fourth element on an item marks history: a billing or support event older than the
# horizon, whose facts are written as rows but which never changes an account's state.
HISTORY = 1
# Control items, never events: a request to forget an account or a user (``churnsignal
# forget``, produced straight to the ingested topic so it is ordered after what is already
# there), and the worker's confirmation that it was carried out (read by the command).
FORGET = 2
FORGOTTEN = 3
# An acknowledgement or snooze of an account's alerts (POST /api/accounts/ID/ack|snooze),
# produced to the account's partition and folded into its state in order with its events.
ACK = 4


def control_item(marker: int, body: dict[str, Any]) -> list[Any]:
    """A FORGET, FORGOTTEN or ACK item: no source, no offset (nothing to dedup it by)."""
    return [None, -1, body, marker]


def is_control(item: list[Any]) -> bool:
    return len(item) > 3 and item[3] in (FORGET, FORGOTTEN, ACK)


def encode(now: float, items: list[list[Any]]) -> bytes:
    """items: [source "topic/partition", offset, canonical event dict(, HISTORY)]."""
    return orjson.dumps({"now": now, "items": items})


def encode_tick(now: float) -> bytes:
    return orjson.dumps({"now": now, "tick": True})


def decode(raw: bytes) -> dict[str, Any]:
    pack: dict[str, Any] = orjson.loads(raw)
    return pack


def is_tick(raw: bytes) -> bool:
    return raw.endswith(b'"tick":true}')  # encode_tick's bytes; orjson keeps key order


def merge(decoded: list[dict[str, Any]]) -> dict[str, Any]:
    """Consecutive packs of one partition as one (items in order, the newest wall clock)."""
    if len(decoded) == 1:
        return decoded[0]
    items: list[Any] = []
    for pack in decoded:
        items.extend(pack["items"])
    return {"now": decoded[-1]["now"], "items": items}


def chunks(items: list[list[Any]], size: int = MAX_PACK_ITEMS) -> Iterator[list[list[Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def event_of(data: dict[str, Any]) -> Any:
    """A pack item's canonical event. The ingest validated every event before packing it and
    is the only writer of the ingested topic, so usage events (the bulk of any stream) are
    rebuilt without validating them again (a fifth of the cost of the agent's folding);
    billing and support events, few and read field by field into rows, are validated
    into their models."""
    if (data.get("type") in USAGE_TYPE_SET
            and data.get("schema_version", SCHEMA_VERSION) == SCHEMA_VERSION):
        d = data.get("data") or {}
        at = datetime.fromisoformat(data["occurred_at"])
        return UsageLite(data["event_id"], data["account_id"], data["type"],
                         data.get("user_id"), at,
                         UsageDataLite(d.get("name"), d.get("feature"), d.get("count", 1)),
                         SCHEMA_VERSION, None, at.timestamp())
    return EVENT_ADAPTER.validate_python(data)
