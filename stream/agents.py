"""The Faust app, wired: the state agent over packs, timers, rebalance hooks, the ingest service.

``create_app(settings)`` builds everything; nothing happens at import time. What each part
does lives in its own module: folding packs into states (``fold``, pure), the states
(``store``), what a flush makes durable and in which order (``checkpoint``), where it writes
(``outputs``), dead-letter records (``deadletter``), private Faust/aiokafka uses
(``patches``), the source-topic consumer (``ingest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import faust
import mode
from aiokafka.errors import KafkaError
from faust.types import TP
from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from churnsignal.app.health import Liveness
from churnsignal.app.ingest_process import IngestProcess
from churnsignal.app.kafka_client import faust_credentials
from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings
from churnsignal.errors import SinkUnavailable
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.stream import outbox, packs, patches
from churnsignal.stream.checkpoint import ALERT_FLUSH_S, Checkpoint
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.fold import IdentityLimits, StepResult, fold_step, steps, tick_steps
from churnsignal.stream.ingest import Ingestor, options_for
from churnsignal.stream.outputs import WorkerOutputs
from churnsignal.stream.policy import Policy, load_policy
from churnsignal.stream.statelog import read_partitions
from churnsignal.stream.store import MemoryStateStore, StateStore

log = logging.getLogger("churnsignal")

# Packs the agent takes at once, when that many are waiting (a catch-up): 48 rather than
# 16 made a 300,000-event catch-up with the ingest in its own process faster in 12 of 12
# alternating pairs (median +14 %): a partition's packs are folded as one group, so
# fewer account batches (docs/benchmark.md, session 15). Live, packs come one by one.
PACKS_PER_STEP = 48
# ...but one partition's group holds at most this many (~32,000 events, ~0.5 s of
# folding): a worker of one partition does not hold its event loop (the health checks'
# answers) for a whole step.
GROUP_MAX_PACKS = 16
PACKS_WAIT_S = 0.01  # ...or what has come within this
TICK_SLICE = 1000  # accounts re-scored between two turns of the event loop
BACKLOG_EVENTS = 50_000  # source records the ingest is behind: catching up (seconds of work)
BACKLOG_WAIT_S = 0.25  # packs gather this long between steps while catching up
# The agent folds nothing before the sink has started (or failed to), at most this long:
# its start imports chdb, pyarrow and pandas and opens the client, ~1 s of the GIL that would
# otherwise slow the first seconds of folding and delay the first flush's alerts. A server
# that does not answer fails the start sooner (clickhouse-connect's 10 s connect timeout).
SINK_START_WAIT_S = 30.0
BACKOFF_MAX_S = 10.0  # longest wait between flush attempts while ClickHouse or Kafka is out


@dataclass
class Runtime:
    """What the worker built: the app and the parts tests and endpoints look at."""

    app: faust.App
    settings: Settings
    policy: Policy
    metrics: Metrics
    sink: ClickHouseSink
    ingestor: Ingestor | IngestProcess
    store: StateStore
    checkpoint: Checkpoint | None = None
    liveness: Liveness = field(default_factory=lambda: Liveness(time.monotonic()))
    stats: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    clocks: dict[int, PartitionClock] = field(default_factory=lambda: defaultdict(PartitionClock))
    stream: Any = None  # the agent's manual-ack stream, once it runs
    closing: bool = False  # set by the shutdown flush: later packs are left for a restart
    # The consumer generation whose packs are folded (``fetched_in``): set by each
    # assignment, None from a revoke until the next assignment.
    generation: int | None = None


class IngestService(mode.Service):
    """Runs the batched consumer inside the Faust worker's lifecycle."""

    def __init__(self, ingestor: Ingestor | IngestProcess, on_drained: Any = None,
                 **kwargs: Any) -> None:
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


def _faust_app(s: Settings) -> faust.App:
    return faust.App(
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


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> Runtime:
    """Build the Faust app, its topics, agent, timers, web views and ingest service."""
    shadow = load_policy(settings.shadow_policy_file) if settings.shadow_policy_file else None
    # The states count what the shadow policy reads too (its tracked event types).
    policy = load_policy(settings.policy_file)
    if shadow is not None:
        policy = policy.tracking(shadow)
    metrics = metrics or Metrics()
    s = settings
    app = _faust_app(s)
    patches.use_fetch_wait(app, s.kafka.fetch_max_wait_ms)
    ingested = app.topic(s.ingested_topic, value_serializer="raw", key_serializer="raw",
                         partitions=s.partitions, internal=False)
    alerts_topic = app.topic(s.topics.alerts, value_serializer="raw", key_serializer="raw")
    store = MemoryStateStore(s.partitions)
    sink = ClickHouseSink(s.effective_clickhouse_dsn(), retry_max_s=s.sink.retry_max_s,
                          write_timeout_s=s.sink.write_timeout_s, metrics=metrics,
                          ttl_days=s.sink.ttl_days, views=s.views)
    ingestor: Ingestor | IngestProcess = (
        IngestProcess(s, metrics) if s.ingest.separate_process
        else Ingestor(s, metrics, options_for(s, policy)))
    # Alert delivery reads the alerts topic in its own consumer groups (churnsignal.notify);
    # nothing is handed over in memory, so the outputs get no notifier.
    from churnsignal.notify.service import worker_notifier

    delivery = worker_notifier(s, metrics, policy.alerting.min_band, policy.notify)
    notifier = None
    runtime = Runtime(app, s, policy, metrics, sink, ingestor, store)
    outputs = WorkerOutputs(s, metrics, sink, app.producer, ingested, alerts_topic, notifier,
                            runtime.stats)
    outputs.on_forgotten = ingestor.forget_links  # relinking after a forget: sent again

    async def ack(events: list[Any]) -> None:
        # In offset order: a commit between two acks never sees a later pack acked before
        # an earlier one (packs put back by a failed flush come first again, not in order).
        for event in sorted(events, key=lambda e: (e.message.partition, e.message.offset)):
            await runtime.stream.ack(event)

    # Each step of a flush is bounded; the sink's own bound is the tighter one for rows.
    checkpoint = runtime.checkpoint = Checkpoint(
        store, outputs, s.ingested_topic, s.partitions, ack,
        step_timeout_s=max(120.0, s.sink.write_timeout_s + 30.0))

    sink_started = asyncio.Event()

    @app.task
    async def start_sink() -> None:
        try:
            await sink.start()
        except Exception as exc:  # an outage at start: writes retry until it is back
            log.warning("ClickHouse not writable yet (%s); writes will retry", exc)
        finally:
            sink_started.set()

    if delivery is not None:
        @app.task
        async def deliver_alerts() -> None:
            await delivery.run()

    m = metrics

    def _record(result: StepResult, pack_done: bool = True) -> None:
        if result.newest:
            m.event_to_score.observe(max(0.0, time.time() - result.newest))
        m.duplicates.inc(result.duplicates)
        m.events_applied.inc(result.applied)
        if result.late:
            m.events_late.inc(result.late)
        for res in result.identities:
            m.identity_events.labels(outcome="parked").inc(res.parked)
            m.identity_events.labels(outcome="joined").inc(res.joined)
            if res.overflow:
                m.identity_events.labels(outcome="overflow").inc(len(res.overflow))
            if res.expired:
                m.identity_events.labels(outcome="expired").inc(len(res.expired))
        if result.errors:
            log.error("re-scoring %d accounts failed; their states are unchanged", result.errors)
        runtime.stats["events_applied"] += result.applied
        runtime.stats["duplicates"] += result.duplicates
        if pack_done:
            m.packs.inc()
        m.accounts_tracked.set(len(store))

    def _fold(group: list[Any]) -> None:
        """Fold a step's packs and hand the result to the checkpoint (under its lock)."""
        partition = group[0].message.partition
        try:
            pack = packs.merge([packs.decode(event.value) for event in group])
        except Exception as exc:  # not written by our ingest: the DLQ, never a crash
            if len(group) > 1:
                for event in group:
                    _fold([event])
                return
            checkpoint.add_unreadable(group[0], exc)
            return
        result = fold_step(store, pack, partition, group[-1].message.offset, policy,
                           runtime.clocks[partition], identity_limits, shadow)
        if result.failures:
            log.error("%d records of partition %s could not be folded; dead-lettered",
                      len(result.failures), partition)
        _record(result)
        checkpoint.add(result, group, partition)

    async def _tick(event: Any, partition: int) -> None:
        """A re-score tick, a slice of accounts at a time: between slices the ingest, the
        flush (with the alerts folded before) and the web endpoints run. Acked once every
        slice is folded; a revoke half way leaves it to the partition's next owner."""
        try:
            pack = packs.decode(event.value)
        except Exception as exc:  # not written by us: the DLQ, never a crash
            checkpoint.add_unreadable(event, exc)
            return
        slices = tick_steps(store, pack, partition, policy, runtime.clocks[partition],
                            identity_limits, shadow, TICK_SLICE)
        epoch = checkpoint.epoch  # a revoke in between: the states it folded into are gone
        while (not runtime.closing and epoch == checkpoint.epoch
               and await store.loads.ready(partition, _owned)):
            async with checkpoint.folding(epoch) as current:
                if not current:
                    return
                result = next(slices, None)
                if result is None:
                    checkpoint.add_tick(event)
                    m.packs.inc()
                    return
                _record(result, pack_done=False)
                checkpoint.add(result, [], partition)
            liveness.progress(time.monotonic())
            if checkpoint.pending.count >= s.sink.batch_max_rows:
                await flush_until_done("batch full")
            await asyncio.sleep(0)

    liveness = runtime.liveness
    ingestor.on_outage = lambda failing: liveness.outage("kafka-ingest", failing,
                                                         time.monotonic())
    if isinstance(ingestor, IngestProcess):
        ingestor.on_broken = lambda reason: liveness.failing("ingest-process", reason)
    identity_limits = IdentityLimits(
        s.ingest.max_parked_per_identity, s.ingest.identity_grace_s, s.ingest.identity_ttl_s,
        s.ingest.max_parked_identities)

    retry_at = [0.0]  # no flush before this (monotonic): the sink asked to wait

    async def flush(reason: str, write: bool = True) -> None:
        """One flush; what failed says which outage the health check is waiting on."""
        liveness.waiting(len(checkpoint.pending.events), time.monotonic(), "flush")
        try:
            await checkpoint.flush(write)
        except Exception as exc:
            # An outage is waited out; anything else (a bug) lets the stall clock run, so
            # /healthz fails and the worker is restarted.
            if isinstance(exc, SinkUnavailable):
                retry_at[0] = time.monotonic() + exc.retry_after
                liveness.outage("clickhouse", True, time.monotonic())
            elif isinstance(exc, KafkaError | TimeoutError | OSError):
                liveness.outage("kafka", True, time.monotonic())
            log.warning("flush (%s) failed; will retry: %s", reason, exc)
            raise
        now = time.monotonic()
        liveness.outage("kafka", False, now)
        if write:  # a flush that only published alerts did not write ClickHouse
            liveness.outage("clickhouse", False, now)
            liveness.waiting(0, now, "flush")
        liveness.progress(now)

    async def flush_until_done(reason: str) -> None:
        """Bounded memory: flush before taking more; while Kafka or ClickHouse is out,
        wait (with back-off) instead of buffering without end."""
        delay = 0.5
        while not runtime.closing:
            try:
                await flush(reason)
                return
            except Exception:
                await asyncio.sleep(max(delay, retry_at[0] - time.monotonic()))
                delay = min(delay * 2, BACKOFF_MAX_S)

    @app.agent(ingested)
    async def account_state(stream: Any) -> None:
        manual = stream.noack()
        runtime.stream = manual
        try:
            await asyncio.wait_for(sink_started.wait(), SINK_START_WAIT_S)
        except TimeoutError:
            log.warning("ClickHouse sink still starting after %.0f s; folding anyway",
                        SINK_START_WAIT_S)
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
            left = len(batch)
            liveness.waiting(left, time.monotonic(), "packs")
            # A revoke part way through the batch: the rest of it is redelivered, every
            # pack of a partition after the first one left out (no gap in what is folded).
            epoch = checkpoint.epoch
            for group in steps(batch, _partition_of, _is_tick, GROUP_MAX_PACKS):
                if epoch != checkpoint.epoch or runtime.closing:
                    break
                # A partition's states must be read back before anything is folded into
                # them; a partition that went to another worker meanwhile is its to apply.
                partition = group[0].message.partition
                if _is_tick(group[0]):
                    if fetched_in(group, runtime.generation):
                        await _tick(group[0], partition)
                elif await store.loads.ready(partition, _owned):
                    # Under the checkpoint's lock: a drain (revoke, shutdown) waits for the
                    # packs being folded, and no fold runs during a drain. A regular flush
                    # does not hold it: folds go on while it writes. A revoke while waiting
                    # for it: the packs are the partition's next owner's (or ours again,
                    # redelivered from the committed offset).
                    async with checkpoint.folding(epoch) as current:
                        if not current:
                            break
                        fresh = fetched_in(group, runtime.generation)
                        if len(fresh) < len(group):
                            log.info("%d pack(s) of partition %d fetched before a rebalance "
                                     "left for redelivery from the committed offset",
                                     len(group) - len(fresh), partition)
                        if fresh:
                            _fold(fresh)
                left -= len(group)
                now = time.monotonic()
                liveness.progress(now)
                liveness.waiting(left, now, "packs")
                if checkpoint.pending.count >= s.sink.batch_max_rows:
                    await flush_until_done("batch full")
                elif left:
                    # A full step is up to ~100,000 events (a second or more of folding):
                    # between its groups, the web views, the heartbeats and the flush run.
                    await asyncio.sleep(0)
            if len(batch) < PACKS_PER_STEP and ingestor.backlog() >= BACKLOG_EVENTS:
                # Catching up: the ingest is behind and packs trickle in. Let them gather
                # (the ingest has the core meanwhile) and fold them as one step: an account's
                # per-batch work (prune, score, rows) is then paid once for more events.
                # Live, every pack is folded as it comes, for latency.
                await asyncio.sleep(BACKLOG_WAIT_S)

    flushes: set[asyncio.Future[Any]] = set()

    async def flush_quietly(reason: str, write: bool = True) -> None:
        with contextlib.suppress(Exception):  # logged; the packs stay unacked
            await flush(reason, write)

    def flush_if_due() -> None:
        # Not awaited: the next flush may store states and publish alerts while this one
        # writes ClickHouse (never more than that one: it holds ``flushing`` until then).
        if runtime.stream is None or runtime.closing or checkpoint.flushing.locked():
            return
        # While ClickHouse is backed off from, alerts still go out as they are decided
        # (stored with their rows' outbox records, as by any alert-only flush).
        why = checkpoint.due_for(s.sink.batch_max_rows, s.sink.flush_interval_s,
                                 writable=time.monotonic() >= retry_at[0])
        if why is not None:
            task = asyncio.ensure_future(flush_quietly(why, write=why == "rows"))
            flushes.add(task)
            task.add_done_callback(flushes.discard)

    @app.timer(min(ALERT_FLUSH_S / 2, s.sink.flush_interval_s / 2))
    async def flush_when_due() -> None:
        # Quiet periods: rows reach ClickHouse within the flush interval, alerts at once.
        flush_if_due()

    async def drain() -> None:
        if runtime.stream is not None:
            async with checkpoint.lock:  # no fold in between: what follows is the last flush
                await asyncio.wait_for(checkpoint.flush(), timeout=30)

    async def drain_for_shutdown() -> None:
        runtime.closing = True  # packs Faust still hands the agent are not applied
        try:
            await drain()
        except Exception as exc:  # an outage at shutdown: logged, not a crash
            # Nothing the flush held was acknowledged: the partitions' next owner reads it
            # again from the committed offsets (what the stored states hold as duplicates).
            log.warning("shutdown flush did not complete (%s); what it held is read again "
                        "from the committed offsets", exc)

    # Faust starts an instance as well as a class (_prepare_subservice); its annotation
    # says class only.
    app.service(IngestService(ingestor, on_drained=drain_for_shutdown))  # type: ignore[arg-type]

    def _owned(partition: int) -> bool:
        return TP(s.ingested_topic, partition) in app.consumer.assignment()

    # mode types receivers as (sender, *args, signal=..., **kwargs); Faust sends (sender,
    # assigned, signal=...), which this signature takes.
    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def load_states(sender: Any, assigned: Any, **kwargs: Any) -> None:
        # Read back the states of newly assigned partitions (in the background: the agent
        # waits per partition); drop those of partitions that went elsewhere.
        parts = {tp.partition for tp in assigned if tp.topic == s.ingested_topic}
        runtime.generation = app.consumer_generation_id  # set before this signal
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

        def before_sleep(state: RetryCallState) -> None:
            liveness.outage("kafka", True, time.monotonic())
            log.warning("reading states of partitions %s failed (%s); retrying",
                        sorted(partitions), state.outcome.exception() if state.outcome else None)

        # A flush from before the revoke that outlived the drain writes first: what it stores
        # and publishes is then in what is read back.
        if not await checkpoint.settled(2 * checkpoint.step_timeout_s):
            log.warning("a flush from before the rebalance is still running; reading states "
                        "of partitions %s anyway", sorted(partitions))
        # Until it works: the broker comes back; a cancel (a newer assignment) is not retried.
        async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.5, max=10.0), reraise=True,
                before_sleep=before_sleep):
            with attempt:
                got = await read_partitions(s, partitions)
        liveness.outage("kafka", False, time.monotonic())
        boxed = 0
        for records in got.values():
            # What the partition's last owner stored but had not delivered yet: written and
            # published by the next flush (stream.outbox).
            box = {k: v for k, v in records.items() if outbox.is_outbox(k, v)}
            for key in box:
                del records[key]
            if box:
                found = outbox.read(box)
                for key, why in found.unreadable.items():
                    log.error("outbox record %r could not be read (%s); left in place, "
                              "undelivered", key, why)
                checkpoint.recover(found)
                boxed += len(box)
            store.load(records)
        await store.loads.mark_loaded(partitions)
        log.info("states loaded", extra={
            "partitions": sorted(partitions), "keys": sum(len(r) for r in got.values()),
            "outbox_records": boxed, "seconds": round(time.monotonic() - started, 3)})

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # as load_states
    async def flush_before_revoke(sender: Any, revoked: Any, **kwargs: Any) -> None:
        # Rebalance or shutdown: make buffered rows and states durable, ack their packs.
        runtime.generation = None  # nothing more is folded until the next assignment
        try:
            await drain()
        except Exception:  # the packs stay unacked and are redelivered to the new owner
            log.warning("flush before revoke failed", exc_info=True)
        # A flush that outlived the drain's wait puts nothing back when it fails; what is
        # left (after a failed drain, or a re-score tick's slices) belongs to packs that
        # are redelivered, and goes with the working states.
        if checkpoint.revoked():
            # The outbox may hold what was not delivered: partitions kept read it back.
            store.loads.reload_all()
        checkpoint.pending.take()
        store.forget()
        now = time.monotonic()
        liveness.waiting(0, now, "packs")
        liveness.waiting(0, now, "flush")
        liveness.progress(now)
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


def fetched_in(group: list[Any], generation: int | None) -> list[Any]:
    """The packs of ``group`` fetched in ``generation`` (None: a revoke and no assignment
    since: none). Faust may hand over a pack it fetched before a revoke in a batch after
    it; that pack is redelivered from the committed offset (to this worker or the
    partition's new owner), and folding it first would make the partition's earlier packs,
    left out by the revoke, look like duplicates of it (its events' offsets are newer)."""
    if generation is None:
        return []
    return [event for event in group if event.message.generation_id == generation]


def _partition_of(event: Any) -> int:
    return int(event.message.partition)


def _is_tick(event: Any) -> bool:
    return packs.is_tick(event.value)
