"""`churnsignal demo`: embedded broker + ClickHouse + a real worker process + synthetic accounts.

The worker runs as a child process, exactly as in production; the demo produces the
synthetic history and live traffic, shows alerts from ``churn.alerts`` as they arrive, and
reads the ClickHouse summary through the worker's web port (the embedded engine is owned by
the worker's process). Everything it started is stopped by PID on exit, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from churnsignal.app.embedded import (
    EMBEDDED_REBALANCE_S,
    PARENT_PID_ENV,
    EmbeddedBroker,
    free_port,
    wait_for_port,
)
from churnsignal.app.kafka_client import ensure_topics
from churnsignal.app.settings import Settings
from churnsignal.tools.synthetic import Generator

ANALYST_SQL = """SELECT band, count() AS accounts, round(sum(mrr_cents) / 100) AS mrr_usd
FROM account_risk GROUP BY band ORDER BY accounts DESC"""


def start_worker(settings: Settings, bootstrap: str, state_dir: Path, port: int,
                 extra_env: dict[str, str] | None = None,
                 module: str = "churnsignal") -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CHURNSIGNAL_STATE_DIR": str(state_dir),
        "CHURNSIGNAL_WEB_PORT": str(port),
        "CHURNSIGNAL_RESCORE_INTERVAL_S": "5",
        "CHURNSIGNAL_KAFKA__REBALANCE_TIMEOUT_S": str(EMBEDDED_REBALANCE_S),
        "CHURNSIGNAL_KAFKA__SESSION_TIMEOUT_S": str(EMBEDDED_REBALANCE_S),
        "CHURNSIGNAL_LOG_FORMAT": "json",
        PARENT_PID_ENV: str(os.getpid()),
        **(extra_env or {}),
    }
    log = open(state_dir / "worker.log", "ab")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", module, "worker"], env=env,
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def _api_token() -> str | None:
    """The worker's /api token where the environment sets one (the worker started here
    inherits it), from CHURNSIGNAL_API_TOKEN or the file CHURNSIGNAL_API_TOKEN_FILE names."""
    token = os.environ.get("CHURNSIGNAL_API_TOKEN")
    path = os.environ.get("CHURNSIGNAL_API_TOKEN_FILE")
    if not token and path:
        token = Path(path).read_text().strip()
    return token or None


def http_json(port: int, path: str, timeout: float = 30.0) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")  # noqa: S310
    token = _api_token()
    if token and path.startswith("/api/"):
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
        return orjson.loads(resp.read())


class Display:
    """Rich live table on a TTY, plain lines otherwise."""

    def __init__(self) -> None:
        self.console = Console()
        self.tty = self.console.is_terminal
        self.alerts: list[dict[str, Any]] = []

    def alert(self, a: dict[str, Any], elapsed: float) -> None:
        self.alerts.append(a)
        top = a["reasons"][0] if a["reasons"] else {"code": "-", "play": "-", "detail": ""}
        if a["kind"] == "deescalated":
            line = (f"[{elapsed:5.1f}s] RECOVERED {a['account_id']} {a['previous_band']} -> "
                    f"{a['band']} score={a['score']:.0f}")
        else:
            line = (f"[{elapsed:5.1f}s] ALERT {a['band']:<8} {a['account_id']} "
                    f"score={a['score']:.0f} reason={top['code']} play={top['play']} "
                    f"({top['detail']})")
        if self.tty:
            color = {"critical": "red", "high": "yellow"}.get(a["band"], "cyan")
            self.console.print(line, style=color, highlight=False)
        else:
            print(line, flush=True)

    def progress(self, text: str) -> None:
        if self.tty:
            self.console.print(f"[dim]{text}[/dim]")
        else:
            print(text, flush=True)


async def _demo(settings: Settings, bootstrap: str, port: int, duration: float, accounts: int,
                rate: float, display: Display) -> dict[str, Any]:
    topics = {"usage": settings.topics.usage, "billing": settings.topics.billing,
              "support": settings.topics.support}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    consumer = AIOKafkaConsumer(settings.topics.alerts, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=None)
    await producer.start()
    await consumer.start()
    started = time.monotonic()
    produced = 0
    try:
        gen = Generator(accounts, now=time.time())
        history = gen.history()
        for m in history:
            await producer.send(topics[m.topic], m.value, key=m.key)
        await producer.flush()
        produced += len(history)
        display.progress(f"produced {len(history)} history events for {accounts} accounts "
                         "(Segment track, Stripe Events, Zendesk tickets)")
        deadline = started + duration
        next_report = time.monotonic() + 10
        while time.monotonic() < deadline:
            tick = time.monotonic()
            for _ in range(max(1, int(rate / 10))):
                m = gen.live(time.time())
                await producer.send(topics[m.topic], m.value, key=m.key)
                produced += 1
            records = await consumer.getmany(timeout_ms=50)
            for batch in records.values():
                for rec in batch:
                    display.alert(orjson.loads(rec.value), time.monotonic() - started)
            if time.monotonic() >= next_report:
                display.progress(f"[{time.monotonic() - started:5.1f}s] produced {produced} "
                                 f"events, {len(display.alerts)} alerts so far")
                next_report += 10
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        await producer.flush()
        # Let the worker drain what was produced before reading the summary.
        summary: dict[str, Any] = {}
        for _ in range(60):
            summary = http_json(port, "/api/summary")
            applied = summary["stats"].get("events_applied", 0)
            records = await consumer.getmany(timeout_ms=200)
            for batch in records.values():
                for rec in batch:
                    display.alert(orjson.loads(rec.value), time.monotonic() - started)
            if applied >= produced * 0.99 and summary["events_in_clickhouse"] >= applied:
                break
            await asyncio.sleep(0.5)
        summary["produced"] = produced
        summary["elapsed"] = time.monotonic() - started
        return summary
    finally:
        await consumer.stop()
        await producer.stop()


def print_summary(summary: dict[str, Any], display: Display) -> None:
    console = display.console
    applied = int(summary["stats"].get("events_applied", 0))
    elapsed = summary["elapsed"]
    table = Table(title="churnsignal demo summary", show_header=False)
    table.add_row("events produced", str(summary["produced"]))
    table.add_row("events processed", f"{applied} ({applied / elapsed:,.0f} events/s overall)")
    table.add_row("alerts", str(len(display.alerts)))
    for reason, n in summary["alerts_by_reason"].items():
        table.add_row(f"  alerts: {reason or '(recovered)'}", str(n))
    for name, n in summary["rows"].items():
        table.add_row(f"ClickHouse rows: {name}", str(n))
    table.add_row("sum(events) in account_daily", str(summary["events_in_clickhouse"]))
    console.print(table)
    console.print("Paste into ClickHouse (accounts and MRR at risk by band):", style="bold")
    console.print(ANALYST_SQL, highlight=False)


def run_demo(settings: Settings, *, duration: float, accounts: int, rate: float,
             state_dir: Path | None) -> int:
    display = Display()
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="churnsignal-demo-")
        state_dir = Path(tmp.name)
    state_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_path=state_dir / "tansu.log")
    worker = None

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    try:
        broker.start()
        settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap})
        asyncio.run(ensure_topics(settings))
        port = free_port()
        display.progress(f"embedded broker at {broker.bootstrap}; starting worker "
                         f"(web http://127.0.0.1:{port}, state {state_dir})")
        worker = start_worker(settings, broker.bootstrap, state_dir, port)
        if not wait_for_port(port, 90):
            display.progress(f"worker did not come up; see {state_dir / 'worker.log'}")
            return 1
        summary = asyncio.run(_demo(settings, broker.bootstrap, port, duration, accounts, rate,
                                    display))
        print_summary(summary, display)
        ok = summary["rows"]["account_daily"] > 0 and display.alerts
        return 0 if ok else 1
    except KeyboardInterrupt:
        display.progress("interrupted; stopping the worker and the broker")
        return 130
    finally:
        if worker is not None:
            stop_process(worker)
        broker.stop()
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()
