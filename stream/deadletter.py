"""Dead-letter records: original key and bytes, plus headers that say why and where from."""

from __future__ import annotations

from churnsignal.schemas.results import Rejected


def headers(rejected: Rejected, topic: str, partition: int, offset: int,
            timestamp_ms: int | None) -> list[tuple[str, bytes]]:
    """Kafka headers of a DLQ record; consumers can filter and replay on them."""
    return [
        ("dlq_reason", rejected.reason.encode()),
        ("dlq_detail", rejected.detail.encode("utf-8", "replace")[:500]),
        ("dlq_step", b"decode"),
        ("dlq_topic", topic.encode()),
        ("dlq_partition", str(partition).encode()),
        ("dlq_offset", str(offset).encode()),
        ("dlq_timestamp", str(timestamp_ms if timestamp_ms is not None else "").encode()),
    ]
