"""The worker's ingest in a child process (``ingest.separate_process``).

A worker is bound by one core (its Python). The ingest (decode, validate, dead-letter,
repartition into packs) and the state agent only meet through Kafka (the ingested topic), so
the ingest can run in a process of its own, with the same settings and consumer group, and a
worker then uses a second core (docs/benchmark.md, session 13: 1.2x the catch-up rate, and the
state process's main thread at ~53 us a live event instead of ~91).

The child (``python -m churnsignal.app.ingest_process``) runs the same ``Ingestor``. What the
worker needs from it comes as JSON lines on its stdout: the metric operations it made (applied
to the worker's own metrics, so ``/metrics`` shows them), its backlog (the agent's catch-up
batching), whether it holds partitions (``/readyz``) and Kafka outages (``/healthz``). The
worker writes commands to its stdin (``forget_links`` after a forget). A child that dies is
started again (with back-off); one whose worker died stops by itself. A child that exits
``CRASH_LOOP_EXITS`` times in a row soon after starting, and not because Kafka is out, makes
the worker's ``/healthz`` fail until one runs again: restarting cannot mend a bad setting or
install, but a worker that looks healthy while it reads nothing is an outage nobody sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

from churnsignal.app import gc_tuning
from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings

log = logging.getLogger(__name__)

REPORT_S = 0.2  # how often the child reports its metrics and backlog
STOP_WAIT_S = 30.0  # a stopping child is killed after this
RESTART_FIRST_S = 1.0  # back-off before the first restart, doubled up to RESTART_MAX_S
RESTART_MAX_S = 30.0
CRASH_LOOP_EXITS = 5  # quick exits in a row (each within RESTART_MAX_S of starting): broken
CHILD_MODULE = "churnsignal.app.ingest_process"
FORGET_LINKS = b"forget_links\n"

# (metric attribute, labels, method, value)
Op = tuple[str, tuple[tuple[str, str], ...], str, float]


class _Recorded:
    """A metric (or one of its label sets) whose operations are recorded, not applied."""

    def __init__(self, into: RecordingMetrics, name: str,
                 labels: tuple[tuple[str, str], ...] = ()) -> None:
        self._into, self._name, self._labels = into, name, labels

    def labels(self, **labels: str) -> _Recorded:
        return _Recorded(self._into, self._name, tuple(sorted(labels.items())))

    def inc(self, amount: float = 1.0) -> None:
        key = (self._name, self._labels, "inc")
        self._into.summed[key] = self._into.summed.get(key, 0.0) + amount

    def set(self, value: float) -> None:
        self._into.summed[(self._name, self._labels, "set")] = value

    def observe(self, value: float) -> None:
        self._into.observed.append((self._name, self._labels, "observe", value))


class RecordingMetrics:
    """Stands in for ``Metrics`` in the child: increments summed, a gauge's last value kept
    and observations listed, until ``take`` hands them to the worker."""

    def __init__(self) -> None:
        self.summed: dict[tuple[str, tuple[tuple[str, str], ...], str], float] = {}
        self.observed: list[Op] = []

    def __getattr__(self, name: str) -> _Recorded:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Recorded(self, name)

    def take(self) -> list[Op]:
        ops = [(name, labels, method, value)
               for (name, labels, method), value in self.summed.items()]
        ops += self.observed
        self.summed, self.observed = {}, []
        return ops


def apply_ops(metrics: Metrics, ops: list[Any]) -> None:
    """The child's metric operations, on the worker's metrics (an unknown one is skipped:
    a child of another version may have more)."""
    for name, labels, method, value in ops:
        metric = getattr(metrics, str(name), None)
        if metric is None or method not in ("inc", "set", "observe"):
            continue
        if labels:
            metric = metric.labels(**{str(k): str(v) for k, v in labels})
        getattr(metric, method)(value)


class IngestProcess:
    """The worker's side of a child ingest process: what ``IngestService`` runs, and what
    the agent, the web views and the outputs ask of an ``Ingestor``."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.assigned = False
        self.on_outage: Callable[[bool], None] = lambda failing: None
        # Told why the ingest cannot run (a crash loop), and None once a child runs again.
        self.on_broken: Callable[[str | None], None] = lambda reason: None
        self.command: tuple[str, ...] = (sys.executable, "-m", CHILD_MODULE)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.quick_exits = 0  # in a row, not on a Kafka outage
        self._child_outage = False  # the running child's last word on Kafka
        self._backlog = 0
        self._stopping = False
        self._down = False  # exited; its successor's first report ends the outage
        self._started = 0.0

    async def start(self) -> None:
        # Its log lines go where the worker's go (stderr is inherited).
        self._child_outage = False
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, _PARENT_ENV: str(os.getpid())}, limit=16 * 1024 * 1024)
        self._started = time.monotonic()
        log.info("ingest runs in process %d", self.proc.pid)

    async def run(self) -> None:
        delay = RESTART_FIRST_S
        while True:
            proc = self.proc
            assert proc is not None and proc.stdout is not None
            while line := await proc.stdout.readline():
                self._report(line)
            code = await proc.wait()
            if self._stopping:
                return
            if time.monotonic() - self._started > RESTART_MAX_S:
                delay = RESTART_FIRST_S  # it had been running: not a crash loop
                self._ran()
            elif not self._child_outage:  # a Kafka outage at its start is waited out
                self.quick_exits += 1
            self.assigned = False
            self._down = True
            self.on_outage(True)
            log.error("the ingest process exited (code %s); starting it again in %.0fs",
                      code, delay)
            if self.quick_exits >= CRASH_LOOP_EXITS:
                self.on_broken(
                    f"the ingest process exited {self.quick_exits} times in a row within "
                    f"{RESTART_MAX_S:.0f}s of starting (last exit code {code}); its log "
                    "lines say why")
            await asyncio.sleep(delay)
            if self._stopping:
                return
            delay = min(delay * 2, RESTART_MAX_S)
            self.restarts += 1
            await self.start()

    def _ran(self) -> None:
        if self.quick_exits:
            self.quick_exits = 0
            self.on_broken(None)

    def _report(self, line: bytes) -> None:
        try:
            report = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("ingest process wrote a line that is not a report: %r", line[:200])
            return
        if self.quick_exits and time.monotonic() - self._started > RESTART_MAX_S:
            self._ran()  # this child has been running long enough: not a crash loop
        if "outage" in report:
            self._child_outage = bool(report["outage"])
            self.on_outage(self._child_outage)
        if "ops" in report:
            if self._down:  # a new child reports: the ingest runs again
                self._down = False
                self.on_outage(False)
            apply_ops(self.metrics, report["ops"])
            self._backlog = int(report.get("backlog", 0))
            self.assigned = bool(report.get("assigned", False))

    def backlog(self) -> int:
        return self._backlog

    def forget_links(self) -> None:
        if self.proc is not None and self.proc.stdin is not None and self.proc.returncode is None:
            self.proc.stdin.write(FORGET_LINKS)

    async def stop(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def close(self) -> None:
        """Wait for the child to stop (it sends what it packed and commits first)."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), STOP_WAIT_S)
        except TimeoutError:
            log.error("the ingest process did not stop within %.0fs; killing it", STOP_WAIT_S)
            proc.kill()
            await proc.wait()


_PARENT_ENV = "CHURNSIGNAL_INGEST_PARENT_PID"


async def _serve(settings: Settings, out: IO[bytes]) -> None:
    from aiokafka.errors import KafkaError

    from churnsignal.stream.ingest import Ingestor, options_for
    from churnsignal.stream.policy import load_policy

    metrics = RecordingMetrics()
    ingestor = Ingestor(settings, metrics, options_for(  # type: ignore[arg-type]
        settings, load_policy(settings.policy_file)))

    def send(report: dict[str, Any]) -> None:
        out.write(orjson.dumps(report) + b"\n")
        out.flush()

    ingestor.on_outage = lambda failing: send({"outage": failing})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C in a terminal reaches the worker's whole process group: the worker stops this
    # process itself (SIGTERM) when its drain needs it, not before.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = int(os.environ.get(_PARENT_ENV, "0")) or os.getppid()

    async def report() -> None:
        while True:
            send({"ops": metrics.take(), "backlog": ingestor.backlog(),
                  "assigned": ingestor.assigned})
            if os.getppid() != parent:  # the worker died: nobody acks what this packs
                log.error("the worker (process %d) is gone; the ingest stops", parent)
                stop.set()
            await asyncio.sleep(REPORT_S)

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line == FORGET_LINKS:
                ingestor.forget_links()
        stop.set()  # the worker closed our stdin: it is gone

    try:
        await ingestor.start()
    except KafkaError:
        send({"outage": True})  # Kafka out at start: the worker waits it out, not a crash loop
        raise
    # As the worker does: what start-up built is never collected again, and the young
    # generation is collected rarely (at the defaults, collecting took ~23 % of this
    # process's CPU, most of it full collections over the modules, clients and caches).
    gc_tuning.for_long_lived_state()
    running = asyncio.ensure_future(ingestor.run())
    running.add_done_callback(lambda _: stop.set())  # an error in it ends the process
    helpers = [asyncio.ensure_future(report()), asyncio.ensure_future(commands())]
    try:
        await stop.wait()
        await ingestor.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(running), STOP_WAIT_S)
    finally:
        for task in helpers:
            task.cancel()
        await ingestor.close()
        send({"ops": metrics.take(), "backlog": 0, "assigned": False})
    if running.done() and not running.cancelled() and running.exception() is not None:
        raise running.exception()  # type: ignore[misc]  # exits non-zero: started again


def main() -> None:
    from churnsignal.app.logs import configure_logging
    from churnsignal.app.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # reports only on the pipe; anything printed goes to the log
    asyncio.run(_serve(settings, out))


if __name__ == "__main__":
    main()
