"""Where the worker's checkpoints write: ClickHouse, the DLQ, the ingested, alerts and state
topics (the ``checkpoint.Outputs`` of a running worker, with its metrics and logs)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.stream import packs, patches
from churnsignal.stream.changelog import write_states
from churnsignal.stream.checkpoint import Forwards
from churnsignal.stream.deadletter import DeadLetter
from churnsignal.stream.fold import Forgotten, PendingAlert

log = logging.getLogger("churnsignal")


class WorkerOutputs:
    def __init__(self, settings: Settings, metrics: Metrics, sink: ClickHouseSink,
                 producer: Any, ingested: Any, alerts_topic: Any, notifier: Any,
                 stats: dict[str, float]) -> None:
        self.s = settings
        self.metrics = metrics
        self.sink = sink
        self.producer = producer  # Faust's
        self.ingested = ingested
        self.alerts_topic = alerts_topic
        self.notifier = notifier
        self.stats = stats
        # Called once forget requests were carried out, before they are confirmed: the
        # worker's ingest forgets the links it remembers having sent (Ingestor.forget_links).
        self.on_forgotten: Any = lambda: None

    async def write_rows(self, rows: dict[str, list[Any]]) -> list[Any]:
        refused = await self.sink.write(rows)
        return list(refused or [])

    async def dead_letter(self, letters: list[DeadLetter]) -> None:
        futures = [await self.producer.send(self.s.topics.dlq, d.key, d.value, partition=None,
                                            timestamp=None, headers=d.headers())
                   for d in letters]
        await asyncio.gather(*futures)
        counts = Counter((d.topic or self.s.ingested_topic, d.reason, d.step) for d in letters)
        for (topic, reason, step), n in counts.items():
            self.metrics.events_dead_lettered.labels(topic=topic, reason=reason, step=step).inc(n)

    async def forward(self, forwards: Forwards) -> None:
        """Events that found their account, on to its partition as packs."""
        now = time.time()
        futures = []
        for partition, items in forwards.items():
            for chunk in packs.chunks(items):
                futures.append(await self.ingested.send(value=packs.encode(now, chunk),
                                                        partition=partition))
        await asyncio.gather(*futures)

    async def publish(self, alerts: list[PendingAlert]) -> None:
        futures = [await self.alerts_topic.send(key=p.alert.account_id.encode(),
                                                value=p.alert.model_dump_json().encode())
                   for p in alerts]
        await asyncio.gather(*futures)
        now = time.time()
        m = self.metrics
        for p in alerts:
            a = p.alert
            if self.notifier is not None:
                self.notifier.submit(a)  # never waits: a bounded queue and its own task
            top = a.reasons[0].code if a.reasons else "none"
            m.alerts.labels(band=a.band, kind=a.kind, reason=top).inc()
            m.ingest_to_alert.observe(max(0.0, now - p.wall))
            log.info("alert", extra={"alert_id": a.alert_id, "account_id": a.account_id,
                                     "band": a.band, "kind": a.kind, "score": a.score,
                                     "reason": top, "pack_offset": p.offset,
                                     "partition": p.partition})
        self.stats["alerts"] += len(alerts)

    async def write_states(self, values: dict[bytes, bytes | None]) -> None:
        if values:
            await write_states(patches.aiokafka_producer(self.producer), self.s.state_topic,
                               self.s.partitions, values)

    async def delete_account(self, account: str) -> dict[str, int]:
        return await self.sink.delete_account(account)

    async def forgotten(self, done: list[Forgotten]) -> None:
        """Forget requests carried out (their states stored): audited in ClickHouse, counted,
        logged, then confirmed on their own partition of the ingested topic, where the
        command waits for them."""
        now = time.time()
        audit = []
        for d in done:
            r = d.request
            home = r["phase"] == "states" and d.partition == r.get("home")
            if home or d.states or d.identities or d.scrubbed or d.rows:
                audit.append((
                    str(r["request_id"]), r["phase"], d.partition, r["kind"],
                    str(r["subject"]), _at(float(r.get("requested_at", now))), _at(now),
                    d.states, d.identities, d.parked, d.scrubbed, d.rows,
                    sum(d.rows.values())))
        if audit:
            refused = await self.sink.write({"deletions_data": audit})
            if refused:  # our own rows: a bug, never the data; retried, not dead-lettered
                raise RuntimeError(f"deletions_data refused the audit: {refused[0].error}")
        self.on_forgotten()  # a link learned again after this must be sent again
        futures = [await self.ingested.send(value=packs.encode(now, [packs.control_item(
            packs.FORGOTTEN, d.summary())]), partition=d.partition) for d in done]
        await asyncio.gather(*futures)
        m = self.metrics
        for d in done:
            r = d.request
            if r["phase"] == "states" and d.partition == r.get("home"):
                m.forget_requests.labels(kind=r["kind"]).inc()
            for what, n in (("state", d.states), ("identity", d.identities),
                            ("waiting_event", d.parked), ("user_trace", d.scrubbed),
                            ("row", sum(d.rows.values()))):
                if n:
                    m.forgotten.labels(what=what).inc(n)
            log.info("forgotten", extra={"forget": d.summary()})


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
