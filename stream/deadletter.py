"""Dead-letter records: one builder for every step, so every record carries every header (pure).

A record's value is what failed, as bytes: at the ingest, the original key and bytes of the
source record; in the state agent (which sees only canonical events in packs), the one
canonical event that failed, as JSON. The headers say why and where it came from; the
``dlq_topic``/``dlq_partition``/``dlq_offset`` headers always name the *source* record
(for events folded by the state agent, the source topic partition and offset carried in
the pack), so a consumer can filter and replay on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from churnsignal.schemas.results import Rejected

DETAIL_BYTES = 500  # dlq_detail is cut here (UTF-8 bytes)

# The steps a record can fail at (``dlq_step``).
STEPS = frozenset({"decode", "ingest", "state", "identity", "sink", "gateway"})


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record for the dead-letter topic."""

    reason: str  # machine-readable, from the README's list
    detail: str  # human-readable
    step: str  # one of STEPS
    topic: str  # where the failed record came from (source topic, or the route for gateway)
    partition: int | None = None
    offset: int | None = None
    timestamp_ms: int | None = None  # the source record's timestamp, when known
    key: bytes | None = None
    value: bytes | None = None
    extra: tuple[tuple[str, bytes], ...] = field(default=())  # e.g. dlq_table for the sink

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers: the same set, in the same order, from every step."""
        return [
            ("dlq_reason", self.reason.encode()),
            ("dlq_detail", self.detail.encode("utf-8", "replace")[:DETAIL_BYTES]),
            ("dlq_step", self.step.encode()),
            ("dlq_topic", self.topic.encode("utf-8", "replace")),
            ("dlq_partition", _text(self.partition)),
            ("dlq_offset", _text(self.offset)),
            ("dlq_timestamp", _text(self.timestamp_ms)),
            *self.extra,
        ]


def _text(value: int | None) -> bytes:
    return b"" if value is None else str(value).encode()


def rejected(result: Rejected, topic: str, partition: int, offset: int,
             timestamp_ms: int | None, key: bytes | None, value: bytes | None) -> DeadLetter:
    """A record the decoder rejected, with its original key and bytes."""
    return DeadLetter(result.reason, result.detail, "decode", topic, partition, offset,
                      timestamp_ms, key, value)


def headers(result: Rejected, topic: str, partition: int, offset: int,
            timestamp_ms: int | None) -> list[tuple[str, bytes]]:
    """Kafka headers of a decode rejection (kept for callers that send the bytes themselves)."""
    return rejected(result, topic, partition, offset, timestamp_ms, None, None).headers()


def source_of(source: str | None) -> tuple[str, int | None]:
    """A pack item's source ``"topic/partition"`` as (topic, partition)."""
    if not source:
        return "", None
    topic, _, partition = source.rpartition("/")
    try:
        return topic, int(partition)
    except ValueError:
        return source, None
