"""`churnsignal sync stripe` against stripe-mock, Stripe's own API mock server: the requests the
sync makes are valid for Stripe's OpenAPI spec (stripe-mock rejects unknown parameters and
values, e.g. a subscription status outside the enumeration), and the objects Stripe answers
with map to snapshots and reach ClickHouse (the embedded defaults: no broker, direct writes).

stripe-mock is built by deploy/stripe-mock.sh (`go install github.com/stripe/stripe-mock@...`);
without a Go toolchain or the module proxy the test is skipped, saying why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from churnsignal.offline.stripe_sync import (
    Checkpoint,
    StripeSync,
    SyncOptions,
    account_of,
    make_client,
    snapshot_of,
)
from tests.integration.helpers import clickhouse_query

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stripe_mock() -> Iterator[str]:
    try:
        built = subprocess.run([str(ROOT / "deploy" / "stripe-mock.sh"), "build"],
                               capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"stripe-mock could not be built: {exc}")
    binary = built.stdout.strip().splitlines()[-1] if built.stdout.strip() else ""
    if built.returncode != 0 or not binary or not os.access(binary, os.X_OK):
        pytest.skip("stripe-mock could not be built (deploy/stripe-mock.sh needs the Go "
                    f"toolchain and the Go module proxy): {built.stderr.strip()[-500:]}")
    http_port, https_port = _free_port(), _free_port()
    proc = subprocess.Popen([binary, "-http-port", str(http_port), "-https-port",
                             str(https_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "stripe-mock did not listen in 30 s"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        proc.terminate()  # by its pid
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_requests_fit_stripes_contract_and_the_objects_map(stripe_mock: str,
                                                               tmp_path: Path) -> None:
    client = make_client("sk_test_123", stripe_mock, max_network_retries=0)
    checkpoint = Checkpoint(tmp_path / "sync", "mock")
    checkpoint.load(restart=False, now=time.time())
    sync = StripeSync(client, checkpoint, SyncOptions(page_size=3))
    for name in ("customers", "subscriptions", "events"):
        sync._list(name)  # each request goes through stripe-mock's validation of the spec
    customers = list(checkpoint.read("customers"))
    subscriptions = list(checkpoint.read("subscriptions"))
    events = list(checkpoint.read("events"))
    assert customers and subscriptions and events
    assert all(c["object"] == "customer" for c in customers)
    assert all(s["object"] == "subscription" for s in subscriptions)
    assert all(e["object"] == "event" and e["id"].startswith("evt_") for e in events)
    # Stripe's own subscription object (its fixture) maps to a valid snapshot
    sub = subscriptions[0]
    account = account_of(sub, {})
    assert account == sub["customer"]  # no metadata link: the customer id, as the stream
    snapshot = snapshot_of(sub, account, as_of=time.time())
    assert isinstance(snapshot, dict), snapshot
    assert snapshot["data"]["subscription_id"] == sub["id"]
    assert snapshot["data"]["currency"] == sub["currency"]
    assert snapshot["data"]["plan"]  # from the item's price


def test_a_wrong_parameter_is_refused_by_the_contract(stripe_mock: str) -> None:
    """The mock is strict: what the sync sends is checked, not merely accepted."""
    import stripe

    client = make_client("sk_test_123", stripe_mock, max_network_retries=0)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.list(params={"status": "everything"})  # type: ignore[typeddict-item]


def test_the_cli_syncs_into_the_embedded_clickhouse(stripe_mock: str, tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("CHURNSIGNAL_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    environ.update({"CHURNSIGNAL_STATE_DIR": str(tmp_path / "state"),
                    "CHURNSIGNAL_STRIPE__API_BASE": stripe_mock,
                    "CHURNSIGNAL_STRIPE__API_KEY": "sk_test_123"})
    done = subprocess.run([sys.executable, "-m", "churnsignal", "sync", "stripe"], env=environ,
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "-> ClickHouse (embedded defaults)" in done.stdout
    assert "sk_test_123" not in done.stdout + done.stderr
    dsn = f"chdb://{(tmp_path / 'state' / 'clickhouse').resolve()}"
    rows = clickhouse_query(dsn, "SELECT event_id, type FROM billing_events ORDER BY event_id")
    assert any(r[0].startswith("snapshot:sub_") for r in rows), rows
