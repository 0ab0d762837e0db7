"""SASL against Apache Kafka: the right password works, a wrong one fails fast and clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import Worker, figures, new_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sasl_bootstrap() -> str:
    kafka_dir = os.environ.get("CHURNSIGNAL_TEST_KAFKA_DIR")
    path = Path(kafka_dir) / "bootstrap_sasl" if kafka_dir else None
    if path is None or not path.is_file() or not path.read_text().strip():
        pytest.skip("needs the Apache Kafka of `make test-kafka` (it has a SASL/PLAIN listener)")
    return path.read_text().strip()


def _sasl_env(password: str) -> dict[str, str]:
    return {"CHURNSIGNAL_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "CHURNSIGNAL_KAFKA__SASL_MECHANISM": "PLAIN",
            "CHURNSIGNAL_KAFKA__SASL_USERNAME": "churnsignal",
            "CHURNSIGNAL_KAFKA__SASL_PASSWORD": password}


def test_wrong_password_is_one_clear_error_within_the_timeout(tmp_path: Path) -> None:
    bootstrap = _sasl_bootstrap()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "CHURNSIGNAL_STATE_DIR": str(tmp_path), "CHURNSIGNAL_KAFKA__CONNECT_TIMEOUT_S": "20",
           **_sasl_env("not-the-password")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "churnsignal", "worker"], env=env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    out = done.stdout + done.stderr
    figures(f"wrong password: exit {done.returncode} after {took:.1f}s: {out.strip()[-300:]}")
    assert done.returncode != 0
    assert took < 60
    assert "Traceback" not in out
    assert "not-the-password" not in out  # the secret is never printed
    errors = [line for line in out.splitlines() if line.startswith("churnsignal:")]
    assert len(errors) == 1 and bootstrap in errors[0]


def test_right_password_runs_the_worker(broker: str, tmp_path: Path) -> None:
    bootstrap = _sasl_bootstrap()
    env = new_env(broker, tmp_path)  # topics made on the plain listener of the same broker
    env.broker = bootstrap
    worker = Worker(env, extra=_sasl_env("test-secret"))
    try:
        worker.wait_ready()
        assert "test-secret" not in worker.log()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
