"""`churnsignal forget account ID` / `forget user ID`: the command side of forgetting.

The states live in the workers (memory and the compacted state topic) and the embedded
ClickHouse belongs to the worker's process, so the command cannot delete anything itself: it
asks the workers, through the topic they already read in order. It

1. waits until the ingest has taken everything already on the source topics (its committed
   offsets reach their ends), so events sent before the request are forgotten too;
2. produces a FORGET item (``stream.packs``) to every partition of the ingested topic:
   phase ``identities`` — each partition deletes the identity keys of a user, or those linking
   to the account, with the events waiting under them;
3. once every partition confirmed phase 1 (so every forward of an old link is already
   ahead of what comes next), phase ``states`` — the account's home partition deletes its
   state and its ClickHouse rows; for a user, every partition removes the user's traces from
   its account states;
4. each confirmation (a FORGOTTEN item on the same partition, written by the worker after
   the deletion is durable and audited) is read back here, and summed up for the caller.

Running it again is harmless: there is less (or nothing) to delete the second time.

Without ``KAFKA_BOOTSTRAP_SERVERS`` (the embedded defaults) there is no broker to ask:
``forget_embedded`` deletes the ClickHouse rows itself, when no worker holds the embedded
store (its states and links lived in the embedded broker's memory, gone when it stopped).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from churnsignal.app.kafka_client import connection_options
from churnsignal.app.settings import Settings
from churnsignal.errors import ChurnsignalError
from churnsignal.schemas import identity
from churnsignal.schemas.intercom import contact_key as intercom_contact
from churnsignal.stream import packs

Kind = Literal["account", "user"]
PHASES = ("identities", "states")


class ForgetError(ChurnsignalError):
    """The request could not be made or was not confirmed in time."""


@dataclass
class ForgetReport:
    request_id: str
    kind: Kind
    subject: str
    states: int = 0
    identities: int = 0
    parked: int = 0
    scrubbed: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    confirmations: int = 0
    embedded: bool = False  # no broker configured: done on the embedded ClickHouse alone

    def add(self, summary: dict[str, Any]) -> None:
        self.confirmations += 1
        self.states += int(summary.get("states", 0))
        self.identities += int(summary.get("identities", 0))
        self.parked += int(summary.get("parked", 0))
        self.scrubbed += int(summary.get("scrubbed", 0))
        for table, n in (summary.get("rows") or {}).items():
            self.rows[table] = self.rows.get(table, 0) + int(n)

    def as_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "kind": self.kind, "subject": self.subject,
                "states": self.states, "identities": self.identities, "parked": self.parked,
                "scrubbed": self.scrubbed, "rows": self.rows,
                "rows_total": sum(self.rows.values()), "embedded": self.embedded}

    def lines(self) -> list[str]:
        if self.embedded:
            from churnsignal.app.forget_embedded import report_lines

            return report_lines(self)
        rows = ", ".join(f"{t} {n}" for t, n in sorted(self.rows.items())) or "none"
        out = [f"forgot {self.kind} {self.subject} (request {self.request_id})"]
        if self.kind == "account":
            out.append(f"  account state      {self.states} deleted")
        out.append(f"  identity keys      {self.identities} deleted "
                   f"({self.parked} events waiting under them)")
        if self.kind == "user":
            out.append(f"  account states     {self.scrubbed} no longer hold the user "
                       "(per-day user counts are aggregates and stay)")
            out.append("  ClickHouse rows    none are per user")
        else:
            out.append(f"  ClickHouse rows    {sum(self.rows.values())} deleted ({rows})")
        out.append(f"  audited            in the deletions table, request_id {self.request_id}")
        return out


def request_body(kind: Kind, subject: str, partitions: int, request_id: str,
                 phase: str, now: float) -> dict[str, Any]:
    """What a FORGET item asks (see ``stream.fold._forget``)."""
    if kind == "account":
        if identity.is_identity(subject) or not subject:
            raise ForgetError(f"not an account id: {subject!r}")
        keys: list[str] = []
        links = [subject]
        home = packs.partition_for(subject, partitions)
    else:
        # Every key a person is known by: Segment's user and anonymous ids, the Zendesk
        # requester, the Intercom contact (a user or lead).
        keys = [identity.segment_user(subject), identity.segment_anonymous(subject),
                identity.zendesk_user(subject), intercom_contact(subject)]
        links = keys  # anonymous ids an Identify call linked to the user go with it
        home = packs.partition_for(keys[0], partitions)
    return {"request_id": request_id, "kind": kind, "subject": subject, "phase": phase,
            "requested_at": now, "keys": keys, "links": links, "home": home}


async def _wait_ingested(settings: Settings, deadline: float) -> None:
    """Until the ingest's committed offsets reach the source topics' current ends."""
    # The ingest's group id only to read its committed offsets: assigned, never subscribed
    # (no join, no rebalance of the workers) and never committing.
    consumer = AIOKafkaConsumer(group_id=settings.ingest_group, enable_auto_commit=False,
                                **connection_options(settings))
    await consumer.start()
    try:
        await consumer.topics()  # metadata, for partitions_for_topic
        # Whatever the ingest reads: the sources and (where configured) the import's topic.
        topics = [*settings.topics.sources(), getattr(settings.topics, "snapshots", None)]
        tps = [TopicPartition(t, p) for t in topics if t
               for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        while True:
            behind = 0
            for tp, end in ends.items():
                behind += max(0, end - (await consumer.committed(tp) or 0))
            if not behind:
                return
            if time.monotonic() > deadline:
                raise ForgetError(
                    f"the ingest ({settings.ingest_group}) is still {behind} records behind "
                    "the source topics; is a worker running? Nothing was requested yet.")
            await asyncio.sleep(0.5)
    finally:
        await consumer.stop()


async def _phase(settings: Settings, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer,
                 body: dict[str, Any], deadline: float, report: ForgetReport) -> None:
    topic = settings.ingested_topic
    value = packs.encode(time.time(), [packs.control_item(packs.FORGET, body)])
    sent = [await producer.send(topic, value, partition=p) for p in range(settings.partitions)]
    for p, future in enumerate(sent):
        metadata = await future
        consumer.seek(TopicPartition(topic, p), metadata.offset + 1)
    waiting = set(range(settings.partitions))
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ForgetError(
                f"phase {body['phase']!r} not confirmed by partitions {sorted(waiting)} in "
                "time; the request stays queued and runs when a worker takes it (running "
                "the command again is harmless)")
        batch = await consumer.getmany(*[TopicPartition(topic, p) for p in waiting],
                                       timeout_ms=int(min(left, 0.5) * 1000))
        for tp, records in batch.items():
            for record in records:
                summary = _confirmation(record.value, body)
                if summary is not None and tp.partition in waiting:
                    waiting.discard(tp.partition)
                    report.add(summary)


def _confirmation(raw: bytes | None, body: dict[str, Any]) -> dict[str, Any] | None:
    if not raw or b'"request_id"' not in raw:
        return None  # an ordinary pack
    try:
        items = packs.decode(raw).get("items") or []
    except ValueError:
        return None
    for item in items:
        if (len(item) > 3 and item[3] == packs.FORGOTTEN
                and item[2].get("request_id") == body["request_id"]
                and item[2].get("phase") == body["phase"]):
            return dict(item[2])
    return None


async def forget(settings: Settings, kind: Kind, subject: str,
                 timeout_s: float = 120.0) -> ForgetReport:
    """Ask the workers to forget an account or a user and wait for them (module docstring)."""
    if not settings.kafka_bootstrap_servers:
        # The embedded defaults: no worker to ask (forget_embedded's docstring).
        from churnsignal.app.forget_embedded import forget_embedded

        return await forget_embedded(settings, kind, subject)
    deadline = time.monotonic() + timeout_s
    request_id = uuid.uuid4().hex
    now = time.time()
    bodies = [request_body(kind, subject, settings.partitions, request_id, phase, now)
              for phase in PHASES]
    report = ForgetReport(request_id, kind, subject)
    await _wait_ingested(settings, deadline)
    opts = connection_options(settings)
    producer = AIOKafkaProducer(acks="all", **opts)
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **opts)
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([TopicPartition(settings.ingested_topic, p)
                         for p in range(settings.partitions)])
        for body in bodies:
            await _phase(settings, producer, consumer, body, deadline, report)
    finally:
        await consumer.stop()
        await producer.stop()
    return report
