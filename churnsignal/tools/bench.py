"""`churnsignal bench`: throughput, latency and memory against the ceiling and the peers, one run.

Every system reads the same pre-produced data set on the same broker: a bare aiokafka consumer
(the ceiling), the textbook Faust windowed count, the same count in Quix Streams, and
churnsignal end to end (decode, validate, state, score, alerts, ClickHouse, offsets), under
the shipped rules policy and under a model policy as calibrate writes one (every feature, the
data set's event types tracked per day): what a calibrated deployment costs. The same data
set is then replayed as `churnsignal backtest` replays a history, under both policies.

Two workers of one deployment (one consumer group) then share that data set (the scale-out
row), and a second, dense data set (few accounts, many events a day each) is read by the
ceiling, Quix Streams and churnsignal: the sparse set is the many-accounts case, the dense
one the many-events-per-account case.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from churnsignal.app.embedded import free_port, wait_for_port
from churnsignal.app.kafka_client import ensure_topics
from churnsignal.app.settings import Settings
from churnsignal.stream.features import catalogue
from churnsignal.stream.policy import Model, Policy
from churnsignal.tools.demo import http_json, start_worker, stop_process
from churnsignal.tools.synthetic import (
    DAY,
    FEATURES,
    segment_track,
    stripe_event,
    stripe_subscription,
    zendesk_ticket,
)

PEERS = ("ceiling", "faust-agent", "faust", "quix")
# The Faust peers are references, not targets, and the slowest to run (~2 min a run for the
# windowed table): run once, so that `make bench` with the dense set and the scale-out row
# stays near 20 minutes. The ceiling and Quix, the ratios' denominators, run every time.
ONCE_PEERS = ("faust-agent", "faust")
DENSE_PEERS = ("ceiling", "quix")  # the Faust peers would take most of the bench on it
MODEL_TYPES = 8  # calibrate's default number of tracked event types
MODEL = "churnsignal-model"
SEPARATE = "churnsignal-ingest-process"  # ingest.separate_process: the ingest in a child
SEPARATE_ENV = {"CHURNSIGNAL_INGEST__SEPARATE_PROCESS": "true"}
SCALE_WORKERS = 2
LATENCY_S = 30.0  # the latency phase: an alert every 0.2 s
LABELS = {"ceiling": "ceiling: aiokafka + orjson", "faust-agent": "plain Faust agent (no table)",
          "faust": "Faust windowed table count", "quix": "Quix Streams windowed count",
          "churnsignal": "churnsignal end to end", MODEL: "churnsignal end to end, model policy",
          SEPARATE: "churnsignal end to end, ingest in its own process"}


def model_policy(names: list[str]) -> Policy:
    """The costliest model policy calibrate writes at its defaults: every feature of the
    catalogue over ``MODEL_TYPES`` tracked event types. The coefficients are arbitrary (small,
    alternating signs): the bench measures cost, not ranking."""
    types = [n.lower() for n in names[:MODEL_TYPES]]
    feats = catalogue(types)
    model = Model(event_types=types, features=[f.name for f in feats],
                  transforms=[f.transform for f in feats],
                  means=[0.0] * len(feats), scales=[1.0] * len(feats),
                  coefficients=[0.1 if i % 2 else -0.1 for i in range(len(feats))],
                  intercept=-2.0)
    return Policy(version="bench-model", model=model)


@dataclass
class Dataset:
    prefix: str
    events: int
    accounts: int
    partitions: int = 4
    topics: dict[str, str] = field(default_factory=dict)


Record = tuple[str, bytes, bytes, float]  # (kind, key, value, event time)


def _record(i: int, a: int, ts: float, roll: float) -> Record:
    """Event ``i`` of account ``a`` at ``ts``; ``roll`` in [0, 1) picks the kind: 90 % Segment
    track, 7 % Stripe (invoice.paid, subscription updates), 3 % Zendesk tickets."""
    account = f"acct-{a:06d}"
    key = account.encode()
    if roll < 0.90:
        feature = FEATURES[i % len(FEATURES)]
        value = segment_track(account, f"{account}-u{i % 7}", f"{feature.title()} Viewed", ts,
                              f"m{i}", feature)
        return ("usage", key, value, ts)
    if roll < 0.97:
        if roll < 0.95:
            obj = {"id": f"in_{i}", "object": "invoice", "customer": f"cus_{a}",
                   "amount_due": 4900, "currency": "usd", "attempt_count": 1,
                   "subscription_details": {"metadata": {"account_id": account}}}
            value = stripe_event("invoice.paid", obj, ts, f"evt_{i}")
        else:
            sub = stripe_subscription(account, "active", 1 + a % 20, 4900)
            value = stripe_event("customer.subscription.updated", sub, ts, f"evt_{i}")
        return ("billing", key, value, ts)
    value = zendesk_ticket(account, i, "created", ts, f"z{i}", priority="normal", current="new")
    return ("support", key, value, ts)


def generate(events: int, accounts: int, now: float, seed: int = 11) -> list[Record]:
    """A realistic mix with skewed activity: (kind, key, value, event time), in time order."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 0.8 for rank in range(accounts)]
    picks = rng.choices(range(accounts), weights, k=events)
    times = sorted(now - rng.uniform(0, 30 * DAY) for _ in range(events))
    return [_record(i, a, ts, rng.random())
            for i, (a, ts) in enumerate(zip(picks, times, strict=True))]


def generate_dense(accounts: int, days: int, per_day: int, now: float,
                   seed: int = 13) -> Iterator[Record]:
    """Dense daily use: every account sends ``per_day`` events on each of the last ``days``
    days (the same mix as `generate`), in time order. Payloads are built as they are
    produced: 600,000 of them at once would be ~0.5 GB for nothing."""
    rng = random.Random(seed)
    start = now - days * DAY
    slots = sorted((start + (d + rng.random()) * DAY, a)
                   for a in range(accounts) for d in range(days) for _ in range(per_day))
    for i, (ts, a) in enumerate(slots):
        yield _record(i, a, ts, rng.random())


async def produce_dataset(bootstrap: str, data: Dataset, records: Iterable[Record]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, acks="all",
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        for kind, key, value, ts in records:
            await producer.send(data.topics[kind], value, key=key, timestamp_ms=int(ts * 1000))
        await producer.flush()
    finally:
        await producer.stop()


def run_peer(kind: str, bootstrap: str, data: Dataset, timeout: float) -> float:
    env = {**os.environ, "BENCH_PARTITIONS": str(data.partitions)}
    proc = subprocess.run([sys.executable, "-m", "churnsignal.tools.bench_peers", kind, bootstrap,
                           str(data.events), *data.topics.values()], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{kind} printed no result: {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    return float(result["events"]) / max(1e-9, result["last"] - result["first"])


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
        return resp.read().decode()


@dataclass
class BenchWorker:
    """A `churnsignal worker` process the bench started, and what it measured of it."""

    proc: subprocess.Popen[bytes]
    port: int
    state: Path
    ps: psutil.Process | None = None
    applied: float = 0.0
    peak_rss: int = 0
    cpu_start: float = 0.0  # user + system CPU seconds at the start of the measured span
    cpu_end: float = 0.0

    def cpu(self) -> float:
        assert self.ps is not None
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    @property
    def cpu_s(self) -> float:
        return self.cpu_end - self.cpu_start


def _worker_env(data: Dataset, app_id: str, policy_file: Path | None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"CHURNSIGNAL_APP_ID": app_id, "CHURNSIGNAL_LOG_LEVEL": "warning",
           "CHURNSIGNAL_TOPICS__USAGE": data.topics["usage"],
           "CHURNSIGNAL_TOPICS__BILLING": data.topics["billing"],
           "CHURNSIGNAL_TOPICS__SUPPORT": data.topics["support"],
           "CHURNSIGNAL_TOPICS__ALERTS": f"{app_id}.alerts",
           "CHURNSIGNAL_TOPICS__DLQ": f"{app_id}.dlq",
           "CHURNSIGNAL_RESCORE_INTERVAL_S": "600"}
    if policy_file is not None:
        env["CHURNSIGNAL_POLICY_FILE"] = str(policy_file)
    return {**env, **(extra or {})}


def _start_workers(settings: Settings, bootstrap: str, env: dict[str, str], n: int,
                   deadline: float) -> list[BenchWorker]:
    """``n`` workers of one deployment (``env`` names the app id, so one consumer group), each
    with its own state directory (chdb: one embedded ClickHouse per process) and web port.
    All are started before any is waited for, so that they join the group together."""
    workers: list[BenchWorker] = []
    try:
        for _ in range(n):
            state = Path(tempfile.mkdtemp(prefix="churnsignal-bench-"))
            port = free_port()
            workers.append(BenchWorker(start_worker(settings, bootstrap, state, port,
                                                    extra_env=env), port, state))
        for w in workers:
            if not wait_for_port(w.port, max(1.0, min(120.0, deadline - time.monotonic()))):
                raise RuntimeError(f"worker did not start; see {w.state / 'worker.log'}")
            w.ps = psutil.Process(w.proc.pid)
    except BaseException:
        _stop_workers(workers)
        raise
    return workers


def _stop_workers(workers: list[BenchWorker]) -> None:
    for w in workers:
        stop_process(w.proc)


def _measure(workers: list[BenchWorker], expected: int, deadline: float, timeout: float
             ) -> tuple[float, float]:
    """Poll the workers' metrics until the events they applied add up to ``expected``;
    returns the wall times (first, last) of the span in which they applied them."""
    first = 0.0
    idle_at = 0.0  # the last poll that saw nothing applied yet
    applied = 0.0
    while time.monotonic() < deadline:
        for w in workers:
            w.applied = _metric(_metrics(w.port), "churnsignal_events_applied_total")
        now = time.time()
        cpus = [w.cpu() for w in workers]
        applied = sum(w.applied for w in workers)
        if not applied:
            # Not from the first event read: between it and the first applied, the workers
            # wait (no CPU) for the state agent's group to form, a one-time cost.
            idle_at = now
            for w, cpu in zip(workers, cpus, strict=True):
                w.cpu_start = cpu
        elif not first:
            # Work began after the last idle poll: counting from there keeps a small
            # data set, applied between two polls, from dividing by almost nothing.
            first = idle_at or now
        for w in workers:
            assert w.ps is not None
            w.peak_rss = max(w.peak_rss, w.ps.memory_info().rss)
        if applied >= expected:
            for w, cpu in zip(workers, cpus, strict=True):
                w.cpu_end = cpu
            return first, now
        time.sleep(0.1)
    raise RuntimeError(f"churnsignal applied {applied} of {expected} in {timeout}s")


def run_churnsignal(settings: Settings, bootstrap: str, data: Dataset, timeout: float,
                    keep: bool = False, policy_file: Path | None = None,
                    extra_env: dict[str, str] | None = None
                    ) -> tuple[float, dict[str, Any], subprocess.Popen[bytes] | None]:
    """Worker process on the data set; returns (events/s, facts, running worker if keep)."""
    deadline = time.monotonic() + timeout
    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    env = _worker_env(data, app_id, policy_file, extra_env)
    [worker] = _start_workers(settings, bootstrap, env, 1, deadline)
    try:
        first, last = _measure([worker], data.events, deadline, timeout)
        # States are stored by the flush after the last pack: wait for it (at most 10 s).
        for _ in range(100):
            summary = http_json(worker.port, "/api/summary")
            if summary["stats"].get("accounts"):
                break
            time.sleep(0.1)
    except BaseException:
        stop_process(worker.proc)
        raise
    facts = {"peak_rss_mb": worker.peak_rss / 2**20,
             "alerts_topic": env["CHURNSIGNAL_TOPICS__ALERTS"],
             "accounts": summary["stats"].get("accounts", 0),
             "state_bytes_per_account": summary["stats"].get("state_bytes_per_account", 0),
             "cpu_s": worker.cpu_s, "port": worker.port, "topics": env}
    if not keep:
        stop_process(worker.proc)
    return worker.applied / max(1e-9, last - first), facts, worker.proc if keep else None


def run_scale_out(settings: Settings, bootstrap: str, data: Dataset, timeout: float,
                  n: int = 2) -> dict[str, Any]:
    """``n`` workers (rules policy) of one deployment on the data set at once: they split the
    topics' partitions. Total events/s until their applied events add up to the data set,
    and each worker's CPU seconds over that span and peak RSS."""
    deadline = time.monotonic() + timeout
    env = _worker_env(data, f"bench-{uuid.uuid4().hex[:8]}", None)
    workers = _start_workers(settings, bootstrap, env, n, deadline)
    try:
        first, last = _measure(workers, data.events, deadline, timeout)
    finally:
        _stop_workers(workers)
    return {"eps": sum(w.applied for w in workers) / max(1e-9, last - first),
            "seconds": last - first,
            "cpu_s_per_worker": [w.cpu_s for w in workers],
            "peak_rss_mb_per_worker": [w.peak_rss / 2**20 for w in workers],
            "applied_per_worker": [int(w.applied) for w in workers]}


def latency_event(i: int, accounts: int, ts: float, message_id: str) -> tuple[str, bytes]:
    """The latency load's ``i``-th usage event: the accounts in turn, one user each."""
    account = f"acct-{i % accounts:06d}"
    return account, segment_track(account, f"{account}-u1", "Reports Viewed", ts, message_id,
                                  "reports")


async def measure_latency(bootstrap: str, data: Dataset, alerts_topic: str, rate: float,
                          seconds: float) -> list[float]:
    """Produce at ``rate`` with a cancellation for a fresh account every 0.2 s; time to alert
    (``math.inf`` for an alert that did not come within 15 s of the end)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    # A short fetch wait, as the worker's: Tansu holds a fetch for its whole wait.
    consumer = AIOKafkaConsumer(alerts_topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="latest", fetch_max_wait_ms=100)
    await producer.start()
    await consumer.start()
    await consumer.seek_to_end()
    sent: dict[str, float] = {}
    got: dict[str, float] = {}

    async def collect() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    account = orjson.loads(rec.value)["account_id"]
                    if account in sent and account not in got:
                        got[account] = now

    reader = asyncio.create_task(collect())
    try:
        start = time.time()
        i = 0
        next_marker = start
        while time.time() - start < seconds:
            tick = time.time()
            for _ in range(max(1, int(rate / 20))):
                i += 1
                account, value = latency_event(i, data.accounts, time.time(),
                                               f"lat-m{i}-{start}")
                await producer.send(data.topics["usage"], value, key=account.encode())
            if tick >= next_marker:
                account = f"lat-{uuid.uuid4().hex[:10]}"
                sub = stripe_subscription(account, "active", 3, 4900, cancel_at_period_end=True)
                sent[account] = time.time()
                await producer.send(data.topics["billing"], stripe_event(
                    "customer.subscription.updated", sub, time.time(), f"evt_{account}",
                    {"cancel_at_period_end": False}), key=account.encode())
                next_marker += 0.2
            await asyncio.sleep(max(0.0, 0.05 - (time.time() - tick)))
        await producer.flush()
        wait_until = time.time() + 15
        while len(got) < len(sent) and time.time() < wait_until:
            await asyncio.sleep(0.1)
    finally:
        reader.cancel()
        await consumer.stop()
        await producer.stop()
    # An alert that never came counts as infinitely late: a p99 over what arrived would
    # hide a lost one.
    return sorted(got[a] - sent[a] if a in got else math.inf for a in sent)


def _secs(value: float) -> str:
    """A latency for the console: an alert that never came (inf) said so."""
    return f"{value:.3f}s" if math.isfinite(value) else "not within 15 s of the end"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def new_dataset(settings: Settings, bootstrap: str, prefix: str, events: int,
                accounts: int) -> Dataset:
    """A data set's topics (``prefix``.usage, .billing, .support), created on the broker."""
    data = Dataset(prefix=f"{prefix}{uuid.uuid4().hex[:6]}", events=events, accounts=accounts,
                   partitions=settings.partitions)
    data.topics = {k: f"{data.prefix}.{k}" for k in ("usage", "billing", "support")}
    topic_settings = settings.model_copy(update={
        "kafka_bootstrap_servers": bootstrap,
        "topics": settings.topics.model_copy(update={
            "usage": data.topics["usage"], "billing": data.topics["billing"],
            "support": data.topics["support"]})})
    # Explicit retention: the data set keeps old timestamps, and Quix reads retention.ms.
    asyncio.run(ensure_topics(topic_settings, {"retention.ms": "-1"}))
    return data


def run_bench(settings: Settings, bootstrap: str, *, events: int, accounts: int, runs: int,
              out_dir: Path, peers: tuple[str, ...] = PEERS, dense_accounts: int = 0,
              dense_days: int = 30, dense_per_day: int = 20,
              scale_out: bool = False, latency_s: float = LATENCY_S) -> dict[str, Any]:
    console = Console()
    data = new_dataset(settings, bootstrap, "bench", events, accounts)
    console.print(f"generating {events:,} events over {accounts:,} accounts ...")
    records = generate(events, accounts, time.time())
    started = time.monotonic()
    asyncio.run(produce_dataset(bootstrap, data, records))
    console.print(f"produced in {time.monotonic() - started:.1f}s to {bootstrap}")
    work = Path(tempfile.mkdtemp(prefix="churnsignal-bench-"))
    history = work / "history.jsonl"
    with history.open("wb") as fh:  # the same payloads, for the replay
        for _, _, payload, _ in records:
            fh.write(payload + b"\n")
    names = sorted({orjson.loads(v).get("event", "") for kind, _, v, _ in records[:5000]
                    if kind == "usage"} - {""})
    del records
    model = model_policy(names)
    model_file = work / "model-policy.yaml"
    model_file.write_text(yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False))
    eps: dict[str, list[float]] = {name: [] for name in (*peers, "churnsignal", MODEL, SEPARATE)}
    facts: dict[str, Any] = {}
    model_facts: dict[str, Any] = {}
    scale_runs: list[dict[str, Any]] = []
    worker = None
    for run in range(runs):
        for name in peers:
            if run and name in ONCE_PEERS:
                continue
            eps[name].append(run_peer(name, bootstrap, data, timeout=120 + events / 500))
            console.print(f"run {run + 1}/{runs} {name:<12} {eps[name][-1]:>10,.0f} events/s")
        value, model_facts, _ = run_churnsignal(settings, bootstrap, data, 900,
                                                policy_file=model_file)
        eps[MODEL].append(value)
        console.print(f"run {run + 1}/{runs} {'churnsignal, model policy':<12} "
                      f"{value:>10,.0f} events/s")
        if scale_out and run == runs - 1:  # once: it shows how it grows, not a target
            # Before the one-worker run: the last of those stays up for the latency test.
            scale_runs.append(run_scale_out(settings, bootstrap, data, 900, SCALE_WORKERS))
            console.print(f"run {run + 1}/{runs} churnsignal, {SCALE_WORKERS} workers "
                          f"{scale_runs[-1]['eps']:>10,.0f} events/s (applied per worker: "
                          f"{', '.join(f'{n:,}' for n in scale_runs[-1]['applied_per_worker'])})")
        keep = run == runs - 1
        value, facts, worker = run_churnsignal(settings, bootstrap, data, 900, keep=keep)
        eps["churnsignal"].append(value)
        console.print(f"run {run + 1}/{runs} {'churnsignal':<12} {value:>10,.0f} events/s")
        if not keep:  # the last one runs after the latency phase above (not beside it)
            eps[SEPARATE].append(run_churnsignal(settings, bootstrap, data, 900,
                                                 extra_env=SEPARATE_ENV)[0])
            console.print(f"run {run + 1}/{runs} churnsignal, ingest in its own process "
                          f"{eps[SEPARATE][-1]:>10,.0f} events/s")
    median = {name: statistics.median(v) for name, v in eps.items() if v}
    latencies: list[float] = []
    try:
        rate = median["churnsignal"] / 2
        console.print(f"latency at {rate:,.0f} events/s (half the measured maximum) ...")
        # 30 s: 150 alerts, so the p99 is not simply the slowest one
        latencies = asyncio.run(measure_latency(bootstrap, data, facts["alerts_topic"], rate,
                                                latency_s))
    finally:
        if worker is not None:
            stop_process(worker)
    # The ingest in a child process (ingest.separate_process): its last run, then its
    # latency at half its own maximum.
    value, separate_facts, worker = run_churnsignal(settings, bootstrap, data, 900, keep=True,
                                                    extra_env=SEPARATE_ENV)
    eps[SEPARATE].append(value)
    console.print(f"run {runs}/{runs} churnsignal, ingest in its own process "
                  f"{value:>10,.0f} events/s")
    median[SEPARATE] = statistics.median(eps[SEPARATE])
    separate_latencies: list[float] = []
    try:
        rate = median[SEPARATE] / 2
        console.print(f"latency at {rate:,.0f} events/s (half its maximum), ingest in its own "
                      "process ...")
        separate_latencies = asyncio.run(measure_latency(
            bootstrap, data, separate_facts["alerts_topic"], rate, latency_s))
    finally:
        if worker is not None:
            stop_process(worker)
    load_s, loaded = _time_state_load(settings, bootstrap, facts)
    replay = {label: _time_replay(history, policy)
              for label, policy in (("rules", Policy()), ("model", model))}
    for label, value in replay.items():
        console.print(f"replay (backtest) of the data set, {label} policy: {value:,.0f} events/s")
    scale = _scale_out_results(scale_runs, median["churnsignal"], facts) if scale_runs else None
    dense = None
    if dense_accounts > 0 and dense_days > 0 and dense_per_day > 0:
        dense = run_dense(settings, bootstrap, console, accounts=dense_accounts, days=dense_days,
                          per_day=dense_per_day, runs=1,
                          peers=tuple(p for p in peers if p in DENSE_PEERS))
    results = {
        "ceiling_eps": median.get("ceiling"),
        "faust_agent_eps": median.get("faust-agent"),
        "faust_count_eps": median.get("faust"),
        "quix_count_eps": median.get("quix"),
        "churnsignal_eps": median["churnsignal"],
        "churnsignal_model_policy_eps": median[MODEL],
        "model_policy": {"features": len(model.model.features) if model.model else 0,
                         "event_types": model.tracked_types},
        "model_policy_state_bytes_per_account": model_facts.get("state_bytes_per_account"),
        "replay_rules_eps": replay["rules"],
        "replay_model_eps": replay["model"],
        "latency_p50_s": _pct(latencies, 0.50),
        "latency_p99_s": _pct(latencies, 0.99),
        "latency_samples": len(latencies),
        "latency_missing": sum(1 for v in latencies if v == math.inf),
        "latency_phase_s": latency_s,
        "churnsignal_ingest_process_eps": median[SEPARATE],
        "ingest_process_cpu_s": separate_facts.get("cpu_s"),
        "ingest_process_latency_p50_s": _pct(separate_latencies, 0.50),
        "ingest_process_latency_p99_s": _pct(separate_latencies, 0.99),
        "ingest_process_latency_missing": sum(1 for v in separate_latencies if v == math.inf),
        "state_bytes_per_account": facts.get("state_bytes_per_account"),
        "peak_rss_mb": facts.get("peak_rss_mb"),
        "accounts_tracked": facts.get("accounts"),
        "state_load_s": load_s,  # reading every partition's states back (a takeover)
        "state_keys_loaded": loaded,
        "runs": {name: v for name, v in eps.items()},
        "events": events,
        "accounts": accounts,
        "scale_out": scale,
        "dense": dense,
        "broker": "embedded Tansu" if settings.embedded_broker else bootstrap,
        "machine": {"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total
                                                                   / 2**30, 1),
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(_eps_table(f"churnsignal bench: {events:,} events, {accounts:,} accounts, "
                             f"{runs} run(s) each", eps, median))
    console.print(f"event-to-alert latency at half the max rate: p50 "
                  f"{_secs(_pct(latencies, 0.50))}, p99 {_secs(_pct(latencies, 0.99))} "
                  f"({len(latencies)} alerts, {results['latency_missing']} never came)")
    ratios = ", ".join(f"{median[SEPARATE] / median[peer]:.2f}x {name}"
                       for peer, name in (("quix", "Quix Streams"), ("ceiling", "the ceiling"))
                       if median.get(peer))
    console.print(f"ingest in its own process: {median[SEPARATE]:,.0f} events/s"
                  + (f" ({ratios})" if ratios else ""))
    console.print(f"ingest in its own process: event-to-alert at half its max rate: p50 "
                  f"{_secs(_pct(separate_latencies, 0.50))}, p99 "
                  f"{_secs(_pct(separate_latencies, 0.99))} ({len(separate_latencies)} "
                  f"alerts, {results['ingest_process_latency_missing']} never came)")
    console.print(f"peak RSS {results['peak_rss_mb']:.0f} MB; state "
                  f"{results['state_bytes_per_account']:.0f} bytes per account "
                  f"({results['accounts_tracked']:,} accounts)")
    n_features = len(model.model.features) if model.model else 0
    console.print(f"model policy: {n_features} features, "
                  f"{len(model.tracked_types)} event types tracked; state "
                  f"{results['model_policy_state_bytes_per_account'] or 0:.0f} bytes per account")
    console.print(f"reading all state back (what a worker taking every partition over "
                  f"does): {load_s:.2f}s for {loaded:,} keys")
    if scale is not None:
        console.print(_scale_out_table(scale, median["churnsignal"], facts, events))
    if dense is not None:
        console.print(_dense_table(dense))
    console.print(f"written: {out_dir / 'results.json'}")
    return results


def _eps_table(title: str, eps: dict[str, list[float]], median: dict[str, float]) -> Table:
    table = Table(title=title)
    table.add_column("system")
    table.add_column("events/s (median)", justify="right")
    table.add_column("min - max", justify="right")
    table.add_column("churnsignal / system", justify="right")
    for name, values in eps.items():
        table.add_row(LABELS[name], f"{median[name]:,.0f}",
                      f"{min(values):,.0f} - {max(values):,.0f}",
                      f"{median['churnsignal'] / median[name]:.2f}x")
    return table


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower one of an even number): its CPU and memory
    figures go with the median rate reported."""
    return sorted(runs, key=lambda r: float(r["eps"]))[(len(runs) - 1) // 2]


def _scale_out_results(runs: list[dict[str, Any]], one_worker_eps: float,
                       facts: dict[str, Any]) -> dict[str, Any]:
    eps = statistics.median(r["eps"] for r in runs)
    mid = _median_run(runs)
    return {"workers": len(mid["cpu_s_per_worker"]), "eps": eps,
            "vs_one_worker": eps / one_worker_eps,
            "cpu_s_per_worker": mid["cpu_s_per_worker"],
            "peak_rss_mb_per_worker": mid["peak_rss_mb_per_worker"],
            "applied_per_worker": mid["applied_per_worker"],
            "one_worker_cpu_s": facts.get("cpu_s"),  # the last one-worker run's
            "runs": runs}


def _scale_out_table(scale: dict[str, Any], one_eps: float, facts: dict[str, Any],
                     events: int) -> Table:
    table = Table(title="scale-out: workers of one deployment (one consumer group), the same "
                        "data set")
    table.add_column("system", min_width=13)
    for column in ("events/s (median)", "vs one worker", "CPU s per worker",
                   "events per CPU-second", "peak RSS per worker"):
        table.add_column(column, justify="right")
    one_cpu = facts.get("cpu_s") or 0.0
    table.add_row("churnsignal, 1 worker", f"{one_eps:,.0f}", "1.00x", f"{one_cpu:.1f}",
                  f"{events / max(1e-9, one_cpu):,.0f}", f"{facts['peak_rss_mb']:.0f} MB")
    cpus = scale["cpu_s_per_worker"]
    table.add_row(f"churnsignal, {scale['workers']} workers", f"{scale['eps']:,.0f}",
                  f"{scale['vs_one_worker']:.2f}x", " / ".join(f"{c:.1f}" for c in cpus),
                  f"{sum(scale['applied_per_worker']) / max(1e-9, sum(cpus)):,.0f}",
                  " / ".join(f"{m:.0f}" for m in scale["peak_rss_mb_per_worker"]) + " MB")
    return table


def run_dense(settings: Settings, bootstrap: str, console: Console, *, accounts: int, days: int,
              per_day: int, runs: int, peers: tuple[str, ...]) -> dict[str, Any]:
    """The dense data set (``accounts`` x ``days`` x ``per_day`` events) on its own topics:
    the ``peers`` given (of the ceiling and Quix) and churnsignal under the rules."""
    events = accounts * days * per_day
    data = new_dataset(settings, bootstrap, "dense", events, accounts)
    console.print(f"dense data set: {events:,} events, {accounts:,} accounts x {days} days x "
                  f"{per_day} a day ...")
    started = time.monotonic()
    asyncio.run(produce_dataset(bootstrap, data, generate_dense(accounts, days, per_day,
                                                                time.time())))
    console.print(f"generated and produced in {time.monotonic() - started:.1f}s")
    eps: dict[str, list[float]] = {name: [] for name in (*peers, "churnsignal")}
    facts: dict[str, Any] = {}
    for run in range(runs):
        for name in peers:
            eps[name].append(run_peer(name, bootstrap, data, timeout=120 + events / 500))
            console.print(f"dense run {run + 1}/{runs} {name:<12} {eps[name][-1]:>10,.0f} "
                          "events/s")
        value, facts, _ = run_churnsignal(settings, bootstrap, data, 900 + events / 500)
        eps["churnsignal"].append(value)
        console.print(f"dense run {run + 1}/{runs} {'churnsignal':<12} {value:>10,.0f} events/s")
    median = {name: statistics.median(v) for name, v in eps.items()}
    return {"events": events, "accounts": accounts, "days": days, "per_day": per_day,
            "ceiling_eps": median.get("ceiling"), "quix_count_eps": median.get("quix"),
            "churnsignal_eps": median["churnsignal"],
            "peak_rss_mb": facts.get("peak_rss_mb"),
            "state_bytes_per_account": facts.get("state_bytes_per_account"),
            "accounts_tracked": facts.get("accounts"),
            "runs": eps}


def _dense_table(dense: dict[str, Any]) -> Table:
    runs: dict[str, list[float]] = dense["runs"]
    return _eps_table(f"dense data set: {dense['events']:,} events, {dense['accounts']:,} "
                      f"accounts x {dense['days']} days x {dense['per_day']} a day", runs,
                      {name: statistics.median(v) for name, v in runs.items()})


def _time_replay(history: Path, policy: Policy) -> float:
    """Events per second of `churnsignal backtest` over the data set's payloads (read,
    decode, fold, score at every day's end, evaluate)."""
    from churnsignal.offline.backtest import Inputs, run_backtest

    lines = sum(1 for _ in history.open("rb"))
    started = time.perf_counter()
    run_backtest(Inputs(history, None, policy, None))
    return lines / (time.perf_counter() - started)


def _time_state_load(settings: Settings, bootstrap: str, facts: dict[str, Any]
                     ) -> tuple[float, int]:
    """Seconds to read every partition of the last run's state topic back."""
    from churnsignal.stream.statelog import read_partitions

    app_settings = settings.model_copy(update={
        "kafka_bootstrap_servers": bootstrap, "app_id": facts["topics"]["CHURNSIGNAL_APP_ID"]})
    started = time.monotonic()
    got = asyncio.run(read_partitions(app_settings, range(settings.partitions)))
    return time.monotonic() - started, sum(len(r) for r in got.values())
