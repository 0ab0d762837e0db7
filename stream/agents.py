"""The Faust app: the state agent over packs, the re-score timer, and the ingest service.

``create_app(settings)`` builds everything; nothing happens at import time.

Per pack, in this order (a crash between two steps only repeats work, never loses it):

1. fold the pack into each account's working state (pure core), collect rows and alerts;
2. buffer both; every ``sink.flush_interval_s`` (or ``sink.batch_max_rows``, or at once
   when an alert waits, at most every ``ALERT_FLUSH_S``):
3. write the rows in one insert per table, retried until durable;
4. publish the alerts and await their acks;
5. store each changed state once in the changelogged table;
6. ack the packs of that flush, so Faust commits their offsets (after flushing its producer).

After a crash before 4, the packs are redelivered and applied again to the stored state: the
same rows (whole-day totals with a growing version, so rewriting is idempotent) and the same
alerts (deterministic ``alert_id``), which were not published yet. Only a crash between 4 and
5 (milliseconds) publishes an alert again, with the same id. After 5 but before 6, their
events are duplicates, and their days' rows and score snapshot are re-derived from the
stored state.
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
import orjson
from faust.types import TP
from tenacity import AsyncRetrying, wait_exponential_jitter

from churnsignal.app.kafka_client import faust_credentials
from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings
from churnsignal.app.webhook import WebhookNotifier
from churnsignal.schemas.decode import DecodeOptions
from churnsignal.schemas.identity import is_identity
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.stream import packs
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.engine import Outcome, apply_batch, rescore
from churnsignal.stream.identity import IdentityState, Resolution, resolve, settle
from churnsignal.stream.ingest import Ingestor
from churnsignal.stream.policy import Policy, load_policy
from churnsignal.stream.rows import alert_row, daily_rows, fact_rows, score_row
from churnsignal.stream.state import AccountState
from churnsignal.stream.statelog import PartitionLoads, read_partitions

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
    store: StateStore
    stats: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    clocks: dict[int, PartitionClock] = field(default_factory=lambda: defaultdict(PartitionClock))
    stream: Any = None  # the agent's manual-ack stream, once it runs
    closing: bool = False  # set by the shutdown flush: later packs are left for a restart


class StateStore:
    """Account and identity states of this worker's partitions, and working copies.

    ``data`` holds each key's stored bytes, read back from the state topic when its partition
    is assigned (``statelog``); ``cache`` the decoded working copies the agent folds events
    into. Changed states are written once per key per flush (a checkpoint), not per pack, in
    the partition Kafka's default partitioner gives the key, as the packs use.
    """

    def __init__(self, partitions: int, max_cached: int = 200_000) -> None:
        self.partitions = partitions
        self.data: dict[bytes, bytes] = {}
        self.cache: dict[str, AccountState | IdentityState] = {}
        self.dirty: set[str] = set()
        self.max_cached = max_cached
        self.loads = PartitionLoads()

    def get(self, account_id: str) -> AccountState | None:
        state = self.cache.get(account_id)
        if state is None:
            raw = self.data.get(account_id.encode())
            if raw is not None:
                state = self.cache[account_id] = AccountState.from_bytes(raw)
        return state  # type: ignore[return-value]

    def peek(self, account_id: str) -> AccountState | None:
        """Read-only view for endpoints: never caches, so a read while a partition is
        loading cannot become the agent's working copy."""
        state = self.cache.get(account_id)
        if state is None:
            raw = self.data.get(account_id.encode())
            return AccountState.from_bytes(raw) if raw is not None else None
        return state  # type: ignore[return-value]

    def put(self, state: AccountState) -> None:
        self.cache[state.account_id] = state
        self.dirty.add(state.account_id)

    def identity(self, key: str) -> IdentityState:
        """An identity's state (same topic, keys starting with ``~``), new if unknown."""
        state = self.cache.get(key)
        if state is None:
            raw = self.data.get(key.encode())
            state = IdentityState.from_bytes(raw) if raw is not None else IdentityState(key)
            self.cache[key] = state
        return state  # type: ignore[return-value]

    def put_identity(self, state: IdentityState) -> None:
        self.cache[state.key] = state
        self.dirty.add(state.key)

    def keys_in(self, partition: int) -> list[str]:
        """Accounts and identities of one partition."""
        keys = {k.decode() for k in self.data}
        keys.update(self.cache)
        return [k for k in keys if packs.partition_for(k, self.partitions) == partition]

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the stored states of partitions this worker no longer holds."""
        if not partitions:
            return
        for key in [k for k in self.data
                    if packs.partition_for(k.decode(), self.partitions) in partitions]:
            del self.data[key]

    async def write_dirty(self, producer: Any, topic: str) -> int:
        """Store every changed state: one batch of records per partition, then ``data``.

        Faust's own table writes went through its producer buffer one record at a time; at
        thousands of accounts per flush that dominated the worker.
        """
        # Snapshot before the first await: the agent keeps changing states meanwhile.
        dirty, self.dirty = self.dirty, set()
        values = {a.encode(): self.cache[a].to_bytes() for a in dirty}
        by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for key, value in values.items():
            by_partition[packs.partition_for(key.decode(), self.partitions)].append((key, value))
        try:
            futures = []
            for partition, records in by_partition.items():
                futures += await send_batches(producer, topic, partition, records)
            if futures:
                await asyncio.gather(*futures)
        except BaseException:
            self.dirty |= dirty  # written again by the next flush
            raise
        self.data.update(values)
        if len(self.cache) > self.max_cached:  # bounded memory: drop clean copies
            for account_id in list(self.cache)[: len(self.cache) - self.max_cached]:
                if account_id not in self.dirty:
                    del self.cache[account_id]
        return len(values)

    def forget(self) -> None:
        """After a rebalance the stored states are the truth again; unflushed changes are
        dropped (their packs were not acked, so the new owner applies them again)."""
        self.cache.clear()
        self.dirty.clear()


ALERT_FLUSH_S = 0.1  # a waiting alert brings the flush forward, at most this often
PACKS_PER_STEP = 16  # packs the agent takes at once (when that many are waiting)
PACKS_WAIT_S = 0.01  # ...or what has come within this


@dataclass
class PendingAlert:
    alert: Any  # schemas.alerts.Alert
    wall: float  # when its pack was read (ingest-to-alert latency)
    partition: int
    offset: int


async def send_batches(producer: Any, topic: str, partition: int,
                       records: list[tuple[bytes, bytes]]) -> list[Any]:
    """Produce records to one partition as whole batches: one future per batch, not per
    record (per-record futures were most of a flush's cost). ``producer`` is Faust's; its
    aiokafka producer does the work."""
    aio = producer._ensure_producer()
    futures = []
    batch = aio.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
            futures.append(await aio.send_batch(batch, topic, partition=partition))
            batch = aio.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    if batch.record_count():
        futures.append(await aio.send_batch(batch, topic, partition=partition))
    return futures


DAILY = "account_daily_data"


class PendingFlush:
    """Rows and alerts waiting for the next flush, and the packs to ack once it is durable.

    Daily rows are whole-day totals keyed by (account, day) with a growing version, so only
    the days a flush touched are kept here; their rows are built once, at the flush, from
    the states as they stand then (every pack of the flush applied, nothing later).
    """

    def __init__(self) -> None:
        self.rows: dict[str, list[Any]] = defaultdict(list)
        self.touched: dict[str, set[int]] = {}
        self.events: list[Any] = []
        self.alerts: list[PendingAlert] = []
        self.count = 0
        self.since = 0.0
        self.alerts_since = 0.0

    def _touch(self, touched: dict[str, set[int]]) -> None:
        for account, days in touched.items():
            held = self.touched.setdefault(account, set())
            before = len(held)
            held |= days
            self.count += len(held) - before

    def add(self, rows: dict[str, list[Any]], event: Any,
            alerts: list[PendingAlert] | None = None,
            touched: dict[str, set[int]] | None = None) -> None:
        if not self.events:
            self.since = time.monotonic()
        for table, data in rows.items():
            self.rows[table].extend(data)
            self.count += len(data)
        if touched:
            self._touch(touched)
        self.events.append(event)
        if alerts:
            if not self.alerts:
                self.alerts_since = time.monotonic()
            self.alerts.extend(alerts)

    def due(self, max_rows: int, max_wait_s: float) -> bool:
        now = time.monotonic()
        return bool(self.events) and (
            self.count >= max_rows or now - self.since >= max_wait_s
            or (bool(self.alerts) and now - self.alerts_since >= ALERT_FLUSH_S))

    def restore(self, rows: dict[str, list[Any]], events: list[Any],
                alerts: list[PendingAlert], touched: dict[str, set[int]]) -> None:
        for table, data in rows.items():
            if table != DAILY:  # rebuilt from the states at the next flush
                self.rows[table][:0] = data
                self.count += len(data)
        self._touch(touched)
        self.events[:0] = events
        self.alerts[:0] = alerts
        self.since = min(self.since, time.monotonic()) if self.events else time.monotonic()
        self.alerts_since = time.monotonic()

    def take(self) -> tuple[dict[str, list[Any]], list[Any], list[PendingAlert],
                            dict[str, set[int]]]:
        taken = dict(self.rows), self.events, self.alerts, self.touched
        self.rows, self.events, self.alerts, self.count = defaultdict(list), [], [], 0
        self.touched = {}
        return taken


class IngestService(mode.Service):
    """Runs the batched consumer inside the Faust worker's lifecycle."""

    def __init__(self, ingestor: Ingestor, on_drained: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ingestor = ingestor
        self.on_drained = on_drained

    async def on_start(self) -> None:
        await self.ingestor.start()

    @mode.Service.task
    async def _run(self) -> None:
        await self.ingestor.run()

    async def on_stop(self) -> None:
        # Stopped before the Faust consumer (started last): stop reading, then flush what
        # the agent holds so its packs are acked and committed on the way out.
        await self.ingestor.stop()
        await self.ingestor.close()
        if self.on_drained is not None:
            await self.on_drained()


def _steps(batch: list[Any]) -> list[list[Any]]:
    """Packs grouped for folding: per partition, in order; a tick stays on its own (it
    re-scores at its own time), so it splits the packs around it."""
    groups: list[list[Any]] = []
    open_group: dict[int, list[Any]] = {}
    for event in batch:
        partition = event.message.partition
        if packs.is_tick(event.value):
            open_group.pop(partition, None)
            groups.append([event])
            continue
        group = open_group.get(partition)
        if group is None:
            group = open_group[partition] = []
            groups.append(group)
        group.append(event)
    return groups


@dataclass
class PackResult:
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0
    newest: float = 0.0  # newest event time in the pack
    identities: list[Resolution] = field(default_factory=list)


def process_pack(store: StateStore, pack: dict[str, Any], partition: int, policy: Policy,
                 partitions: int, clock: PartitionClock, max_parked: int = 1000,
                 identity_grace_s: float = 60.0) -> PackResult:
    """Fold one pack (or a re-score tick) into the states."""
    wall = float(pack["now"])
    result = PackResult(wall=wall)
    outcomes = result.outcomes
    if pack.get("tick"):
        keys = store.keys_in(partition)
        for key in keys:
            if is_identity(key):
                identity_state = store.identity(key)
                settled = settle(identity_state, wall, identity_grace_s)
                if settled.changed:
                    store.put_identity(identity_state)
                    result.identities.append(settled)
        if clock.catching_up(wall):
            return result  # re-scoring at the wall clock now would be premature
        for account_id in keys:
            state = None if is_identity(account_id) else store.get(account_id)
            if state is not None:
                outcomes.append(rescore(state, wall, policy))
        return result
    grouped: dict[str, list[Any]] = defaultdict(list)
    identities: dict[str, list[Any]] = defaultdict(list)
    newest: dict[str, float] = {}
    for source, offset, data in pack["items"]:
        if is_identity(data["account_id"]):  # not an account yet: its identity decides
            identities[data["account_id"]].append((source, offset, data))
            continue
        event = packs.event_of(data)
        grouped[event.account_id].append((source, offset, event))
        ts = event.occurred_at.timestamp()
        if ts > newest.get(source, 0.0):
            newest[source] = ts
    clock.on_pack(wall, newest)
    for account_id, items in grouped.items():
        outcomes.append(apply_batch(store.get(account_id), account_id, items, wall, policy))
    for key, items in identities.items():
        state = store.identity(key)
        resolution = resolve(state, items, max_parked, wall)
        if resolution.changed:
            store.put_identity(state)
        result.identities.append(resolution)
    result.newest = max(newest.values(), default=0.0)
    return result


def _use_fetch_wait(app: faust.App, ms: int) -> None:
    """Faust builds its consumer with fetch_max_wait_ms=1500 and no setting for it; on a
    broker that holds fetches that long (Tansu), every pack would wait up to 1.5 s."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    app._churnsignal_fetch_wait_ms = ms  # type: ignore[attr-defined]
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
        # Batches up to 512 KB (below Kafka's 1 MB default message size): state
        # checkpoints and packs go out in few requests.
        producer_max_batch_size=512_000,
        # Unacked packs wait for the next flush; at shutdown we flush on revoke instead of
        # letting Faust wait for acks that only a flush gives (redelivery covers a crash).
        stream_wait_empty=False,
        autodiscover=False,
        web_in_thread=False,
    )
    _use_fetch_wait(app, s.kafka.fetch_max_wait_ms)
    ingested = app.topic(s.ingested_topic, value_serializer="raw", key_serializer="raw",
                         partitions=s.partitions, internal=False)
    alerts_topic = app.topic(s.topics.alerts, value_serializer="raw", key_serializer="raw")
    store = StateStore(s.partitions)
    sink = ClickHouseSink(s.effective_clickhouse_dsn(), retry_max_s=s.sink.retry_max_s,
                          metrics=metrics, ttl_days=s.sink.ttl_days)
    options = DecodeOptions(
        max_bytes=s.ingest.max_message_bytes,
        max_future_s=s.ingest.max_future_skew_s,
        max_age_s=policy.windows.horizon_days * 86_400.0,
        activation_events=policy.onboarding.activation_events,
    )
    ingestor = Ingestor(s, metrics, options)
    notifier = WebhookNotifier(s.webhook, metrics) if s.webhook.url is not None else None
    runtime = Runtime(app, s, policy, metrics, sink, ingestor, store)

    @app.task
    async def start_sink() -> None:
        try:
            await sink.start()
        except Exception as exc:  # an outage at start: writes retry until it is back
            log.warning("ClickHouse not writable yet (%s); writes will retry", exc)

    if notifier is not None:
        @app.task
        async def post_alerts() -> None:
            await notifier.run()

    pending = PendingFlush()
    flush_lock = asyncio.Lock()

    async def flush(stream: Any) -> None:
        """Rows in one insert per table, then the alerts, then the states; then ack the packs."""
        async with flush_lock:
            if not pending.events:
                return
            rows, events, alerts, touched = pending.take()
            rows[DAILY] = [row for account, days in touched.items()
                           if (state := store.get(account)) is not None
                           for row in daily_rows(state, days)]
            try:
                await sink.write(rows)
                # Alerts after their rows and before the states that record them: a crash
                # before the states are stored redelivers the packs, which decide the same
                # alerts again (same ids); only one between publish and store repeats one.
                await _publish(alerts)
                alerts = []
                await store.write_dirty(app.producer, s.state_topic)
            except BaseException:
                pending.restore(rows, events, alerts, touched)  # the next flush retries
                raise
            for event in events:
                await stream.ack(event)

    async def _publish(alerts: list[PendingAlert]) -> None:
        if not alerts:
            return
        futures = [await alerts_topic.send(key=p.alert.account_id.encode(),
                                           value=p.alert.model_dump_json().encode())
                   for p in alerts]
        await asyncio.gather(*futures)
        now = time.time()
        for p in alerts:
            a = p.alert
            if notifier is not None:
                notifier.submit(a)  # never waits: a bounded queue and its own task
            top = a.reasons[0].code if a.reasons else "none"
            metrics.alerts.labels(band=a.band, kind=a.kind, reason=top).inc()
            metrics.ingest_to_alert.observe(max(0.0, now - p.wall))
            log.info("alert", extra={"alert_id": a.alert_id, "account_id": a.account_id,
                                     "band": a.band, "kind": a.kind, "score": a.score,
                                     "reason": top, "pack_offset": p.offset,
                                     "partition": p.partition})
        runtime.stats["alerts"] += len(alerts)

    @app.agent(ingested)
    async def account_state(stream: Any) -> None:
        manual = stream.noack()
        runtime.stream = manual
        # Several packs at a time: consecutive packs of one partition are folded as one, so
        # an account's per-batch work (prune, score, rows) is paid once for all of them.
        # noack_take, not take_events: take_events acks each batch as soon as the loop body
        # returns, before the flush has made its effects durable.
        async for batch in manual.noack_take(PACKS_PER_STEP, within=PACKS_WAIT_S):
            if runtime.closing:
                # Shutting down: leave the packs unacked and unapplied; the next owner of
                # the partition applies them once. (Packs of partitions revoked by a
                # rebalance are dropped by Faust itself, which clears the agents' buffers
                # on revoke; skipping by assignment here raced with rebalances and stalled
                # owned partitions.)
                continue
            for group in _steps(batch):
                # A partition's states must be read back before anything is folded into
                # them; a partition that went to another worker meanwhile is its to apply.
                if not await store.loads.ready(group[0].message.partition, _owned):
                    continue
                # Under the flush lock: a revoke-time flush waits for the packs being folded.
                async with flush_lock:
                    alerts: list[PendingAlert] = []
                    touched: dict[str, set[int]] = {}
                    try:
                        rows = await _handle(group, alerts, touched)
                    except Exception as exc:  # a bug must not stop the worker: park them
                        rows, alerts, touched = {}, [], {}
                        for event in group:
                            await _park(event, exc)
                    pending.add(rows, group[0], alerts, touched)
                    for event in group[1:]:
                        pending.add({}, event)
                if pending.count >= s.sink.batch_max_rows:  # bounded memory: flush now
                    await flush(manual)

    @app.timer(min(ALERT_FLUSH_S, s.sink.flush_interval_s / 2))
    async def flush_when_due() -> None:
        # Quiet periods: rows reach ClickHouse within the flush interval, alerts at once.
        if runtime.stream is not None and pending.due(s.sink.batch_max_rows,
                                                      s.sink.flush_interval_s):
            try:
                await flush(runtime.stream)
            except Exception:  # never let a timer take the worker down; packs stay unacked
                log.exception("flush failed; will retry")

    async def _park(event: Any, exc: Exception) -> None:
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

    async def _forward(resolutions: list[Resolution], wall: float, message: Any) -> None:
        """Send events that found their account on (as packs), before the pack is acked."""
        by_partition: dict[int, list[list[Any]]] = defaultdict(list)
        futures = []
        for res in resolutions:
            for target, source, offset, data in res.forwards:
                by_partition[packs.partition_for(target, s.partitions)].append(
                    [source, offset, data])
            metrics.identity_events.labels(outcome="parked").inc(res.parked)
            metrics.identity_events.labels(outcome="joined").inc(res.joined)
            for data in res.overflow:  # never silently dropped
                metrics.identity_events.labels(outcome="overflow").inc()
                metrics.events_dead_lettered.labels(topic=s.ingested_topic,
                                                    reason="unattributed_overflow").inc()
                futures.append(await app.producer.send(
                    s.topics.dlq, None, orjson.dumps(data), partition=None, timestamp=None,
                    headers=[("dlq_reason", b"unattributed_overflow"),
                             ("dlq_detail", f"more than {s.ingest.max_parked_per_identity} "
                              "events wait for this identity's account".encode()),
                             ("dlq_step", b"identity"),
                             ("dlq_topic", s.ingested_topic.encode()),
                             ("dlq_partition", str(message.partition).encode()),
                             ("dlq_offset", str(message.offset).encode())]))
        for partition, items in by_partition.items():
            for chunk in packs.chunks(items):
                futures.append(await ingested.send(value=packs.encode(wall, chunk),
                                                   partition=partition))
        if futures:
            await asyncio.gather(*futures)

    async def _handle(group: list[Any], alerts: list[PendingAlert],
                      touched: dict[str, set[int]]) -> dict[str, list[Any]]:
        message = group[-1].message
        pack = packs.merge([packs.decode(event.value) for event in group])
        wall = float(pack["now"])
        result = process_pack(store, pack, message.partition, policy, s.partitions,
                              runtime.clocks[message.partition], s.ingest.max_parked_per_identity,
                              s.ingest.identity_grace_s)
        outcomes, newest = result.outcomes, result.newest
        if result.identities:
            await _forward(result.identities, wall, message)
        if newest:
            metrics.event_to_score.observe(max(0.0, time.time() - newest))
        rows: dict[str, list[Any]] = {"account_scores_data": [],
                                      "alerts_data": [], "billing_events_data": [],
                                      "support_events_data": []}
        for out in outcomes:
            # Duplicates (a redelivered pack) re-derive their rows from the state: if the
            # worker died after storing the state but before the flush, this restores them.
            if out.days:
                touched.setdefault(out.state.account_id, set()).update(out.days)
            if out.score_changed or out.applied or out.duplicates:
                rows["account_scores_data"].append(score_row(out))
            if out.facts:
                billing, support = fact_rows(out)
                rows["billing_events_data"].extend(billing)
                rows["support_events_data"].extend(support)
            if out.alert is not None:
                alerts.append(PendingAlert(out.alert, wall, message.partition, message.offset))
                rows["alerts_data"].append(alert_row(out.alert))
        applied = duplicates = late = 0
        for out in outcomes:
            if out.applied or out.score_changed or out.alert is not None:
                store.put(out.state)
            applied += out.applied
            duplicates += out.duplicates
            late += out.late
        metrics.duplicates.inc(duplicates)
        metrics.events_applied.inc(applied)
        if late:
            metrics.events_late.inc(late)
        runtime.stats["events_applied"] += applied
        runtime.stats["duplicates"] += duplicates
        metrics.packs.inc()
        metrics.accounts_tracked.set(len(store.cache))
        return rows

    async def drain() -> None:
        if runtime.stream is not None:
            await asyncio.wait_for(flush(runtime.stream), timeout=30)

    async def drain_for_shutdown() -> None:
        runtime.closing = True  # packs Faust still hands the agent are not applied
        await drain()
        if notifier is not None:
            await notifier.drain(timeout=min(10.0, s.webhook.timeout_s * 2))

    app.service(IngestService(ingestor, on_drained=drain_for_shutdown))

    def _owned(partition: int) -> bool:
        return TP(s.ingested_topic, partition) in app.consumer.assignment()

    @app.on_partitions_assigned.connect
    async def load_states(sender: Any, assigned: Any, **kwargs: Any) -> None:
        # Read back the states of newly assigned partitions (in the background: the agent
        # waits per partition); drop those of partitions that went elsewhere.
        parts = {tp.partition for tp in assigned if tp.topic == s.ingested_topic}
        task = store.loads.task
        if task is not None and not task.done():
            task.cancel()
        drop, load = store.loads.plan(parts, app.consumer_generation_id)
        store.drop_partitions(drop)
        await store.loads.touch()  # wakes packs of partitions that are no longer ours
        if load:
            store.loads.task = asyncio.ensure_future(_load(load))

    async def _load(partitions: set[int]) -> None:
        started = time.monotonic()
        # Until it works: the broker comes back; a cancel (a newer assignment) is not retried.
        async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.5, max=10.0), reraise=True,
                before_sleep=lambda state: log.warning(
                    "reading states of partitions %s failed (%s); retrying", sorted(partitions),
                    state.outcome.exception() if state.outcome else None)):
            with attempt:
                got = await read_partitions(s, partitions)
        for records in got.values():
            store.data.update(records)
        await store.loads.mark_loaded(partitions)
        log.info("states loaded", extra={
            "partitions": sorted(partitions), "keys": sum(len(r) for r in got.values()),
            "seconds": round(time.monotonic() - started, 3)})

    @app.on_partitions_revoked.connect
    async def flush_before_revoke(sender: Any, revoked: Any, **kwargs: Any) -> None:
        # Rebalance or shutdown: make buffered rows and states durable, ack their packs.
        try:
            await drain()
        except Exception:  # the packs stay unacked and are redelivered to the new owner
            log.warning("flush before revoke failed", exc_info=True)
            pending.take()
        store.forget()
        await store.loads.touch()  # packs waiting on revoked partitions let go

    @app.timer(s.rescore_interval_s, on_leader=True)
    async def rescore_tick() -> None:
        # A tick per partition goes through the same agent, so table writes stay in order.
        now = packs.encode_tick(time.time())
        for partition in range(s.partitions):
            await ingested.send(value=now, partition=partition)

    from churnsignal.app.web import register_views

    register_views(runtime)
    return runtime
