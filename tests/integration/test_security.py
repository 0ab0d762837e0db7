"""SASL against Apache Kafka: the right password works, a wrong one fails fast and clearly.
The web API: a configured bearer token is required, probes stay open, bad parameters are 400s."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import Worker, figures, new_env, produce

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


API_TOKEN = "tok_" + "5f0e6c1d9a8b7c6d5e4f3a2b1c0d9e8f"


def _get(port: int, path: str, token: str | None = None,
         authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")  # noqa: S310
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    elif authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_api_needs_the_configured_token_and_checks_its_parameters(broker: str,
                                                                   tmp_path: Path) -> None:
    import json

    env = new_env(broker, tmp_path)
    token_file = tmp_path / "api_token"
    token_file.write_text(API_TOKEN + "\n")  # as a mounted secret: NAME_FILE
    # Bound to loopback (tests never bind elsewhere): a configured token is required anyway.
    worker = Worker(env, extra={"CHURNSIGNAL_API_TOKEN_FILE": str(token_file)})
    try:
        worker.wait_ready()  # /readyz needs no token
        now = time.time()
        event = {"event_id": "sec-1", "account_id": "acme", "type": "session",
                 "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60))}
        asyncio.run(produce(broker, [(env.topics["usage"], b"acme", json.dumps(event).encode())]))

        for path in ("/healthz", "/readyz", "/metrics"):  # probes and Prometheus stay open
            assert _get(worker.port, path)[0] == 200, path

        refused = {}
        for label, kwargs in [("none", {}), ("wrong", {"token": "tok_" + "0" * 32}),
                              ("basic", {"authorization": f"Basic {API_TOKEN}"}),
                              ("empty", {"authorization": "Bearer "})]:
            for path in ("/api/summary", "/api/accounts/acme", "/api/accounts/acme?at=nan"):
                status, headers, body = _get(worker.port, path, **kwargs)
                refused[label, path] = status
                assert status == 401, (label, path, status, body)
                assert headers.get("WWW-Authenticate", "").startswith("Bearer"), headers
                assert "error" in json.loads(body)
        assert 'error="invalid_token"' in _get(worker.port, "/api/summary",
                                               token="tok_" + "0" * 32)[1]["WWW-Authenticate"]

        deadline = time.monotonic() + 60
        while True:
            status, _, body = _get(worker.port, "/api/accounts/acme", token=API_TOKEN)
            if status == 200:
                break
            assert status == 404 and json.loads(body)["error"] == "unknown account", body
            assert time.monotonic() < deadline, "the event never reached the account"
            time.sleep(0.5)
        account = json.loads(body)
        assert account["events"] == 1 and account["account_id"] == "acme"
        status, _, body = _get(worker.port, f"/api/accounts/acme?at={now + 86_400:.0f}",
                               token=API_TOKEN)
        assert status == 200 and json.loads(body)["at"] == round(now + 86_400)
        status, _, body = _get(worker.port, "/api/summary", token=API_TOKEN)
        assert status == 200 and "rows" in json.loads(body)

        bad = {"/api/accounts/acme?at=nan": "at", "/api/accounts/acme?at=inf": "at",
               "/api/accounts/acme?at=-inf": "at", "/api/accounts/acme?at=-1e400": "at",
               "/api/accounts/acme?at=1e400": "at", "/api/accounts/acme?at=soon": "at",
               "/api/accounts/acme?at=": "at", "/api/accounts/acme?at=-1": "at",
               "/api/accounts/acme?at=1764000000000": "at",  # milliseconds
               "/api/accounts/acme?at=1&at=2": "at", "/api/accounts/acme?when=1": "when",
               "/api/accounts/%7Estripe%3Acus_1": "account_id",  # an identity key
               "/api/accounts/" + "a" * 201: "account_id",
               "/api/accounts/ac%00me": "account_id", "/api/accounts/ac%0Ame": "account_id",
               "/api/accounts/" + "%C3%A9" * 201: "account_id",  # 201 characters, 402 bytes
               "/api/summary?x=1": "x"}
        answers = {}
        for path, parameter in bad.items():
            status, _, body = _get(worker.port, path, token=API_TOKEN)
            answers[path] = status
            assert status == 400, (path, status, body[:300])
            answer = json.loads(body)
            assert answer["parameter"] == parameter and answer["error"], answer
        figures(f"api: {len(refused)} requests without the right token got 401; "
                f"{len(answers)} bad parameters got 400 with the reason")

        assert worker.proc.poll() is None
        log = worker.log()
        assert API_TOKEN not in log  # never logged
        assert "Traceback" not in log, log[-3000:]
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
