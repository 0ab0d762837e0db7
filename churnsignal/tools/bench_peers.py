"""The benchmark's peers, each run as its own process on the same pre-produced data.

``python -m churnsignal.tools.bench_peers {ceiling,faust,faust-agent,quix} BOOTSTRAP EXPECTED
TOPIC...`` prints one
JSON line: {"events": n, "first": t, "last": t} (wall times of the first and last event seen).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from typing import Any

import orjson

WINDOW_S = 3600


class Progress:
    """Counts events a peer has seen; reports and exits once it has seen them all."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.n = 0
        self.first = 0.0

    def seen(self, _value: Any = None) -> None:
        self.n += 1
        if self.n == 1:
            self.first = time.time()
        if self.n >= self.expected:
            _report(self.n, self.first, time.time())
            os._exit(0)


def _report(events: int, first: float, last: float) -> None:
    # Straight to fd 1: Faust redirects sys.stdout into its logger.
    os.write(1, orjson.dumps({"events": events, "first": first, "last": last}) + b"\n")


async def ceiling(bootstrap: str, expected: int, topics: list[str]) -> None:
    """A bare aiokafka consumer that fetches and JSON-decodes every message."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 << 20, fetch_max_bytes=16 << 20)
    await consumer.start()
    n, first = 0, 0.0
    try:
        while n < expected:
            batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
            for records in batch.values():
                if not first:
                    first = time.time()
                for rec in records:
                    orjson.loads(rec.value)
                n += sum(1 for _ in records)
    finally:
        await consumer.stop()
    _report(n, first, time.time())


def faust_count(bootstrap: str, expected: int, topics: list[str], *, table: bool = True) -> None:
    """The textbook Faust pipeline: an agent counting per account in a tumbling-window table;
    with ``table`` off, the plain agent: the same count in a dict (Faust's per-event cost
    without any state machinery)."""
    import faust

    app = faust.App(f"bench-faust-{uuid.uuid4().hex[:8]}", broker=f"kafka://{bootstrap}",
                    store="memory://", web_enabled=False, consumer_auto_offset_reset="earliest",
                    broker_rebalance_timeout=6, broker_session_timeout=6,
                    broker_heartbeat_interval=2, datadir=tempfile.mkdtemp(prefix="bench-faust-"),
                    topic_partitions=int(os.environ.get("BENCH_PARTITIONS", "4")))
    source = app.topic(*topics, value_serializer="json", key_serializer="raw")
    counts: Any = app.Table("counts", default=int).tumbling(WINDOW_S, expires=86400) \
        if table else defaultdict(int)
    progress = Progress(expected)

    @app.agent(source)
    async def count(stream: Any) -> None:
        async for event in stream.events():
            counts[event.key.decode()] += 1
            progress.seen()

    sys.argv = [sys.argv[0], "worker", "-l", "error"]
    app.main()


def quix_count(bootstrap: str, expected: int, topics: list[str]) -> None:
    """The same per-account tumbling-window count in Quix Streams."""
    from quixstreams import Application

    app = Application(broker_address=bootstrap, consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
                      auto_offset_reset="earliest", state_dir=tempfile.mkdtemp(prefix="bench-quix-"),
                      loglevel="ERROR")
    progress = Progress(expected)
    for name in topics:
        sdf = app.dataframe(app.topic(name, value_deserializer="json", key_deserializer="bytes"))
        sdf = sdf.update(progress.seen)
        sdf.tumbling_window(WINDOW_S * 1000).count().final()
    app.run()


def main() -> None:
    kind, bootstrap, expected, *topics = sys.argv[1:]
    if kind == "ceiling":
        asyncio.run(ceiling(bootstrap, int(expected), topics))
    elif kind == "faust":
        faust_count(bootstrap, int(expected), topics)
    elif kind == "faust-agent":
        faust_count(bootstrap, int(expected), topics, table=False)
    elif kind == "quix":
        quix_count(bootstrap, int(expected), topics)
    else:
        raise SystemExit(f"unknown peer {kind!r}")


if __name__ == "__main__":
    main()
