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
        """CREATE OR REPLACE VIEW account_daily AS
        SELECT * FROM account_daily_data FINAL""",
        # A snapshot each time an account's score or band changes.
        f"""CREATE TABLE IF NOT EXISTS account_scores_data (
            account_id String, as_of DateTime64(3, 'UTC'), score Float32,
            band LowCardinality(String), reasons Array(LowCardinality(String)),
            mrr_cents Int64, sub_status LowCardinality(String), plan String, version UInt64,
            policy LowCardinality(String), shadow_score Nullable(Float32),
            shadow_band LowCardinality(String), shadow_policy LowCardinality(String)
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(as_of) ORDER BY (account_id, as_of)
        TTL toDateTime(as_of) + INTERVAL {int(ttl_days)} DAY {dedup}""",
        # Tables made by an older version gain the columns added since (no-ops otherwise).
        """ALTER TABLE account_scores_data
            ADD COLUMN IF NOT EXISTS policy LowCardinality(String),
            ADD COLUMN IF NOT EXISTS shadow_score Nullable(Float32),
            ADD COLUMN IF NOT EXISTS shadow_band LowCardinality(String),
            ADD COLUMN IF NOT EXISTS shadow_policy LowCardinality(String)""",
        """CREATE OR REPLACE VIEW account_scores AS
        SELECT * FROM account_scores_data FINAL""",
        # Latest score per account: what "accounts and MRR at risk" read.
        """CREATE OR REPLACE VIEW account_risk AS
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
        """CREATE OR REPLACE VIEW alerts AS SELECT * FROM alerts_data FINAL""",
        # Every applied billing event (subscription changes carry status and MRR after and
        # before), keyed by event id: the source of churn and revenue figures.
        f"""CREATE TABLE IF NOT EXISTS billing_events_data (
            account_id String, event_id String, occurred_at DateTime64(3, 'UTC'),
            type LowCardinality(String), status LowCardinality(String), plan String,
            mrr_cents Int64, mrr_before_cents Int64, cancel_at_period_end Bool,
            invoice_id String, amount_cents Nullable(Int64), attempt_count Nullable(UInt32),
            final_attempt Bool, involuntary Bool, version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(occurred_at) ORDER BY (account_id, occurred_at, event_id) {dedup}""",
        """CREATE OR REPLACE VIEW billing_events AS SELECT * FROM billing_events_data FINAL""",
        # Every applied support event (tickets, CSAT, NPS), keyed by event id.
        f"""CREATE TABLE IF NOT EXISTS support_events_data (
            account_id String, event_id String, occurred_at DateTime64(3, 'UTC'),
            type LowCardinality(String), ticket_id String, status LowCardinality(String),
            priority LowCardinality(String), channel LowCardinality(String),
            first_response_s Nullable(Float64), resolution_s Nullable(Float64),
            csat LowCardinality(String), nps Nullable(UInt8), version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(occurred_at) ORDER BY (account_id, occurred_at, event_id)
        TTL toDateTime(occurred_at) + INTERVAL {int(ttl_days)} DAY {dedup}""",
        """CREATE OR REPLACE VIEW support_events AS SELECT * FROM support_events_data FINAL""",
        *business_views(),
    ]


def business_views() -> list[str]:
    """What the business asks, as views over the tables above (definitions in docs/clickhouse.md).

    A customer is an account from its first paid subscription status (active, past_due,
    unpaid, paused; a trial that never converts is not a customer) until a final cancellation.
    """
    return [
        """CREATE OR REPLACE VIEW account_lifecycle AS
        SELECT account_id,
               minIf(occurred_at, status IN ('active', 'past_due', 'unpaid', 'paused'))
                   AS started_at,
               argMax(status, (occurred_at, version)) AS last_status,
               if(last_status = 'canceled', maxIf(occurred_at, status = 'canceled'), NULL)
                   AS ended_at,
               argMaxIf(involuntary, occurred_at, status = 'canceled') AS involuntary,
               argMaxIf(mrr_before_cents, occurred_at, status = 'canceled') AS mrr_lost_cents,
               argMax(mrr_cents, (occurred_at, version)) AS mrr_cents
        FROM billing_events WHERE status != '' GROUP BY account_id""",
        # Months from the first subscription event to now, for the monthly views.
        """CREATE OR REPLACE VIEW calendar_months AS
        SELECT toDateTime64(addMonths(first, number), 3, 'UTC') AS month
        FROM (SELECT toStartOfMonth(min(occurred_at)) AS first FROM billing_events
              WHERE status != '' HAVING count() > 0) AS f
        ARRAY JOIN range(toUInt32(dateDiff('month', first, today())) + 1) AS number""",
        # Logo churn: customers lost in the month / customers at its start; split by kind.
        """CREATE OR REPLACE VIEW churn_monthly AS
        SELECT m.month AS month,
               countIf(l.started_at < m.month
                       AND (l.ended_at IS NULL OR l.ended_at >= m.month)) AS customers_at_start,
               countIf(l.started_at < m.month AND l.ended_at >= m.month
                       AND l.ended_at < addMonths(m.month, 1)) AS churned,
               countIf(l.started_at < m.month AND l.ended_at >= m.month
                       AND l.ended_at < addMonths(m.month, 1) AND l.involuntary)
                   AS churned_involuntary,
               churned - churned_involuntary AS churned_voluntary,
               if(customers_at_start = 0, NULL, churned / customers_at_start) AS logo_churn_rate
        FROM calendar_months AS m
        CROSS JOIN (SELECT * FROM account_lifecycle WHERE started_at IS NOT NULL) AS l
        GROUP BY month ORDER BY month""",
        # MRR movements of accounts paying at the month's start: churned (to 0),
        # contraction and expansion; new MRR is apart and not part of retention.
        """CREATE OR REPLACE VIEW mrr_monthly AS
        SELECT month, sum(mrr_start) AS mrr_start_cents,
               sumIf(mrr_start, mrr_end = 0) AS churned_mrr_cents,
               sumIf(mrr_start - mrr_end, mrr_end > 0 AND mrr_end < mrr_start)
                   AS contraction_mrr_cents,
               sumIf(mrr_end - mrr_start, mrr_start > 0 AND mrr_end > mrr_start)
                   AS expansion_mrr_cents,
               sumIf(mrr_end, mrr_start = 0) AS new_mrr_cents,
               if(mrr_start_cents = 0, NULL,
                  (churned_mrr_cents + contraction_mrr_cents) / mrr_start_cents) AS gross_mrr_churn,
               if(mrr_start_cents = 0, NULL,
                  (churned_mrr_cents + contraction_mrr_cents - expansion_mrr_cents)
                  / mrr_start_cents) AS net_mrr_churn,
               if(mrr_start_cents = 0, NULL,
                  (mrr_start_cents - churned_mrr_cents - contraction_mrr_cents
                   + expansion_mrr_cents) / mrr_start_cents) AS net_revenue_retention
        FROM (
            SELECT m.month AS month, b.account_id AS account_id,
                   argMaxIf(b.mrr_cents, (b.occurred_at, b.version), b.occurred_at < m.month)
                       AS mrr_start,
                   argMaxIf(b.mrr_cents, (b.occurred_at, b.version),
                            b.occurred_at < addMonths(m.month, 1)) AS mrr_end
            FROM calendar_months AS m
            CROSS JOIN (SELECT account_id, occurred_at, version, mrr_cents FROM billing_events
                        WHERE status != '') AS b
            GROUP BY month, account_id)
        GROUP BY month ORDER BY month""",
        # Retention by signup (first paid) month: share of the cohort still a customer
        # k months after the cohort's month started.
        """CREATE OR REPLACE VIEW cohort_retention AS
        SELECT toStartOfMonth(started_at) AS cohort, k AS months_since, count() AS customers,
               countIf(ended_at IS NULL OR ended_at >= addMonths(toStartOfMonth(started_at), k))
                   AS retained,
               retained / customers AS retention
        FROM account_lifecycle
        ARRAY JOIN range(toUInt32(dateDiff('month', toStartOfMonth(started_at), today())) + 1)
            AS k
        WHERE started_at IS NOT NULL
        GROUP BY cohort, months_since ORDER BY cohort, months_since""",
        """CREATE OR REPLACE VIEW risk_by_band AS
        SELECT band, count() AS accounts, sum(mrr_cents) AS mrr_cents
        FROM account_risk WHERE sub_status != 'canceled' GROUP BY band""",
        # Each escalation and what became of its account: churned after it, recovered
        # (now low or medium risk), or still at risk.
        """CREATE OR REPLACE VIEW alert_outcomes AS
        SELECT a.alert_id AS alert_id, a.account_id AS account_id, a.band AS band,
               a.reasons[1] AS top_reason, a.triggered_at AS triggered_at,
               a.mrr_at_risk_cents AS mrr_at_risk_cents,
               multiIf(l.ended_at IS NOT NULL AND l.ended_at >= a.triggered_at, 'churned',
                       r.band IN ('low', 'medium'), 'recovered', 'still_at_risk') AS outcome
        FROM alerts AS a
        LEFT JOIN account_lifecycle AS l ON l.account_id = a.account_id
        LEFT JOIN account_risk AS r ON r.account_id = a.account_id
        WHERE a.kind = 'escalated'""",
        # Invoices with a failed payment, by month of the first failure: share later paid.
        """CREATE OR REPLACE VIEW payment_recovery AS
        SELECT toStartOfMonth(first_failed) AS month, count() AS failed_invoices,
               countIf(paid_at > first_failed) AS recovered,
               recovered / failed_invoices AS recovery_rate
        FROM (SELECT account_id, invoice_id,
                     minIf(occurred_at, type = 'payment_failed') AS first_failed,
                     maxIf(occurred_at, type = 'invoice_paid') AS paid_at
              FROM billing_events WHERE invoice_id != ''
              GROUP BY account_id, invoice_id HAVING countIf(type = 'payment_failed') > 0)
        GROUP BY month ORDER BY month""",
        # An account's first pause: resumed, ended in a cancellation, or still paused.
        """CREATE OR REPLACE VIEW pause_outcomes AS
        SELECT outcome, count() AS pauses FROM (
            SELECT account_id, minIf(occurred_at, status = 'paused') AS paused_at,
                   multiIf(maxIf(occurred_at, status = 'canceled') > paused_at, 'canceled',
                           maxIf(occurred_at, status IN ('active', 'trialing')) > paused_at,
                           'resumed', 'still_paused') AS outcome
            FROM billing_events WHERE status != ''
            GROUP BY account_id HAVING countIf(status = 'paused') > 0)
        GROUP BY outcome""",
    ]


TABLES = ("account_daily_data", "account_scores_data", "alerts_data", "billing_events_data",
          "support_events_data")
