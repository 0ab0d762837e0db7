"""The command line as a user meets it: the demo, and clear errors instead of tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

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


def test_demo_shows_alerts_and_clickhouse_rows_and_leaves_nothing_running(tmp_path) -> None:
    state_dir = tmp_path / "demo"
    code, out, _ = run(["demo", "--duration", "12", "--accounts", "120", "--state-dir",
                        str(state_dir)])
    assert code == 0, out[-3000:]
    assert "ALERT" in out
    assert "churnsignal demo summary" in out
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in out.splitlines() if line.count("│") == 3}
    assert int(rows["ClickHouse rows: account_daily"]) > 0
    assert int(rows["ClickHouse rows: alerts"]) > 0
    assert rows["sum(events) in account_daily"].split()[0] == rows["events processed"].split()[0]
    assert "FROM account_risk" in out
    broker = re.search(r"embedded broker at (127\.0\.0\.1:\d+)", out)
    assert broker is not None
    assert _running(f"tcp://{broker.group(1)}") == []  # the demo's Tansu
    assert _running(str(state_dir)) == []  # its worker


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
                        "--peers", "ceiling", "--out", str(out_dir)], timeout=600)
    assert code == 0, out[-3000:]
    results = json.loads((out_dir / "results.json").read_text())
    for key in ("ceiling_eps", "churnsignal_eps", "latency_p50_s", "latency_p99_s",
                "state_bytes_per_account", "state_load_s"):
        assert results[key] is not None and results[key] > 0, (key, results)
    assert results["state_keys_loaded"] >= results["accounts_tracked"] > 0
    assert "written:" in out and "reading all state back" in out


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
        while not list(state_dir.rglob("worker.log")):
            assert time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)
        broker = re.search(r"embedded broker at (127\.0\.0\.1:\d+)", output.read_text())
        assert broker is not None, output.read_text()[-3000:]
        assert _running(str(state_dir)) and _running(f"tcp://{broker.group(1)}")
    finally:
        proc.kill()  # SIGKILL: none of the demo's own cleanup runs
        proc.wait(30)
    deadline = time.monotonic() + 15
    while _running(str(state_dir)) or _running(f"tcp://{broker.group(1)}"):
        assert time.monotonic() < deadline, (_running(str(state_dir)),
                                             _running(f"tcp://{broker.group(1)}"))
        time.sleep(0.5)
