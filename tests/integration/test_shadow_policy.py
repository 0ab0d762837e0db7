"""A shadow policy in a real worker: its scores land beside the live ones, it never alerts;
tables made by an older version gain the new score columns."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import yaml

from churnsignal.sinks.clickhouse import connect, migrate
from churnsignal.stream.features import catalogue
from churnsignal.stream.policy import Model, Policy
from tests.integration.helpers import (
    Worker,
    clickhouse_query,
    consume_all,
    new_env,
    produce,
)

pytestmark = pytest.mark.integration


@pytest.mark.offline
def test_an_older_scores_table_gains_the_policy_and_shadow_columns(tmp_path: Path) -> None:
    client = connect(f"chdb://{tmp_path / 'ch'}")
    try:
        client.command("""CREATE TABLE account_scores_data (
            account_id String, as_of DateTime64(3, 'UTC'), score Float32,
            band LowCardinality(String), reasons Array(LowCardinality(String)),
            mrr_cents Int64, sub_status LowCardinality(String), plan String, version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (account_id, as_of)""")
        client.command("INSERT INTO account_scores_data (account_id, as_of, score, band, "
                       "reasons, mrr_cents, sub_status, plan, version) VALUES "
                       "('old', now64(3), 12, 'low', [], 0, '', '', 1)")
        migrate(client)
        migrate(client)  # twice: nothing changes
        rows = client.query("SELECT account_id, policy, shadow_score, shadow_band "
                            "FROM account_scores").result_rows
        assert rows == [("old", "", None, "")]
    finally:
        client.close()


def test_a_shadow_policy_scores_beside_the_live_one_and_never_alerts(
        broker: str, tmp_path: Path) -> None:
    types = ["report exported"]
    feats = {f.name: f for f in catalogue(types)}
    names = ["events_28d", "type:report exported:events_28d"]
    shadow = Policy(version="shadow-test", model=Model(
        event_types=types, features=names, transforms=[feats[n].transform for n in names],  # type: ignore[misc]
        means=[0.0, 0.0], scales=[1.0, 1.0], coefficients=[-0.2, -0.5], intercept=9.0))
    path = tmp_path / "shadow.yaml"
    path.write_text(yaml.safe_dump(shadow.model_dump(mode="json")))
    env = new_env(broker, tmp_path)
    worker = Worker(env, extra={"CHURNSIGNAL_SHADOW_POLICY_FILE": str(path)})
    worker.wait_ready()
    now = datetime.now(UTC)
    events = [orjson.dumps({"event_id": f"s{i}", "account_id": f"acct-{i % 5}",
                            "type": "feature_used", "user_id": "u1",
                            "occurred_at": now.isoformat(),
                            "data": {"name": "Report Exported" if i % 2 else "Dashboard"}})
              for i in range(40)]
    asyncio.run(produce(broker, [(env.topics["usage"], None, e) for e in events]))
    worker.wait_applied(40)
    time.sleep(2)  # the next flush
    alerts = asyncio.run(consume_all(broker, env.topics["alerts"], 2))
    assert worker.stop() == 0, worker.log()[-3000:]
    rows = clickhouse_query(
            worker.dsn(), "SELECT account_id, argMax(policy, version), "
            "argMax(shadow_score, version), argMax(shadow_band, version), "
            "argMax(shadow_policy, version) FROM account_scores GROUP BY account_id "
            "ORDER BY account_id")
    assert [r[0] for r in rows] == [f"acct-{i}" for i in range(5)]
    for _, live, score, band, name in rows:
        assert live == "default-1" and name == "shadow-test"
        assert score is not None and 0 < float(score) < 100 and band
    # the shadow policy's high scores page nobody: every alert is the live policy's
    assert all(orjson.loads(a.value)["policy_version"] == "default-1" for a in alerts)
