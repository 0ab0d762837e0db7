"""The Faust app: the state agent over packs, the re-score timer, and the ingest service.

``create_app(settings)`` builds everything; nothing happens at import time.

Per pack, in this order (a crash between two steps only repeats work, never loses it):

1. fold the pack into each account's state (pure core), collect rows and alerts;
2. write the rows to ClickHouse (retried until durable; same token on a retry);
3. produce the alerts and await their acks;
4. store the new states in the changelogged table;
5. return, so Faust acks the pack and commits its offset.

After a crash before 4, the pack is redelivered: the table does not have it yet, so the same
rows (deduplicated by ClickHouse) and the same alerts (same deterministic ``alert_id``) are
produced again. After 4, the per-account offset high-water skips it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import faust
import mode

from churnsignal.kafka_client import faust_credentials
from churnsignal.metrics import Metrics
from churnsignal.schemas.decode import DecodeOptions
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.settings import Settings
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.stream import packs
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.engine import Outcome, apply_batch, rescore
from churnsignal.stream.ingest import Ingestor
from churnsignal.stream.policy import Policy, load_policy
from churnsignal.stream.rows import alert_row, daily_rows, score_row
from churnsignal.stream.state import AccountState

log = logging.getLogger("churnsignal")


@dataclass
class Runtime:
    """What the worker built: the app and the parts tests and endpoints look at."""

    app: faust.App
    settings: Settings
    policy: Policy
    metrics: Metrics
    sink: ClickHouseSink
    ingestor: Ingestor
    table: Any
    stats: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    clocks: dict[int, PartitionClock] = field(default_factory=lambda: defaultdict(PartitionClock))


class IngestService(mode.Service):
    """Runs the batched consumer inside the Faust worker's lifecycle."""

    def __init__(self, ingestor: Ingestor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ingestor = ingestor

    async def on_start(self) -> None:
        await self.ingestor.start()

    @mode.Service.task
    async def _run(self) -> None:
        await self.ingestor.run()

    async def on_stop(self) -> None:
        await self.ingestor.stop()
        await self.ingestor.close()


def process_pack(table: Any, pack: dict[str, Any], partition: int, policy: Policy,
                 partitions: int, clock: PartitionClock) -> tuple[list[Outcome], float]:
    """Fold one pack (or a re-score tick) into the table's states; pure apart from reading."""
    wall = float(pack["now"])
    outcomes: list[Outcome] = []
    if pack.get("tick"):
        if clock.catching_up(wall):
            return outcomes, wall  # re-scoring at the wall clock now would be premature
        for key in list(table.keys()):
            account_id = key.decode() if isinstance(key, bytes) else str(key)
            if packs.partition_for(account_id, partitions) != partition:
                continue  # a standby copy of another worker's partition
            raw = table.get(key)
            if not isinstance(raw, bytes | bytearray | memoryview | str):
                log.warning("skipping state of unexpected type", extra={
                    "account_id": account_id, "type": type(raw).__name__})
                continue
            outcomes.append(rescore(AccountState.from_bytes(raw), wall, policy))
        return outcomes, wall
    grouped: dict[str, list[Any]] = defaultdict(list)
    newest: dict[str, float] = {}
    for source, offset, data in pack["items"]:
        event = EVENT_ADAPTER.validate_python(data)
        grouped[event.account_id].append((source, offset, event))
        ts = event.occurred_at.timestamp()
        if ts > newest.get(source, 0.0):
            newest[source] = ts
    clock.on_pack(wall, newest)
    for account_id, items in grouped.items():
        raw = table.get(account_id.encode())
        state = AccountState.from_bytes(raw) if raw is not None else None
        outcomes.append(apply_batch(state, account_id, items, wall, policy))
    return outcomes, wall


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> Runtime:
    """Build the Faust app, its topics, table, agent, timer, web views and ingest service."""
    policy = load_policy(settings.policy_file)
    metrics = metrics or Metrics()
    s = settings
    app = faust.App(
        s.app_id,
        broker=[f"kafka://{h.strip()}" for h in (s.kafka_bootstrap_servers or "").split(",")],
        broker_credentials=faust_credentials(s),
        store="memory://",
        datadir=str(s.state_dir / "faust"),
        web_port=s.web_port,
        web_bind=s.web_host,
        web_host=s.web_host,
        topic_partitions=s.partitions,
        topic_replication_factor=s.kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=s.kafka.rebalance_timeout_s,
        broker_session_timeout=s.kafka.session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.kafka.session_timeout_s / 3),
        producer_acks=-1,
        autodiscover=False,
        web_in_thread=False,
    )
    ingested = app.topic(s.ingested_topic, value_serializer="raw", key_serializer="raw",
                         partitions=s.partitions, internal=False)
    alerts_topic = app.topic(s.topics.alerts, value_serializer="raw", key_serializer="raw")
    table = app.Table(
        "accounts",
        default=None,
        partitions=s.partitions,
        # key_type/value_type pick the changelog serializers used on recovery: raw bytes.
        key_type=bytes,
        value_type=bytes,
        schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw"),
        help="Per-account engagement state (compact JSON), changelogged.",
    )
    sink = ClickHouseSink(s.effective_clickhouse_dsn(), retry_max_s=s.sink.retry_max_s,
                          metrics=metrics)
    options = DecodeOptions(
        max_bytes=s.ingest.max_message_bytes,
        max_future_s=s.ingest.max_future_skew_s,
        max_age_s=policy.windows.horizon_days * 86_400.0,
        activation_events=policy.onboarding.activation_events,
    )
    ingestor = Ingestor(s, metrics, options)
    runtime = Runtime(app, s, policy, metrics, sink, ingestor, table)
    app.service(IngestService(ingestor))

    @app.task
    async def start_sink() -> None:
        try:
            await sink.start()
        except Exception as exc:  # an outage at start: writes retry until it is back
            log.warning("ClickHouse not writable yet (%s); writes will retry", exc)

    @app.agent(ingested)
    async def account_state(stream: Any) -> None:
        async for event in stream.events():
            try:
                await _handle(event)
            except Exception as exc:  # a bug must not stop the worker: park the pack
                log.exception("pack %s:%s failed; sent to the DLQ", event.message.partition,
                              event.message.offset)
                metrics.events_dead_lettered.labels(topic=s.ingested_topic,
                                                    reason="processing_error").inc()
                await app.producer.send_and_wait(
                    s.topics.dlq, None, event.value, partition=None, timestamp=None,
                    headers=[("dlq_reason", b"processing_error"),
                             ("dlq_detail", repr(exc)[:500].encode()),
                             ("dlq_step", b"state"), ("dlq_topic", s.ingested_topic.encode()),
                             ("dlq_partition", str(event.message.partition).encode()),
                             ("dlq_offset", str(event.message.offset).encode())])

    async def _handle(event: Any) -> None:
        message = event.message
        pack = packs.decode(event.value)
        wall = float(pack["now"])
        outcomes, now = process_pack(table, pack, message.partition, policy, s.partitions,
                                     runtime.clocks[message.partition])
        rows: dict[str, list[Any]] = {"account_daily_data": [], "account_scores_data": [],
                                      "alerts_data": []}
        alerts = []
        for out in outcomes:
            rows["account_daily_data"].extend(daily_rows(out.state, out.days))
            if out.score_changed or out.applied:
                rows["account_scores_data"].append(score_row(out))
            if out.alert is not None:
                alerts.append(out.alert)
                rows["alerts_data"].append(alert_row(out.alert))
        await sink.write(rows, token=f"{message.topic}:{message.partition}:{message.offset}")
        if alerts:
            futures = [await alerts_topic.send(key=a.account_id.encode(),
                                               value=a.model_dump_json().encode())
                       for a in alerts]
            await asyncio.gather(*futures)
            for a in alerts:
                top = a.reasons[0].code if a.reasons else "none"
                metrics.alerts.labels(band=a.band, kind=a.kind, reason=top).inc()
                metrics.ingest_to_alert.observe(max(0.0, time.time() - wall))
                log.info("alert", extra={"alert_id": a.alert_id, "account_id": a.account_id,
                                         "band": a.band, "kind": a.kind, "score": a.score,
                                         "reason": top, "pack_offset": message.offset,
                                         "partition": message.partition})
        for out in outcomes:
            if out.applied or out.score_changed or out.alert is not None:
                # bytes keys: what the changelog gives back on recovery
                table[out.state.account_id.encode()] = out.state.to_bytes()
            metrics.duplicates.inc(out.duplicates)
            metrics.events_applied.inc(out.applied)
            runtime.stats["events_applied"] += out.applied
            runtime.stats["duplicates"] += out.duplicates
        runtime.stats["alerts"] += len(alerts)
        metrics.packs.inc()
        metrics.accounts_tracked.set(len(table))

    @app.timer(s.rescore_interval_s, on_leader=True)
    async def rescore_tick() -> None:
        # A tick per partition goes through the same agent, so table writes stay in order.
        now = packs.encode_tick(time.time())
        for partition in range(s.partitions):
            await ingested.send(value=now, partition=partition)

    from churnsignal.web import register_views

    register_views(runtime)
    return runtime
