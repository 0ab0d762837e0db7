"""ClickHouse schema: idempotent CREATE ... IF NOT EXISTS statements, run at start and by `migrate`.

Data tables (``*_data``) are ReplacingMergeTree keyed by what a row describes, with a version
that only grows, so at-least-once delivery and replays rewrite rows instead of adding them.
Analysts query the views without the suffix, which apply FINAL so plain SQL is exact.
"""

from __future__ import annotations


def statements(ttl_days: int = 400) -> list[str]:
    """DDL in dependency order. ``ttl_days`` bounds score snapshots (the largest table)."""
    dedup = "SETTINGS non_replicated_deduplication_window = 1000"
    return [
        # One row per account and event-time day; version = the account's event count.
        # ORDER BY (account_id, day): the replacing key; dashboards filter by day via the
        # monthly partitions.
        f"""CREATE TABLE IF NOT EXISTS account_daily_data (
            account_id String, day Date,
            events UInt64, usage_events UInt64, sessions UInt64, active_users UInt32,
            billing_events UInt64, support_events UInt64, version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(day) ORDER BY (account_id, day) {dedup}""",
        """CREATE VIEW IF NOT EXISTS account_daily AS
        SELECT * FROM account_daily_data FINAL""",
        # A snapshot each time an account's score or band changes.
        f"""CREATE TABLE IF NOT EXISTS account_scores_data (
            account_id String, as_of DateTime64(3, 'UTC'), score Float32,
            band LowCardinality(String), reasons Array(LowCardinality(String)),
            mrr_cents Int64, sub_status LowCardinality(String), plan String, version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(as_of) ORDER BY (account_id, as_of)
        TTL toDateTime(as_of) + INTERVAL {int(ttl_days)} DAY {dedup}""",
        """CREATE VIEW IF NOT EXISTS account_scores AS
        SELECT * FROM account_scores_data FINAL""",
        # Latest score per account: what "accounts and MRR at risk" read.
        """CREATE VIEW IF NOT EXISTS account_risk AS
        SELECT account_id, argMax(score, (as_of, version)) AS score,
               argMax(band, (as_of, version)) AS band,
               argMax(reasons, (as_of, version)) AS reasons,
               argMax(mrr_cents, (as_of, version)) AS mrr_cents,
               argMax(sub_status, (as_of, version)) AS sub_status,
               max(as_of) AS last_scored_at
        FROM account_scores_data FINAL GROUP BY account_id""",
        # Alerts, keyed by their deterministic id.
        f"""CREATE TABLE IF NOT EXISTS alerts_data (
            alert_id String, account_id String, kind LowCardinality(String),
            band LowCardinality(String), previous_band LowCardinality(String), score Float32,
            reasons Array(LowCardinality(String)), plays Array(LowCardinality(String)),
            mrr_at_risk_cents Int64, trigger_event_id String,
            triggered_at DateTime64(3, 'UTC'), emitted_at DateTime64(3, 'UTC'),
            policy_version LowCardinality(String)
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(emitted_at) ORDER BY (account_id, alert_id) {dedup}""",
        """CREATE VIEW IF NOT EXISTS alerts AS SELECT * FROM alerts_data FINAL""",
    ]


TABLES = ("account_daily_data", "account_scores_data", "alerts_data")
