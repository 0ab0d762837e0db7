"""Helpers for integration tests: isolated settings, produce, consume, query a stopped worker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from churnsignal.app.embedded import free_port
from churnsignal.app.kafka_client import ensure_topics, read_to_end
from churnsignal.app.settings import Settings
from churnsignal.tools.demo import http_json, start_worker, stop_process


@dataclass
class Env:
    """One test's isolated world: its own app id, topics and state directory."""

    broker: str
    state_dir: Path
    app_id: str

    @property
    def topics(self) -> dict[str, str]:
        return {k: f"{self.app_id}.{k}" for k in ("usage", "billing", "support", "alerts", "dlq")}

    def env(self) -> dict[str, str]:
        t = self.topics
        return {
            "CHURNSIGNAL_APP_ID": self.app_id,
            "CHURNSIGNAL_TOPICS__USAGE": t["usage"],
            "CHURNSIGNAL_TOPICS__BILLING": t["billing"],
            "CHURNSIGNAL_TOPICS__SUPPORT": t["support"],
            "CHURNSIGNAL_TOPICS__ALERTS": t["alerts"],
            "CHURNSIGNAL_TOPICS__DLQ": t["dlq"],
            "CHURNSIGNAL_RESCORE_INTERVAL_S": "2",
            "CHURNSIGNAL_PARTITIONS": "4",
        }

    def settings(self) -> Settings:
        old = dict(os.environ)
        try:
            os.environ.update(self.env())
            return Settings(kafka_bootstrap_servers=self.broker, state_dir=self.state_dir)
        finally:
            os.environ.clear()
            os.environ.update(old)


def new_env(broker: str, tmp_path: Path) -> Env:
    env = Env(broker, tmp_path / "state", f"t{uuid.uuid4().hex[:10]}")
    env.state_dir.mkdir(parents=True)
    asyncio.run(ensure_topics(env.settings()))
    return env


class Worker:
    """A real `churnsignal worker` process."""

    def __init__(self, env: Env, extra: dict[str, str] | None = None,
                 module: str = "churnsignal", state_dir: Path | None = None) -> None:
        self.env = env
        self.port = free_port()
        self.state_dir = state_dir or env.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = start_worker(env.settings(), env.broker, self.state_dir, self.port,
                                 extra_env={**env.env(), **(extra or {})}, module=module)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if http_json(self.port, "/readyz", timeout=2).get("ready"):
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"worker not ready in {timeout}s: {self.log()[-3000:]}")

    def summary(self) -> dict[str, Any]:
        return http_json(self.port, "/api/summary")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:  # noqa: S310
            return r.read().decode()

    def wait_applied(self, n: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        summary: dict[str, Any] = {}
        while time.monotonic() < deadline:
            summary = self.summary()
            if summary["stats"].get("events_applied", 0) + summary["stats"].get(
                    "duplicates", 0) >= n and summary["events_in_clickhouse"] >= n:
                return summary
            time.sleep(0.5)
        raise AssertionError(f"only {summary} after {timeout}s")

    def stop(self) -> int:
        return stop_process(self.proc)

    def log(self) -> str:
        return (self.state_dir / "worker.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, as a crash or an OOM kill would."""
        self.proc.kill()
        self.proc.wait(30)

    def account(self, account_id: str) -> dict[str, Any]:
        """/api/accounts/ID; an account this worker has no state for yet has 0 events."""
        try:
            return http_json(self.port, f"/api/accounts/{account_id}")
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            if exc.code == 404 and body.get("error") == "unknown account":
                return {"events": 0, "owned_here": False}
            raise

    def dsn(self) -> str:
        return f"chdb://{(self.state_dir / 'clickhouse').resolve()}"


class WebhookReceiver:
    """A real HTTP endpoint on loopback that records POSTed JSON; the first ``fail_first``
    requests get a 503, as a flaky receiver would answer."""

    def __init__(self, fail_first: int = 0) -> None:
        import http.server
        import threading

        receiver = self
        self.bodies: list[dict[str, Any]] = []
        self.fail_first = fail_first

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    self.send_response(503)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


FIGURES: list[str] = []


def figures(text: str) -> None:
    """What a reliability test measured (events, faults, lost, doubled): printed in the
    session's summary, so CI logs show the figures of passing tests too."""
    FIGURES.append(text)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples in /metrics text (those with ``labels``, if given)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


async def produce(broker: str, messages: list[tuple[str, bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        for topic, key, value in messages:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def consume_all(broker: str, topic: str, idle_s: float = 3.0) -> list[Any]:
    """Every record of ``topic`` from the beginning (stops after ``idle_s`` without news)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, auto_offset_reset="earliest",
                                group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []

        async def collect() -> None:
            async for _, records in read_to_end(consumer, ends, idle_ms=int(idle_s * 1000)):
                out.extend(records)

        await asyncio.wait_for(collect(), timeout=60)  # a topic that never goes quiet fails
        return out
    finally:
        await consumer.stop()


def clickhouse_query(dsn: str, sql: str,
                     parameters: dict[str, Any] | None = None) -> list[list[Any]]:
    """Query a ClickHouse DSN from a separate process (the embedded store is per-process)."""
    code = ("import clickhouse_connect, json, sys; c = clickhouse_connect.get_client(dsn=sys.argv[1]);"
            "print(json.dumps(c.query(sys.argv[2], parameters=json.loads(sys.argv[3])).result_rows,"
            " default=str))")
    out = subprocess.run([sys.executable, "-c", code, dsn, sql, json.dumps(parameters or {})],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_clickhouse(sources: list[str], target: str, workdir: Path) -> None:
    """Copy every ``*_data`` table of several embedded stores into one, as if the workers had
    shared a ClickHouse server (the embedded engine is one process's)."""
    from churnsignal.sinks.ddl import TABLES

    code = ("import clickhouse_connect, sys; from churnsignal.sinks.clickhouse import migrate;"
            "c = clickhouse_connect.get_client(dsn=sys.argv[1]); migrate(c);"
            "[c.command(s) for s in sys.argv[2:]]")

    def parquet(i: int, table: str) -> Path:
        return workdir / f"{table}-{i}.parquet"

    for i, dsn in enumerate(sources):
        exports = [f"INSERT INTO FUNCTION file('{parquet(i, t)}', 'Parquet') SELECT * FROM {t}"
                   for t in TABLES]
        subprocess.run([sys.executable, "-c", code, dsn, *exports], check=True, timeout=300,
                       capture_output=True)
    inserts = [f"INSERT INTO {t} SELECT * FROM file('{parquet(i, t)}', 'Parquet')"
               for i in range(len(sources)) for t in TABLES]
    subprocess.run([sys.executable, "-c", code, target, *inserts], check=True, timeout=300,
                   capture_output=True)


def accepted_per_account(messages: list[tuple[str, bytes | None, bytes]]) -> dict[str, int]:
    """Ground truth, computed apart from the worker: accepted events per account."""
    from collections import Counter

    from churnsignal.schemas.decode import DecodeOptions, decode
    from churnsignal.schemas.results import Accepted

    counts: Counter[str] = Counter()
    seen: set[str] = set()
    now = time.time()
    for _, _, value in messages:
        result = decode(value, DecodeOptions(), now)
        if isinstance(result, Accepted) and result.event.event_id not in seen:
            seen.add(result.event.event_id)
            counts[result.event.account_id] += 1
    return dict(counts)
