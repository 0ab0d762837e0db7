"""Every use of a private Faust or aiokafka attribute, in one place.

Faust has no setting for its consumer's fetch wait and no public handle on its aiokafka
producer; churnsignal reaches into both. ``check()`` fails loudly when an upgrade renames
or removes what is used here (a unit test calls it), instead of silently falling back.
"""

from __future__ import annotations

import inspect
from typing import Any

# (where, attribute) pairs this module relies on.
PRIVATE_ATTRIBUTES = (
    ("faust.transport.drivers.aiokafka.AIOKafkaConsumerThread", "_create_worker_consumer"),
    ("faust.transport.drivers.aiokafka.Producer", "_ensure_producer"),
    ("aiokafka.AIOKafkaConsumer", "_fetch_max_wait_ms"),
)


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def check() -> list[str]:
    """The private attributes that are missing (empty when all are there), the ingest's
    guard over aiokafka's fetcher included (``stream.ingest.guard_problems``)."""
    from churnsignal.stream.ingest import guard_problems

    missing = guard_problems()
    for where, attribute in PRIVATE_ATTRIBUTES:
        owner = _resolve(where)
        if attribute == "_fetch_max_wait_ms":  # an instance attribute, set in __init__
            if "self._fetch_max_wait_ms" not in inspect.getsource(owner.__init__):
                missing.append(f"{where}.{attribute}")
        elif not hasattr(owner, attribute):
            missing.append(f"{where}.{attribute}")
    # Not private, but relied on: the agent folds only packs fetched in the generation last
    # assigned (``stream.agents.fetched_in``), so each message must carry the generation
    # current when it was fetched; were it left None, nothing would be folded.
    from faust.transport.drivers.aiokafka import Consumer

    if "generation_id=self.app.consumer_generation_id" not in inspect.getsource(
            Consumer._to_message):
        missing.append("faust.transport.drivers.aiokafka.Consumer._to_message: generation_id")
    return missing


def use_fetch_wait(app: Any, ms: int) -> None:
    """Faust builds its consumer with fetch_max_wait_ms=1500 and no setting for it; on a
    broker that holds fetches that long (Tansu), every pack would wait up to 1.5 s."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    app._churnsignal_fetch_wait_ms = ms
    create = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "patched_by_churnsignal", False):
        return

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        wait = getattr(self.app, "_churnsignal_fetch_wait_ms", None)
        if wait is not None:
            consumer._fetch_max_wait_ms = wait  # read by aiokafka when it starts
        return consumer

    create_worker_consumer.patched_by_churnsignal = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


def aiokafka_producer(producer: Any) -> Any:
    """The aiokafka producer behind Faust's producer (for whole-batch sends)."""
    return producer._ensure_producer()
