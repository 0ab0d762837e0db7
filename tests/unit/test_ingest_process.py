"""The ingest process's metrics reach the worker's (churnsignal.app.ingest_process)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
from prometheus_client import CollectorRegistry

from churnsignal.app.ingest_process import IngestProcess, RecordingMetrics, apply_ops
from churnsignal.app.metrics import Metrics


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_what_the_child_records_is_what_the_worker_shows() -> None:
    child = RecordingMetrics()
    m = child  # the Ingestor's way of using them
    m.events_consumed.labels(topic="usage").inc(3)
    m.events_consumed.labels(topic="usage").inc(2)
    m.events_consumed.labels(topic="billing").inc()
    m.ingest_paused_partitions.set(2)
    m.ingest_paused_partitions.set(1)  # a gauge: the last value counts
    m.consumer_lag.labels(topic="usage", partition="0").set(40)
    m.event_to_score.observe(0.5)
    m.event_to_score.observe(1.5)
    # Through the pipe as JSON, as the child sends it.
    ops = orjson.loads(orjson.dumps(child.take()))
    assert child.take() == []  # taken once

    registry = CollectorRegistry()
    apply_ops(Metrics(registry), ops)
    assert _value(registry, "churnsignal_events_consumed_total", topic="usage") == 5
    assert _value(registry, "churnsignal_events_consumed_total", topic="billing") == 1
    assert _value(registry, "churnsignal_ingest_paused_partitions") == 1
    assert _value(registry, "churnsignal_consumer_lag", topic="usage", partition="0") == 40
    assert _value(registry, "churnsignal_event_to_score_seconds_count") == 2
    assert _value(registry, "churnsignal_event_to_score_seconds_sum") == 2.0


def test_operations_the_worker_does_not_know_are_skipped() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    apply_ops(metrics, [["a_metric_of_a_newer_child", [], "inc", 1.0],
                        ["events_consumed", [["topic", "usage"]], "delete", 1.0],
                        ["events_consumed", [["topic", "usage"]], "inc", 4.0]])
    assert _value(registry, "churnsignal_events_consumed_total", topic="usage") == 4


def test_an_outage_for_a_child_that_died_ends_with_its_successors_first_report() -> None:
    # A dead child is a Kafka-ingest outage for the worker's health check (which stops
    # counting a stall meanwhile); a fresh child never reports one over, so its first
    # report must end it.
    from churnsignal.app.settings import Settings

    outages: list[bool] = []
    ingest = IngestProcess(Settings(), Metrics(CollectorRegistry()))
    ingest.on_outage = outages.append
    ingest._down = True  # as run() leaves it when a child exits
    ingest._report(b'{"ops": [], "backlog": 7, "assigned": true}')
    ingest._report(b'{"ops": [], "backlog": 3, "assigned": true}')
    ingest._report(b'{"outage": true}')  # the new child's own Kafka trouble still counts
    assert outages == [False, True]
    assert ingest.backlog() == 3 and ingest.assigned


def _child(code: str) -> tuple[str, ...]:
    import sys

    return (sys.executable, "-c", code)


async def _run_until(ingest: IngestProcess, done: Callable[[], bool],
                     timeout: float = 20.0) -> None:
    """Runs ``ingest.run()`` (real child processes) until ``done()``, then stops it."""
    task = asyncio.ensure_future(ingest.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await ingest.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    from churnsignal.app import ingest_process

    monkeypatch.setattr(ingest_process, "RESTART_FIRST_S", 0.01)
    monkeypatch.setattr(ingest_process, "RESTART_MAX_S", 1.0)


@pytest.mark.asyncio
@pytest.mark.usefixtures("quick_restarts")
async def test_a_child_that_keeps_exiting_at_start_fails_the_health_check() -> None:
    # A bad install or setting that only the child trips on: restarting it cannot help,
    # and a worker that reads nothing must not look healthy (it would be a silent outage).
    from churnsignal.app.health import Liveness
    from churnsignal.app.ingest_process import CRASH_LOOP_EXITS
    from churnsignal.app.settings import Settings

    liveness = Liveness(now=0.0)
    ingest = IngestProcess(Settings(), Metrics(CollectorRegistry()))
    ingest.on_outage = lambda failing: liveness.outage("kafka-ingest", failing, 0.0)
    ingest.on_broken = lambda reason: liveness.failing("ingest-process", reason)
    ingest.command = _child("import sys; sys.exit(3)")
    await ingest.start()
    await _run_until(ingest, lambda: bool(liveness.broken))
    assert ingest.quick_exits >= CRASH_LOOP_EXITS
    ok, reason = liveness.check(1.0, stall_s=60)
    assert not ok
    assert f"exited {CRASH_LOOP_EXITS} times in a row" in reason
    assert "last exit code 3" in reason


@pytest.mark.asyncio
@pytest.mark.usefixtures("quick_restarts")
async def test_a_child_that_cannot_reach_kafka_at_start_is_an_outage_not_a_crash_loop() -> None:
    from churnsignal.app.ingest_process import CRASH_LOOP_EXITS
    from churnsignal.app.settings import Settings

    outages: list[bool] = []
    broken: list[str | None] = []
    ingest = IngestProcess(Settings(), Metrics(CollectorRegistry()))
    ingest.on_outage = outages.append
    ingest.on_broken = broken.append
    # What _serve writes when ingestor.start() raises a KafkaError, then the exit.
    ingest.command = _child("import sys; print('{\"outage\": true}', flush=True); sys.exit(1)")
    await ingest.start()
    await _run_until(ingest, lambda: ingest.restarts > CRASH_LOOP_EXITS)
    assert ingest.restarts > CRASH_LOOP_EXITS
    assert broken == [] and ingest.quick_exits == 0
    assert outages and all(outages)


@pytest.mark.asyncio
@pytest.mark.usefixtures("quick_restarts")
async def test_a_child_that_runs_again_clears_the_crash_loop() -> None:
    from churnsignal.app.settings import Settings

    broken: list[str | None] = []
    ingest = IngestProcess(Settings(), Metrics(CollectorRegistry()))
    ingest.on_broken = broken.append
    ingest.command = _child("import sys; sys.exit(2)")
    await ingest.start()
    await _run_until(ingest, lambda: bool(broken))
    assert broken and broken[-1] is not None
    # Mended (a new image, a fixed setting): a child that reports for longer than
    # RESTART_MAX_S (1 s here) is running, and the worker is healthy again.
    ingest._stopping = False
    ingest.command = _child(
        "import sys, time\n"
        "for _ in range(40):\n"
        "    print('{\"ops\": [], \"backlog\": 0, \"assigned\": true}', flush=True)\n"
        "    time.sleep(0.05)\n")
    await ingest.start()
    await _run_until(ingest, lambda: broken[-1] is None)
    assert broken[-1] is None and ingest.quick_exits == 0


def test_the_real_child_says_kafka_is_out_when_it_cannot_start(tmp_path: object) -> None:
    # The child itself (not a stand-in): no broker answers at its bootstrap address, so
    # ingestor.start() fails; it must say "outage" before exiting, or the worker would
    # count a Kafka outage at start-up as a crash loop.
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    env = {**os.environ, "CHURNSIGNAL_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "CHURNSIGNAL_STATE_DIR": str(tmp_path),
           "CHURNSIGNAL_INGEST_PARENT_PID": str(os.getpid())}
    done = subprocess.run([sys.executable, "-m", "churnsignal.app.ingest_process"], env=env,
                          stdin=subprocess.PIPE, capture_output=True, timeout=120, check=False)
    assert done.returncode != 0
    reports = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert reports and reports[0] == {"outage": True}, (done.stdout, done.stderr[-2000:])
