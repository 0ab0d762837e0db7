"""Packs: the batched consumer's output, one message per internal partition per batch (pure).

A pack carries the decoded events of many accounts that share an internal partition, so Faust
pays its per-message cost once per pack instead of once per event.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

MAX_PACK_ITEMS = 2000  # keeps a pack well under Kafka's default 1 MB message limit


@lru_cache(maxsize=1 << 18)
def partition_for(account_id: str, partitions: int) -> int:
    """Account -> partition, exactly as Kafka's default partitioner places the key.

    The state table's changelog is written with the producer's partitioner, so the pack
    holding an account's events and the changelog holding its state share a partition.
    """
    return (murmur2(account_id.encode()) & 0x7FFFFFFF) % partitions


def encode(now: float, items: list[list[Any]]) -> bytes:
    """items: [source "topic/partition", offset, canonical event dict]."""
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
