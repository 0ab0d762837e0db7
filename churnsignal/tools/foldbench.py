"""The state side alone, in process: where a worker's folding time goes, stage by stage.

`churnsignal bench` measures end to end, where Kafka, the broker on the same cores and the
machine's hour move the figures by 10-15 % between runs. This builds the packs of the same
data set as the ingest builds them (decode, validate, route), then does what the state agent
and its flush do with them, without Kafka: decode the packs, fold them in steps
(``fold_step``: dedup, fold, prune, score, decide, rows), and at every flush build the daily
rows, serialise the changed states, box the rows and alerts for the outbox and insert the
rows into ClickHouse (chdb, in process). Each stage is timed on its own, and the counts that
decide the per-account costs (account batches and states written per event) are reported.

What it leaves out: Kafka and Faust (reading the packs, writing states and outbox records,
commits), the ingest's own time (packs are built before the clock starts), forwards of
events that waited for their account (the bench's data set names its accounts), and
re-score ticks.

With ``live_events``, a second phase follows on the states the first left: the bench's
latency load (usage events cycling over the accounts, as ``bench`` produces them live), in
the shape a live worker folds it: small packs (one ingest batch of one partition) folded
each as it comes, and a flush every few of them (as alerts make the worker flush). Live,
an account is rarely twice in a pack, so each event pays a whole account batch (score,
decision, rows) and usually its own state write; the ratio of the two phases' cost per
event is what keeps the live worker's capacity below its catch-up rate (docs/benchmark.md).
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from churnsignal.app import gc_tuning
from churnsignal.app.ingest_process import RecordingMetrics
from churnsignal.app.settings import Settings
from churnsignal.schemas.decode import decode
from churnsignal.schemas.results import Rejected
from churnsignal.stream import outbox, packs
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.fold import DAILY, PendingAlert, fold_step
from churnsignal.stream.ingest import Ingestor, options_for
from churnsignal.stream.policy import Policy
from churnsignal.stream.rows import daily_rows
from churnsignal.stream.store import MemoryStateStore
from churnsignal.tools.bench import generate, latency_event

STAGES = ("pack_decode", "fold", "daily_rows", "states", "outbox", "clickhouse")
# The live phase's shape: at bench's half-max load (~13,600 events/s) an ingest batch of
# ~65 ms made a pack of ~220 items per partition, and alerts (5 a second) made the worker
# flush every ~0.2 s, about three batches (docs/benchmark.md, sessions 17-18).
LIVE_PACK_ITEMS = 220
LIVE_FLUSH_EVERY = 3


@dataclass
class FoldBench:
    events: int  # source records of the data set
    items: int  # pack items (events, and links for identities)
    packs: int
    steps: int = 0  # fold_step calls (one partition's packs each)
    flushes: int = 0
    applied: int = 0
    duplicates: int = 0  # events found already applied (none: each pack is folded once)
    batches: int = 0  # account batches, each scored once
    states_written: int = 0  # state serialisations, summed over the flushes
    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    gc_seconds: float = 0.0  # cyclic collections during the run (nearly all within a stage)
    clickhouse_daily_rows: int | None = None  # rows account_daily_data received (chdb)
    stored_keys: int = 0  # states stored at the end (one per account folded)
    live: FoldBench | None = None  # the live phase, when run

    def summary(self) -> dict[str, Any]:
        total = sum(self.seconds.values())
        per_event = {s: 1e6 * t / self.events for s, t in self.seconds.items()}
        return {
            "events": self.events, "items": self.items, "packs": self.packs,
            "steps": self.steps, "flushes": self.flushes, "applied": self.applied,
            "duplicates": self.duplicates,
            "account_batches_per_event": self.batches / self.events,
            "states_written_per_event": self.states_written / self.events,
            "rows": dict(self.rows), "rows_per_event": sum(self.rows.values()) / self.events,
            "us_per_event": per_event, "total_us_per_event": 1e6 * total / self.events,
            "events_per_s": self.events / total if total else 0.0,
            "gc_us_per_event": 1e6 * self.gc_seconds / self.events,
            "clickhouse_daily_rows": self.clickhouse_daily_rows,
            "stored_keys": self.stored_keys,
            **({"live": self.live.summary()} if self.live is not None else {}),
        }


def build_packs(settings: Settings, policy: Policy, events: int, accounts: int, now: float,
                partitions: int) -> tuple[dict[int, list[bytes]], int]:
    """The data set's packs per partition, as the ingest writes them (at most
    ``packs.MAX_PACK_ITEMS`` items each, in source order); and the number of items."""
    records = ((kind, value) for kind, _key, value, _ts in generate(events, accounts, now))
    return _packed(settings, policy, records, now, partitions, defaultdict(int),
                   packs.MAX_PACK_ITEMS)


def _packed(settings: Settings, policy: Policy, records: Iterable[tuple[str, bytes]],
            now: float, partitions: int, offsets: dict[str, int],
            pack_items: int) -> tuple[dict[int, list[bytes]], int]:
    """Source records (kind, value) decoded and routed as the ingest does, in packs of at
    most ``pack_items`` items per partition; ``offsets`` (next offset per kind) advances."""
    options = options_for(settings, policy)
    ingestor = Ingestor(settings, RecordingMetrics(), options)  # type: ignore[arg-type]
    items: dict[int, list[list[Any]]] = defaultdict(list)
    for kind, value in records:
        offset = offsets[kind]
        offsets[kind] += 1
        result = decode(value, options, now)
        for partition, item in ingestor._route(result, f"{kind}/0", offset, partitions):
            items[partition].append(item)
        if not isinstance(result, Rejected) and result.links:
            ingestor._remember_links(result.links)
    built = {p: [packs.encode(now, chunk) for chunk in packs.chunks(data, pack_items)]
             for p, data in sorted(items.items())}
    return built, sum(len(data) for data in items.values())


def live_records(events: int, accounts: int, now: float) -> Iterator[tuple[str, bytes]]:
    """``bench``'s latency load: usage events cycling over the data set's accounts."""
    for i in range(1, events + 1):
        yield "usage", latency_event(i, accounts, now - (events - i) * 1e-4, f"live-{i}")[1]


class _Timer:
    """Wall time per stage, and the collector's share of it."""

    def __init__(self, bench: FoldBench) -> None:
        self.bench = bench
        self._gc_start = 0.0

    def __enter__(self) -> _Timer:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.bench.gc_seconds += time.perf_counter() - self._gc_start


def run(settings: Settings, policy: Policy, events: int = 300_000, accounts: int = 30_000,
        step_events: int = 24_000, flush_every: int = 3, partitions: int = 4,
        clickhouse: bool = True, live_events: int = 0, live_pack: int = LIVE_PACK_ITEMS,
        live_flush_every: int = LIVE_FLUSH_EVERY) -> FoldBench:
    """Fold the data set's packs in steps of about ``step_events`` pack items over all
    partitions (as the agent takes what gathered), flushing every ``flush_every`` steps.
    Then, with ``live_events``, the live phase (``bench.live``): packs of ``live_pack``
    items folded one at a time, a flush every ``live_flush_every`` rounds over the
    partitions. The collector runs as in the worker meanwhile, and as before afterwards."""
    now = time.time()
    offsets: dict[str, int] = defaultdict(int)
    records = ((kind, value) for kind, _key, value, _ts in generate(events, accounts, now))
    built, items = _packed(settings, policy, records, now, partitions, offsets,
                           packs.MAX_PACK_ITEMS)
    bench = FoldBench(events, items, sum(len(p) for p in built.values()))
    live_built: dict[int, list[bytes]] = {}
    if live_events:
        live_built, live_items = _packed(settings, policy,
                                         live_records(live_events, accounts, now), now,
                                         partitions, offsets, live_pack)
        bench.live = FoldBench(live_events, live_items,
                               sum(len(p) for p in live_built.values()))
    thresholds = gc.get_threshold()
    with tempfile.TemporaryDirectory(prefix="churnsignal-foldbench-") as workdir:
        sink: Any = None
        try:
            if clickhouse:
                from churnsignal.sinks.clickhouse import ClickHouseSink

                sink = ClickHouseSink(f"chdb://{workdir}/clickhouse")
                sink._ensure()  # tables made, modules loaded: not part of any stage
            gc_tuning.for_long_lived_state()  # as the worker runs
            store = MemoryStateStore(partitions)
            clocks: dict[int, PartitionClock] = defaultdict(PartitionClock)
            _fold_all(bench, built, policy, partitions, step_events, flush_every, sink,
                      store, clocks)
            if bench.live is not None:
                _fold_all(bench.live, live_built, policy, partitions, live_pack * partitions,
                          live_flush_every, sink, store, clocks)
            if sink is not None:
                [[counted]] = sink.query("SELECT count() FROM account_daily_data").result_rows
                bench.clickhouse_daily_rows = int(counted)
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
            if sink is not None:
                sink.close()
    return bench


def _fold_all(bench: FoldBench, built: dict[int, list[bytes]], policy: Policy,
              partitions: int, step_events: int, flush_every: int, sink: Any,
              store: MemoryStateStore, clocks: dict[int, PartitionClock]) -> None:
    pending: dict[str, list[Any]] = defaultdict(list)
    touched: dict[str, set[int]] = {}
    alerts: list[PendingAlert] = []
    seconds = bench.seconds
    per_partition = max(1, step_events // partitions)
    queues = {p: list(reversed(data)) for p, data in built.items()}

    def flush() -> None:
        if not touched and not store.dirty and not alerts:
            return  # nothing folded since the last one
        t0 = time.perf_counter()
        pending[DAILY] = [row for account, days in touched.items()
                          if (state := store.get(account)) is not None
                          for row in daily_rows(state, days)]
        t1 = time.perf_counter()
        values = store.take_dirty()
        store.stored(values)  # (the state topic's acknowledgement, in the worker)
        t2 = time.perf_counter()
        boxed = outbox.row_records("bench", outbox.by_partition(
            pending, lambda account: packs.partition_for(account, partitions)))
        boxed.update(outbox.alert_records("bench", alerts))
        t3 = time.perf_counter()
        if sink is not None:
            for table, rows in pending.items():
                if rows:
                    sink._insert_now(table, rows)
        t4 = time.perf_counter()
        seconds["daily_rows"] += t1 - t0
        seconds["states"] += t2 - t1
        seconds["outbox"] += t3 - t2
        seconds["clickhouse"] += t4 - t3
        bench.flushes += 1
        bench.states_written += len(values)
        for table, rows in pending.items():
            bench.rows[table] += len(rows)
        pending.clear()
        touched.clear()
        alerts.clear()

    rounds = 0
    with _Timer(bench):
        while any(queues.values()):
            for partition, queue in queues.items():
                taken: list[dict[str, Any]] = []
                count = 0
                t0 = time.perf_counter()
                while queue and count < per_partition:
                    taken.append(packs.decode(queue.pop()))
                    count += len(taken[-1]["items"])
                if not taken:
                    continue
                pack = packs.merge(taken)
                t1 = time.perf_counter()
                result = fold_step(store, pack, partition, 0, policy, clocks[partition])
                seconds["pack_decode"] += t1 - t0
                seconds["fold"] += time.perf_counter() - t1
                # (what the checkpoint does with a result, untimed: a few list operations)
                bench.steps += 1
                bench.applied += result.applied
                bench.duplicates += result.duplicates
                bench.batches += result.batches
                for table, rows in result.rows.items():
                    pending[table].extend(rows)
                alerts.extend(result.alerts)
                for account, days in result.touched.items():
                    touched.setdefault(account, set()).update(days)
            rounds += 1
            if rounds % flush_every == 0:
                flush()
        flush()
    bench.stored_keys = len(store.data)
