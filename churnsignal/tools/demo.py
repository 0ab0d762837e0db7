"""`churnsignal demo`: embedded broker + ClickHouse + a real worker + a real gateway + synthetic
accounts + a local alert receiver.

The worker and the gateway run as child processes, exactly as in production. The demo sends
the synthetic history and live traffic the way users' tools will, through the gateway:
Segment batches to ``/v1/batch`` with the demo's write key, Stripe and Zendesk webhooks
signed with the demo's secrets. It shows alerts from ``churn.alerts`` as they arrive, while
the worker delivers them to a small receiver on loopback that verifies every delivery's
Standard Webhooks signature (``CHURNSIGNAL_NOTIFY__WEBHOOK_URL``/``__SECRET``), and reads the
ClickHouse summary through the worker's web port (the embedded engine is owned by the
worker's process). Everything it started is stopped by PID on exit, also on Ctrl-C (and a
SIGKILLed demo takes its children with it: they follow their parent).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from churnsignal.app.embedded import (
    EMBEDDED_REBALANCE_S,
    PARENT_PID_ENV,
    EmbeddedBroker,
    free_port,
    wait_for_port,
)
from churnsignal.app.kafka_client import ensure_topics
from churnsignal.app.settings import Settings
from churnsignal.tools.synthetic import GatewayCredentials, GatewaySender, Generator

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


def demo_credentials() -> GatewayCredentials:
    """Fresh credentials for the demo's gateway (nothing outside the demo knows them)."""
    return GatewayCredentials(write_key=f"wk_demo_{secrets.token_hex(12)}",
                              stripe_secret=f"whsec_demo_{secrets.token_hex(16)}",
                              zendesk_secret=secrets.token_hex(16))


def start_gateway(bootstrap: str, state_dir: Path, port: int, credentials: GatewayCredentials,
                  extra_env: dict[str, str] | None = None,
                  log_name: str = "gateway.log") -> subprocess.Popen[bytes]:
    """`churnsignal gateway` on 127.0.0.1:``port`` with the demo's write key and secrets."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CHURNSIGNAL_STATE_DIR": str(state_dir),
        "CHURNSIGNAL_GATEWAY__HOST": "127.0.0.1",
        "CHURNSIGNAL_GATEWAY__PORT": str(port),
        "CHURNSIGNAL_GATEWAY__SEGMENT_WRITE_KEYS": json.dumps([credentials.write_key]),
        "CHURNSIGNAL_GATEWAY__STRIPE_WEBHOOK_SECRETS": json.dumps([credentials.stripe_secret]),
        "CHURNSIGNAL_GATEWAY__ZENDESK_SIGNING_SECRETS": json.dumps([credentials.zendesk_secret]),
        "CHURNSIGNAL_LOG_FORMAT": "json",
        PARENT_PID_ENV: str(os.getpid()),
        **(extra_env or {}),
    }
    log = open(state_dir / log_name, "ab")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", "churnsignal", "gateway"], env=env,
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Until ``GET /readyz`` answers 200 (the gateway: Kafka answers, topics exist)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",  # noqa: S310
                                        timeout=2) as resp:
                if resp.status == 200:
                    return True
        time.sleep(0.2)
    return False


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A Prometheus metric's samples by their labels (sorted), from /metrics text."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that verifies each delivery with the `standardwebhooks`
    library (what the demo shows a receiving service doing): 204 when the signature is ours,
    401 otherwise. Runs on a thread of the demo's process."""

    secret: str
    port: int = 0
    deliveries: int = 0
    verified: int = 0
    refused: int = 0
    ids: set[str] = field(default_factory=set)
    types: Counter[str] = field(default_factory=Counter)
    server: http.server.ThreadingHTTPServer | None = None

    @staticmethod
    def new_secret() -> str:
        return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()

    def start(self) -> Receiver:
        receiver = self
        lock = threading.Lock()
        webhook = Webhook(self.secret)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = webhook.verify(body, headers)
                    status = 204
                except WebhookVerificationError:
                    event, status = None, 401
                with lock:
                    receiver.deliveries += 1
                    if event is None:
                        receiver.refused += 1
                    else:
                        receiver.verified += 1
                        receiver.ids.add(headers["webhook-id"])
                        receiver.types[str(event.get("type"))] += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, name="demo-receiver",
                         daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/churn-alerts"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


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


async def _demo(settings: Settings, bootstrap: str, port: int, gateway_port: int,
                credentials: GatewayCredentials, receiver: Receiver, duration: float,
                accounts: int, rate: float, display: Display) -> dict[str, Any]:
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    consumer = AIOKafkaConsumer(settings.topics.alerts, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=None)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    sender = GatewaySender(gateway_url, credentials, session)
    await consumer.start()
    started = time.monotonic()

    async def show_alerts(timeout_ms: int) -> None:
        records = await consumer.getmany(timeout_ms=timeout_ms)
        for batch in records.values():
            for rec in batch:
                display.alert(orjson.loads(rec.value), time.monotonic() - started)

    try:
        gen = Generator(accounts, now=time.time())
        history = gen.history()
        await sender.send(history)
        s = sender.stats
        display.progress(f"sent {len(history)} history events for {accounts} accounts through "
                         f"the gateway: {s.segment_messages} Segment track calls in "
                         f"{s.segment_batches} /v1/batch requests, {s.stripe_webhooks} signed "
                         f"Stripe and {s.zendesk_webhooks} signed Zendesk webhooks")
        deadline = started + duration
        next_report = time.monotonic() + 10
        while time.monotonic() < deadline:
            tick = time.monotonic()
            # One Segment batch per tick, as an SDK flushing its queue every 100 ms.
            await sender.batch([gen.live(time.time()).value
                                for _ in range(max(1, int(rate / 10)))])
            await show_alerts(50)
            if time.monotonic() >= next_report:
                display.progress(f"[{time.monotonic() - started:5.1f}s] sent {s.events} events "
                                 f"through the gateway, {len(display.alerts)} alerts so far, "
                                 f"{len(receiver.ids)} delivered to the receiver")
                next_report += 10
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        produced = s.events
        # Let the worker drain what the gateway wrote before reading the summary.
        summary: dict[str, Any] = {}
        for _ in range(60):
            summary = http_json(port, "/api/summary")
            applied = summary["stats"].get("events_applied", 0)
            await show_alerts(200)
            if applied >= produced * 0.99 and summary["events_in_clickhouse"] >= applied:
                break
            await asyncio.sleep(0.5)
        # ... and the worker deliver the alerts to the receiver (retried until it has them).
        wait_until = time.monotonic() + 30
        while time.monotonic() < wait_until:
            await show_alerts(200)
            if len(receiver.ids) >= len({a["alert_id"] for a in display.alerts}):
                break
        summary["produced"] = produced
        summary["sent"] = s
        summary["elapsed"] = time.monotonic() - started
        summary["gateway"] = gateway_figures(gateway_port)
        summary["gateway_url"] = gateway_url
        return summary
    finally:
        await session.close()
        await consumer.stop()


def gateway_figures(port: int) -> dict[str, Any]:
    """What the gateway itself counted (its /metrics): records written per topic, requests."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    records = {dict(labels)["topic"]: int(v) for labels, v in
               metric_samples(text, "churnsignal_gateway_records_total").items()}
    requests = metric_samples(text, "churnsignal_gateway_requests_total")
    ok = sum(v for labels, v in requests.items() if dict(labels)["status"] == "200")
    return {"records": records, "requests": int(sum(requests.values())),
            "requests_ok": int(ok)}


def print_summary(summary: dict[str, Any], display: Display) -> None:
    console = display.console
    applied = int(summary["stats"].get("events_applied", 0))
    elapsed = summary["elapsed"]
    sent = summary["sent"]
    gateway = summary["gateway"]
    receiver: Receiver = summary["receiver"]
    table = Table(title="churnsignal demo summary", show_header=False)
    table.add_row("gateway", summary["gateway_url"])
    table.add_row("events sent through the gateway", str(summary["produced"]))
    table.add_row("  Segment /v1/batch requests", f"{sent.segment_batches} "
                  f"({sent.segment_messages} track calls)")
    table.add_row("  signed Stripe webhooks", str(sent.stripe_webhooks))
    table.add_row("  signed Zendesk webhooks", str(sent.zendesk_webhooks))
    table.add_row("gateway: requests answered 200", f"{gateway['requests_ok']} of "
                  f"{gateway['requests']}")
    table.add_row("gateway: records written", str(sum(gateway["records"].values())))
    for topic, n in sorted(gateway["records"].items()):
        table.add_row(f"  gateway -> {topic}", str(n))
    table.add_row("events processed", f"{applied} ({applied / elapsed:,.0f} events/s overall)")
    table.add_row("alerts", str(len(display.alerts)))
    for reason, n in summary["alerts_by_reason"].items():
        table.add_row(f"  alerts: {reason or '(recovered)'}", str(n))
    table.add_row("receiver: alerts delivered", f"{len(receiver.ids)} ({receiver.url})")
    table.add_row("receiver: signatures verified", f"{receiver.verified} of "
                  f"{receiver.deliveries} deliveries (Standard Webhooks)")
    table.add_row("receiver: signatures refused", str(receiver.refused))
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
    worker = gateway = None
    receiver = Receiver(Receiver.new_secret())
    credentials = demo_credentials()

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    try:
        broker.start()
        settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap})
        asyncio.run(ensure_topics(settings))
        receiver.start()
        port, gateway_port = free_port(), free_port()
        display.progress(f"embedded broker at {broker.bootstrap}; starting worker "
                         f"(web http://127.0.0.1:{port}, state {state_dir}), gateway "
                         f"http://127.0.0.1:{gateway_port} and an alert receiver at "
                         f"{receiver.url}")
        worker = start_worker(settings, broker.bootstrap, state_dir, port, extra_env={
            "CHURNSIGNAL_NOTIFY__WEBHOOK_URL": receiver.url,
            "CHURNSIGNAL_NOTIFY__WEBHOOK_SECRET": receiver.secret,
            "CHURNSIGNAL_NOTIFY__RETRY_MAX_S": "2"})
        gateway = start_gateway(broker.bootstrap, state_dir, gateway_port, credentials)
        if not wait_ready(gateway_port, gateway, 60):
            display.progress(f"gateway did not come up; see {state_dir / 'gateway.log'}")
            return 1
        if not wait_for_port(port, 90):
            display.progress(f"worker did not come up; see {state_dir / 'worker.log'}")
            return 1
        display.progress(f"gateway http://127.0.0.1:{gateway_port} (Segment write key "
                         f"{credentials.write_key}; /v1/batch, /webhooks/stripe, "
                         "/webhooks/zendesk)")
        summary = asyncio.run(_demo(settings, broker.bootstrap, port, gateway_port, credentials,
                                    receiver, duration, accounts, rate, display))
        summary["receiver"] = receiver
        print_summary(summary, display)
        ok = (summary["rows"]["account_daily"] > 0 and display.alerts and receiver.ids
              and not receiver.refused)
        return 0 if ok else 1
    except KeyboardInterrupt:
        display.progress("interrupted; stopping the gateway, the worker and the broker")
        return 130
    finally:
        for proc in (gateway, worker):
            if proc is not None:
                stop_process(proc)
        receiver.stop()
        broker.stop()
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()
