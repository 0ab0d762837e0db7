"""Real alerts from a real `churnsignal worker` (delivery inside the worker) into a real
Alertmanager (Debian's prometheus-alertmanager 0.25, on loopback): they appear with their
labels, stay firing while re-sent (across a SIGKILL of the worker: the firing set is rebuilt
from churn.alerts), and resolve when the account de-escalates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from churnsignal.app.embedded import free_port, wait_for_port
from tests.integration.helpers import Worker, consume_all, new_env, produce
from tests.scenarios import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
CONFIG = """route:
  receiver: "null"
  group_wait: 1s
receivers:
  - name: "null"
"""


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    if BINARY is None:
        pytest.skip("prometheus-alertmanager is not installed (.ci/run installs it)")
    with running_alertmanager(tmp_path) as base:
        yield base


@contextlib.contextmanager
def running_alertmanager(tmp_path: Path) -> Iterator[str]:
    """Alertmanager on a free loopback port, stopped by its PID on exit."""
    assert BINARY is not None
    port = free_port()
    (tmp_path / "am.yml").write_text(CONFIG)
    log = open(tmp_path / "alertmanager.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [BINARY, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for_port(port, 20), (tmp_path / "alertmanager.log").read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()  # by PID
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def firing(base: str, account: str) -> list[dict[str, Any]]:
    """The account's active alerts in Alertmanager (resolved ones are not listed)."""
    with urllib.request.urlopen(f"{base}/api/v2/alerts?active=true", timeout=5) as r:  # noqa: S310
        alerts = json.loads(r.read())
    return [a for a in alerts if a["labels"].get("account_id") == account
            and a["status"]["state"] == "active"]


def wait(what: str, check: Any, timeout: float, worker: Worker) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout}s: {worker.log()[-3000:]}")


def test_alerts_fire_stay_firing_across_a_sigkill_and_resolve(
        broker: str, tmp_path: Path, alertmanager: str) -> None:
    env = new_env(broker, tmp_path)
    resend_s = 2.0  # endsAt is 4 intervals ahead: 8 s without a re-send resolves it
    extra = {"CHURNSIGNAL_NOTIFY__ALERTMANAGER_URL": alertmanager,
             "CHURNSIGNAL_NOTIFY__ALERTMANAGER_RESEND_S": str(resend_s),
             "CHURNSIGNAL_TOPICS__UNDELIVERABLE": f"{env.app_id}.undeliverable"}
    s = Scenario(time.time())
    s.subscription("pay-1", 40)
    s.steady("pay-1", days=40, per_day=4)
    s.payment_failed("pay-1", 0.003, attempt=1, final=False)
    s.payment_failed("pay-1", 0.002, attempt=4, final=True)
    topics = env.topics
    worker = Worker(env, extra)
    try:
        worker.wait_ready()
        asyncio.run(produce(broker, [(topics[k], key, v) for k, key, v in s.messages]))
        [alert] = wait("the alert in Alertmanager", lambda: firing(alertmanager, "pay-1"), 90,
                       worker)
        labels = alert["labels"]
        assert labels["alertname"] == "ChurnRisk" and labels["account_id"] == "pay-1"
        assert labels["band"] in ("high", "critical")
        assert labels["reason"] == "payment_failed_final"
        assert labels["severity"] == {"critical": "critical", "high": "warning"}[labels["band"]]
        notes = alert["annotations"]
        assert "pay-1" in notes["summary"] and notes["plays"] and notes["mrr_at_risk"].startswith("$")
        first_end = alert["endsAt"]
        time.sleep(4 * resend_s + 2)  # past the first endsAt: only a re-send keeps it firing
        [still] = firing(alertmanager, "pay-1")
        assert still["endsAt"] > first_end and still["labels"] == labels

        worker.kill()  # SIGKILL: the set of firing accounts is rebuilt from churn.alerts
        worker = Worker(env, extra)
        worker.wait_ready()
        restarted = time.monotonic()
        time.sleep(4 * resend_s + 2)
        wait("still firing after the restart", lambda: firing(alertmanager, "pay-1"), 10, worker)
        [after] = firing(alertmanager, "pay-1")
        assert after["labels"] == labels and time.monotonic() - restarted >= 4 * resend_s
        assert "state rebuilt from 1 delivered alerts" in worker.log()

        s.messages.clear()
        s.invoice_paid("pay-1", 0.0001)  # paid: de-escalates below the alerting band
        asyncio.run(produce(broker, [(topics[k], key, v) for k, key, v in s.messages]))
        wait("resolved", lambda: not firing(alertmanager, "pay-1"), 60, worker)
        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    alerts = [json.loads(r.value) for r in asyncio.run(consume_all(broker, topics["alerts"], 1))]
    assert [(a["account_id"], a["kind"]) for a in alerts] == [("pay-1", "escalated"),
                                                              ("pay-1", "deescalated")]
    assert alerts[1]["band"] in ("low", "medium")
