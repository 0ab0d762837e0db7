"""The command line as a user meets it: the demo, and clear errors instead of tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow]


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[
        int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "churnsignal", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**{k: v for k, v in os.environ.items()
                                  if k != "KAFKA_BOOTSTRAP_SERVERS"}, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def _running(needle: str) -> list[str]:
    """Processes whose command line or environment mentions ``needle``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle.encode() in blob:
            found.append(blob.split(b"\0")[0].decode(errors="replace"))
    return found


def _commands(needle: str) -> list[str]:
    """Full command lines of the processes ``_running`` finds."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            blob = cmdline + (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle.encode() in blob:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _summary_rows(out: str) -> dict[str, str]:
    return {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in out.splitlines() if line.count("│") == 3}


async def _first_records(bootstrap: str, topic: str, n: int) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(records)
    finally:
        await consumer.stop()
    return got[:n]


def test_demo_shows_alerts_and_clickhouse_rows_and_leaves_nothing_running(tmp_path) -> None:
    """`churnsignal demo` sends everything through a real gateway process (what is on the
    source topics carries the gateway's headers; its own /metrics count it), the worker
    delivers alerts to the demo's receiver, which verifies their Standard Webhooks signatures."""
    import asyncio
    import urllib.request

    state_dir = tmp_path / "demo"
    output = tmp_path / "demo.out"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "churnsignal", "demo", "--duration", "12", "--accounts",
             "120", "--state-dir", str(state_dir)], stdout=sink, stderr=sink,
            env={k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"})
    try:
        deadline = time.monotonic() + 180
        while "history events" not in output.read_text():  # the history went through
            assert proc.poll() is None and time.monotonic() < deadline, \
                output.read_text()[-3000:]
            time.sleep(0.3)
        text = output.read_text()
        broker = re.search(r"embedded broker at (127\.0\.0\.1:\d+)", text)
        gateway = re.search(r"gateway (http://127\.0\.0\.1:\d+) \(Segment write key", text)
        assert broker is not None and gateway is not None, text[-3000:]
        # While the demo runs: the gateway counted what it wrote, and wrote it with its headers.
        with urllib.request.urlopen(gateway.group(1) + "/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        written = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'churnsignal_gateway_records_total\{topic="([^"]+)"\} (\S+)', metrics)}
        assert written["usage.events"] > 1000 and written["billing.events"] > 0, written
        for topic, source in (("usage.events", b"segment"), ("billing.events", b"stripe"),
                              ("support.events", b"zendesk")):
            records = asyncio.run(_first_records(broker.group(1), topic, 20))
            assert records, topic
            for record in records:
                headers = dict(record.headers or ())
                assert headers["source"] == source and headers["request-id"], (topic, headers)
        assert proc.wait(240) == 0, output.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out = output.read_text()
    assert "ALERT" in out
    assert "churnsignal demo summary" in out
    rows = _summary_rows(out)
    assert int(rows["ClickHouse rows: account_daily"]) > 0
    assert int(rows["ClickHouse rows: alerts"]) > 0
    assert rows["sum(events) in account_daily"].split()[0] == rows["events processed"].split()[0]
    sent = int(rows["events sent through the gateway"])
    assert int(rows["gateway: records written"]) == sent
    assert int(rows["events processed"].split()[0]) == sent
    assert int(rows["signed Stripe webhooks"]) > 0 and int(rows["signed Zendesk webhooks"]) > 0
    # Alert delivery: every alert reached the receiver, every signature verified.
    delivered = int(rows["receiver: alerts delivered"].split()[0])
    assert delivered == int(rows["alerts"]) > 0, rows
    verified, _, deliveries = rows["receiver: signatures verified"].split()[:3]
    assert int(verified) == int(deliveries) >= delivered
    assert rows["receiver: signatures refused"] == "0"
    assert "FROM account_risk" in out
    assert _running(f"tcp://{broker.group(1)}") == []  # the demo's Tansu
    assert _running(str(state_dir)) == []  # its worker and its gateway


def test_bad_setting_is_one_line_naming_it() -> None:
    code, out, _ = run(["worker"], env={"CHURNSIGNAL_WEB_PORT": "not-a-port"})
    assert code == 2
    assert "CHURNSIGNAL_WEB_PORT" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_unreachable_broker_fails_fast_with_a_clear_error() -> None:
    code, out, took = run(["worker"], env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                                           "CHURNSIGNAL_KAFKA__CONNECT_TIMEOUT_S": "5"})
    assert code == 2
    assert "did not answer" in out and "Traceback" not in out
    assert took < 60



def test_bench_runs_end_to_end_on_a_small_data_set(tmp_path: Path) -> None:
    # The full benchmark is a command, not a test (docs/benchmark.md); this checks that the
    # command works from a fresh state and writes every figure it promises.
    import json

    out_dir = tmp_path / "bench"
    code, out, _ = run(["bench", "--events", "3000", "--accounts", "300", "--runs", "1",
                        "--peers", "ceiling", "--dense-accounts", "10", "--dense-days", "3",
                        "--dense-per-day", "10", "--latency-seconds", "4",
                        "--out", str(out_dir)], timeout=600)
    assert code == 0, out[-3000:]
    results = json.loads((out_dir / "results.json").read_text())
    for key in ("ceiling_eps", "churnsignal_eps", "latency_p50_s", "latency_p99_s",
                "state_bytes_per_account", "state_load_s"):
        assert results[key] is not None and results[key] > 0, (key, results)
    assert results["state_keys_loaded"] >= results["accounts_tracked"] > 0
    # --latency-seconds: an alert every 0.2 s for 4 s (the bench's own phases are 30 s)
    assert results["latency_phase_s"] == 4.0 and 19 <= results["latency_samples"] <= 21, results
    assert "written:" in out and "reading all state back" in out
    # Two workers of one group split the data set: every event applied, by both.
    scale = results["scale_out"]
    assert scale["workers"] == 2 and scale["eps"] > 0 and scale["vs_one_worker"] > 0, scale
    assert sum(scale["applied_per_worker"]) >= 3000, scale
    assert all(n > 0 for n in scale["applied_per_worker"]), scale
    assert len(scale["cpu_s_per_worker"]) == 2 and all(
        c >= 0 for c in scale["cpu_s_per_worker"]), scale
    assert "churnsignal, 2 workers" in out
    # The dense set: only the peers that run on it (of those asked for) and churnsignal.
    dense = results["dense"]
    assert (dense["events"], dense["accounts"]) == (300, 10), dense
    assert dense["ceiling_eps"] > 0 and dense["churnsignal_eps"] > 0, dense
    assert dense["quix_count_eps"] is None and set(dense["runs"]) == {"ceiling", "churnsignal"}
    assert dense["accounts_tracked"] == 10, dense
    assert "dense data set" in out


def test_a_killed_demo_takes_its_worker_and_broker_with_it(tmp_path: Path) -> None:
    state_dir = tmp_path / "demo"
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "churnsignal", "demo", "--duration", "60",
             "--accounts", "50", "--state-dir", str(state_dir)], stdout=out, stderr=out,
            env={k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"})
    try:
        deadline = time.monotonic() + 120
        while not (list(state_dir.rglob("worker.log")) and list(state_dir.rglob("gateway.log"))):
            assert time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)
        broker = re.search(r"embedded broker at (127\.0\.0\.1:\d+)", output.read_text())
        assert broker is not None, output.read_text()[-3000:]
        assert _running(str(state_dir)) and _running(f"tcp://{broker.group(1)}")
        children = " | ".join(_commands(str(state_dir)))
        assert "churnsignal worker" in children and "churnsignal gateway" in children, children
    finally:
        proc.kill()  # SIGKILL: none of the demo's own cleanup runs
        proc.wait(30)
    deadline = time.monotonic() + 15
    while _running(str(state_dir)) or _running(f"tcp://{broker.group(1)}"):
        assert time.monotonic() < deadline, (_running(str(state_dir)),
                                             _running(f"tcp://{broker.group(1)}"))
        time.sleep(0.5)


def test_bench_gateway_measures_the_gateway_beside_the_bare_forwarder(tmp_path: Path) -> None:
    # The real command with 1-second phases: both servers answered every request of every
    # phase, and every figure docs/benchmark.md records is there (the figures themselves are
    # the benchmark's, not a test's).
    import json

    out_dir = tmp_path / "bench"
    code, out, _ = run(["bench", "--gateway", "--out", str(out_dir)],
                       env={"_CHURNSIGNAL_BENCH_PHASE_S": "1"}, timeout=300)
    assert code == 0, out[-3000:]
    results = json.loads((out_dir / "gateway.json").read_text())
    for server in ("forwarder", "gateway"):
        r = results[server]
        for phase in ("batch_max", "track_max", "batch_half", "track_half"):
            assert r[phase]["requests_ok"] > 0 and r[phase]["errors"] == {}, (server, phase, r)
            assert 0 < r[phase]["p50_s"] <= r[phase]["p99_s"], (server, phase, r)
        assert r["batch_max"]["events_ok"] == 100 * r["batch_max"]["requests_ok"]
        assert r["batch_max"]["server_cpu_s"] > 0 and r["batch_max"]["events_per_server_cpu_s"] > 0
        assert 0 < r["rss_start_mb"] <= r["rss_peak_mb"] and r["rss_end_mb"] > 0
    assert results["gateway_vs_forwarder_batch"] > 0
    assert "target events per CPU-second of the gateway" in out and "written:" in out
