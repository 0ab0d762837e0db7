"""ClickHouse schema: idempotent CREATE ... IF NOT EXISTS statements, run at start and by `migrate`.

Data tables (``*_data``) are ReplacingMergeTree keyed by what a row describes, with a version
that only grows, so at-least-once delivery and replays rewrite rows instead of adding them.
Analysts query the views without the suffix, which apply FINAL so plain SQL is exact.
"""

# The SQL here is built only from our own literals and integers (days), never from input.
# ruff: noqa: S608

from __future__ import annotations

import os
import re
from typing import Any

FROM_ENV = -1
CURRENCY_FROM_ENV = "(env)"


# Gross and net MRR churn and net revenue retention from a month's movements: one definition
# for mrr_monthly (per currency) and mrr_monthly_reporting (converted), docs/clickhouse.md.
MRR_RATIOS = """\
               if(mrr_start_cents = 0, NULL,
                  (churned_mrr_cents + contraction_mrr_cents) / mrr_start_cents) AS gross_mrr_churn,
               if(mrr_start_cents = 0, NULL,
                  (churned_mrr_cents + contraction_mrr_cents - expansion_mrr_cents)
                  / mrr_start_cents) AS net_mrr_churn,
               if(mrr_start_cents = 0, NULL,
                  (mrr_start_cents - churned_mrr_cents - contraction_mrr_cents
                   + expansion_mrr_cents) / mrr_start_cents) AS net_revenue_retention"""

def statements(ttl_days: int = 400, past_due_churn_days: int | None = FROM_ENV,
               reporting_currency: str | None = CURRENCY_FROM_ENV) -> list[str]:
    """DDL in dependency order. ``ttl_days`` bounds score snapshots (the largest table);
    ``past_due_churn_days`` defines churn and ``reporting_currency`` the currency of
    ``mrr_monthly_reporting`` (None: that view is empty). Callers with settings pass them
    (``settings.views``: ``sinks.clickhouse.migrate``); left out, both are read from the
    environment as the settings would read them (CHURNSIGNAL_VIEWS__*)."""
    if past_due_churn_days == FROM_ENV:
        past_due_churn_days = past_due_churn_days_from_env()
    if reporting_currency == CURRENCY_FROM_ENV:
        reporting_currency = view_settings_from_env().reporting_currency
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
        # A snapshot each time what it says changes (score in whole points, band, reasons,
        # MRR, status, plan, policy, a shadow's score and band: stream.fold).
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
        # Latest score per account: what "accounts and MRR at risk" read. The latest is the
        # last written: the highest version (the state's event count), then time. By time
        # first, a batch of late events (scored at their time) would rank below the re-score
        # tick before it, and snapshots are written only when they change.
        """CREATE OR REPLACE VIEW account_risk AS
        SELECT account_id, argMax(score, (version, as_of)) AS score,
               argMax(band, (version, as_of)) AS band,
               argMax(reasons, (version, as_of)) AS reasons,
               argMax(mrr_cents, (version, as_of)) AS mrr_cents,
               argMax(sub_status, (version, as_of)) AS sub_status,
               argMax(as_of, (version, as_of)) AS last_scored_at
        FROM account_scores_data FINAL GROUP BY account_id""",
        # Alerts, keyed by their deterministic id.
        f"""CREATE TABLE IF NOT EXISTS alerts_data (
            alert_id String, account_id String, kind LowCardinality(String),
            band LowCardinality(String), previous_band LowCardinality(String), score Float32,
            reasons Array(LowCardinality(String)), plays Array(LowCardinality(String)),
            mrr_at_risk_cents Int64, trigger_event_id String,
            triggered_at DateTime64(3, 'UTC'), emitted_at DateTime64(3, 'UTC'),
            policy_version LowCardinality(String), plan String,
            attributes Map(LowCardinality(String), String)
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(emitted_at) ORDER BY (account_id, alert_id) {dedup}""",
        # Alerts carry the account's plan (schema version 2) and the attributes the policy
        # maps from Segment group traits (version 3); '' and {} when unknown. Before the view,
        # whose * is expanded when it is created.
        """ALTER TABLE alerts_data
            ADD COLUMN IF NOT EXISTS plan String,
            ADD COLUMN IF NOT EXISTS attributes Map(LowCardinality(String), String)""",
        """CREATE OR REPLACE VIEW alerts AS SELECT * FROM alerts_data FINAL""",
        # Acknowledgements and snoozes (POST /api/accounts/ID/ack|snooze), one row per
        # request, with the alert they answer when known and the band the account was at
        # (what calibration learns from; the alert_outcomes view shows them beside alerts).
        f"""CREATE TABLE IF NOT EXISTS alert_actions_data (
            account_id String, action_id String, alert_id String,
            action LowCardinality(String), band LowCardinality(String),
            until Nullable(DateTime64(3, 'UTC')), at DateTime64(3, 'UTC'), by String,
            note String
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(at) ORDER BY (account_id, action_id) {dedup}""",
        """CREATE OR REPLACE VIEW alert_actions AS SELECT * FROM alert_actions_data FINAL""",
        # Every applied billing event (subscription changes carry status and MRR after and
        # before), keyed by event id: the source of churn and revenue figures.
        f"""CREATE TABLE IF NOT EXISTS billing_events_data (
            account_id String, event_id String, occurred_at DateTime64(3, 'UTC'),
            type LowCardinality(String), status LowCardinality(String), plan String,
            mrr_cents Int64, mrr_before_cents Int64, cancel_at_period_end Bool,
            invoice_id String, amount_cents Nullable(Int64), attempt_count Nullable(UInt32),
            final_attempt Bool, involuntary Bool, version UInt64,
            currency LowCardinality(String)
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(occurred_at) ORDER BY (account_id, occurred_at, event_id) {dedup}""",
        # Billing rows carry their currency (lower case ISO 4217; '' when the event had none).
        """ALTER TABLE billing_events_data
            ADD COLUMN IF NOT EXISTS currency LowCardinality(String)""",
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
        *business_views(past_due_churn_days),
        *currency_views(reporting_currency),
        *audit_tables(),
    ]


def view_settings_from_env() -> Any:
    """CHURNSIGNAL_VIEWS__* as the settings read them (env only, like them): a ViewSettings."""
    from churnsignal.app.settings import ViewSettings

    raw = {name: os.environ.get(f"CHURNSIGNAL_VIEWS__{name.upper()}")
           for name in ("past_due_churn_days", "reporting_currency")}
    return ViewSettings.model_validate(raw)


def past_due_churn_days_from_env() -> int | None:
    """CHURNSIGNAL_VIEWS__PAST_DUE_CHURN_DAYS as the settings read it (env only, like them)."""
    from churnsignal.app.settings import ViewSettings

    raw = os.environ.get("CHURNSIGNAL_VIEWS__PAST_DUE_CHURN_DAYS")
    return ViewSettings.model_validate({"past_due_churn_days": raw}).past_due_churn_days


# Statuses of a paying customer (a trial that never converts is not one).
PAID = "('active', 'past_due', 'unpaid', 'paused')"
# Row order within an account: event time, then version, then id (a stable tie-break).
ORDER = "at, version, event_id"
_UPTO_HERE = f"PARTITION BY account_id ORDER BY {ORDER} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW"


def business_views(past_due_churn_days: int | None = None) -> list[str]:
    """What the business asks, as views over the tables above (definitions in docs/clickhouse.md).

    Every churn figure reads one timeline per account (``account_timeline``): subscription
    status rows (live events and backfill snapshots) and paid invoices (evidence that the
    subscription is active: a quiet renewal), plus, with ``past_due_churn_days``, a churn at
    the end of a delinquency that lasted that long. A customer is an account whose latest
    timeline row is a paid status, not lapsed; a churn is a row that ends being one.
    """
    n = past_due_churn_days
    lapsed = "false" if n is None else f"(delinquent AND at >= run_start + INTERVAL {int(n)} DAY)"
    # A delinquency that lasted N days without a payment or another status ending it: the
    # customer churns (involuntarily) at its N-th day.
    lapses = "" if n is None else f"""
            UNION ALL
            SELECT d.account_id AS account_id, d.churn_at AS at, toUInt64(0) AS version,
                   '' AS event_id, 'canceled' AS status, true AS involuntary,
                   d.currency AS currency, toInt64(0) AS mrr, toUInt8(0) AS is_customer
            FROM (SELECT account_id, grp, any(run_start) + INTERVAL {int(n)} DAY AS churn_at,
                         any(account_currency) AS currency
                  FROM billing_evidence WHERE delinquent GROUP BY account_id, grp) AS d
            LEFT JOIN (SELECT account_id, grp, min(at) AS group_start FROM billing_evidence
                       GROUP BY account_id, grp) AS g
                ON g.account_id = d.account_id AND g.grp = d.grp + 1
            WHERE (g.account_id = '' OR g.group_start > d.churn_at) AND d.churn_at <= now64(3)"""
    return [
        # Status evidence per account, in order: subscription rows, and paid invoices as
        # 'active'; MRR carried from the latest subscription row; the delinquency run
        # (past_due/unpaid rows since the last other row) each row belongs to.
        f"""CREATE OR REPLACE VIEW billing_evidence AS
        SELECT *, minIf(at, delinquent) OVER (PARTITION BY account_id, grp) AS run_start
        FROM (
            SELECT *,
                   sum(toUInt64(NOT delinquent)) OVER ({_UPTO_HERE}) AS grp,
                   argMaxIf(row_mrr, ({ORDER}), from_subscription) OVER ({_UPTO_HERE})
                       AS mrr_cents,
                   argMaxIf(currency, ({ORDER}), currency != '')
                       OVER (PARTITION BY account_id) AS account_currency
            FROM (SELECT account_id, occurred_at AS at, version, event_id,
                         if(status != '', status, 'active') AS status,
                         status != '' AS from_subscription,
                         status IN ('past_due', 'unpaid') AS delinquent,
                         mrr_cents AS row_mrr, involuntary, currency
                  FROM billing_events
                  WHERE status != '' OR (type = 'invoice_paid' AND ifNull(amount_cents, 0) > 0)))""",
        f"""CREATE OR REPLACE VIEW account_timeline AS
        SELECT account_id, at, version, event_id, status, involuntary, currency, is_customer,
               if(is_customer, mrr, 0) AS mrr_cents,
               lagInFrame(is_customer, 1, toUInt8(0)) OVER w AS was_customer,
               lagInFrame(if(is_customer, mrr, 0), 1, toInt64(0)) OVER w AS mrr_before_cents
        FROM (
            SELECT account_id, at, version, event_id, status, involuntary,
                   account_currency AS currency, mrr_cents AS mrr,
                   toUInt8(status IN {PAID} AND NOT {lapsed}) AS is_customer
            FROM billing_evidence{lapses})
        WINDOW w AS (PARTITION BY account_id ORDER BY {ORDER}
                     ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)""",
        f"""CREATE OR REPLACE VIEW account_lifecycle AS
        SELECT account_id,
               minIfOrNull(at, is_customer) AS started_at,
               argMax(status, ({ORDER})) AS last_status,
               argMax(is_customer, ({ORDER})) AS customer_now,
               if(started_at IS NOT NULL AND NOT customer_now,
                  maxIf(at, was_customer AND NOT is_customer), NULL) AS ended_at,
               argMaxIf(involuntary, ({ORDER}), was_customer AND NOT is_customer)
                   AS involuntary,
               argMaxIf(mrr_before_cents, ({ORDER}), was_customer AND NOT is_customer)
                   AS mrr_lost_cents,
               argMax(mrr_cents, ({ORDER})) AS mrr_cents,
               any(currency) AS currency
        FROM account_timeline GROUP BY account_id""",
        # Months from the first timeline row to now, for the monthly views.
        """CREATE OR REPLACE VIEW calendar_months AS
        SELECT toDateTime64(addMonths(first, number), 3, 'UTC') AS month
        FROM (SELECT toStartOfMonth(min(at)) AS first FROM account_timeline
              HAVING count() > 0) AS f
        ARRAY JOIN range(toUInt32(greatest(0, dateDiff('month', first, today()))) + 1)
            AS number""",
        # Logo churn: customers at the month's start that churned in it / customers at its
        # start; split by the kind of their first churn in the month.
        """CREATE OR REPLACE VIEW churn_monthly AS
        SELECT month, countIf(at_start) AS customers_at_start,
               countIf(at_start AND churns > 0) AS churned,
               countIf(at_start AND churns > 0 AND first_involuntary) AS churned_involuntary,
               churned - churned_involuntary AS churned_voluntary,
               if(customers_at_start = 0, NULL, churned / customers_at_start) AS logo_churn_rate
        FROM (
            SELECT m.month AS month, t.account_id AS account_id,
                   argMaxIf(t.is_customer, (t.at, t.version, t.event_id), t.at < m.month)
                       AS at_start,
                   countIf(t.was_customer AND NOT t.is_customer AND t.at >= m.month
                           AND t.at < addMonths(m.month, 1)) AS churns,
                   argMinIf(t.involuntary, (t.at, t.version, t.event_id),
                            t.was_customer AND NOT t.is_customer AND t.at >= m.month
                            AND t.at < addMonths(m.month, 1)) AS first_involuntary
            FROM calendar_months AS m CROSS JOIN account_timeline AS t
            GROUP BY month, account_id)
        GROUP BY month ORDER BY month""",
        # MRR movements per currency (never summed across currencies), from each account's
        # MRR at the month's start and at its end: churned (to 0), contraction, expansion;
        # new MRR (accounts at 0 at the start: new and reactivated) is apart.
        f"""CREATE OR REPLACE VIEW mrr_monthly AS
        SELECT month, currency, sum(mrr_start) AS mrr_start_cents,
               sumIf(mrr_start, mrr_start > 0 AND mrr_end = 0) AS churned_mrr_cents,
               sumIf(mrr_start - mrr_end, mrr_end > 0 AND mrr_end < mrr_start)
                   AS contraction_mrr_cents,
               sumIf(mrr_end - mrr_start, mrr_start > 0 AND mrr_end > mrr_start)
                   AS expansion_mrr_cents,
               sumIf(mrr_end, mrr_start = 0) AS new_mrr_cents,
               sum(mrr_end) AS mrr_end_cents,
{MRR_RATIOS}
        FROM (
            SELECT m.month AS month, t.account_id AS account_id, any(t.currency) AS currency,
                   argMaxIf(t.mrr_cents, (t.at, t.version, t.event_id), t.at < m.month)
                       AS mrr_start,
                   argMaxIf(t.mrr_cents, (t.at, t.version, t.event_id),
                            t.at < addMonths(m.month, 1)) AS mrr_end
            FROM calendar_months AS m CROSS JOIN account_timeline AS t
            GROUP BY month, account_id)
        GROUP BY month, currency ORDER BY month, currency""",
        # Retention by first-paid month: share of the cohort a customer at the start of the
        # k-th month after its own (k = 0: the whole cohort); reactivated ones count again.
        """CREATE OR REPLACE VIEW cohort_retention AS
        SELECT cohort, k AS months_since, count() AS customers, countIf(kept) AS retained,
               retained / customers AS retention
        FROM (
            SELECT c.account_id AS account_id, c.cohort AS cohort, c.k AS k,
                   c.k = 0 OR argMaxIf(t.is_customer, (t.at, t.version, t.event_id),
                                       t.at < addMonths(c.cohort, c.k)) AS kept
            FROM (SELECT account_id, toStartOfMonth(started_at) AS cohort, k
                  FROM account_lifecycle
                  ARRAY JOIN range(toUInt32(greatest(0, dateDiff(
                      'month', toStartOfMonth(started_at), today()))) + 1) AS k
                  WHERE started_at IS NOT NULL) AS c
            INNER JOIN account_timeline AS t ON t.account_id = c.account_id
            GROUP BY account_id, cohort, k)
        GROUP BY cohort, months_since ORDER BY cohort, months_since""",
        """CREATE OR REPLACE VIEW risk_by_band AS
        SELECT band, count() AS accounts, sum(mrr_cents) AS mrr_cents
        FROM account_risk WHERE sub_status != 'canceled' GROUP BY band""",
        # Each escalation and what became of its account: churned after it, recovered
        # (now low or medium risk), or still at risk; and the latest ack or snooze that
        # named it ('' when none).
        """CREATE OR REPLACE VIEW alert_outcomes AS
        SELECT a.alert_id AS alert_id, a.account_id AS account_id, a.band AS band,
               a.reasons[1] AS top_reason, a.triggered_at AS triggered_at,
               a.mrr_at_risk_cents AS mrr_at_risk_cents,
               multiIf(l.ended_at IS NOT NULL AND l.ended_at >= a.triggered_at, 'churned',
                       r.band IN ('low', 'medium'), 'recovered', 'still_at_risk') AS outcome,
               x.action AS action, x.action_at AS action_at, x.action_until AS action_until,
               x.action_by AS action_by
        FROM alerts AS a
        LEFT JOIN account_lifecycle AS l ON l.account_id = a.account_id
        LEFT JOIN account_risk AS r ON r.account_id = a.account_id
        LEFT JOIN (SELECT alert_id, argMax(action, at) AS action, max(at) AS action_at,
                          argMax(until, at) AS action_until, argMax(by, at) AS action_by
                   FROM alert_actions WHERE alert_id != '' GROUP BY alert_id) AS x
            ON x.alert_id = a.alert_id
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


# Minor units per unit of a currency, as Stripe counts amounts (its zero- and three-decimal
# currencies; every other one has two decimals): what an MRR in "cents" is in each currency.
ZERO_DECIMAL = ("bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx",
                "vnd", "vuv", "xaf", "xof", "xpf")
THREE_DECIMAL = ("bhd", "jod", "kwd", "omr", "tnd")
RATE_SCALE = 12  # decimal places a rate keeps (currency_rates_data.rate_to_reporting)
RATES_COLUMNS = ("reporting_currency", "currency", "valid_from", "rate_to_reporting",
                 "loaded_at")
# mrr_monthly's amounts that the reporting view converts, in its column order.
MRR_FIGURES = ("mrr_start_cents", "churned_mrr_cents", "contraction_mrr_cents",
               "expansion_mrr_cents", "new_mrr_cents", "mrr_end_cents")


def minor_units(currency: str) -> int:
    """Minor units per unit of ``currency`` (lower case ISO 4217): 1, 100 or 1000."""
    return 1 if currency in ZERO_DECIMAL else 1000 if currency in THREE_DECIMAL else 100


def _minor_units_sql(column: str) -> str:
    return (f"multiIf(has({list(ZERO_DECIMAL)}, {column}), 1, "
            f"has({list(THREE_DECIMAL)}, {column}), 1000, 100)")


def currency_views(reporting_currency: str | None) -> list[str]:
    """The rates a user provides (``churnsignal import rates``) and ``mrr_monthly_reporting``:
    each month's MRR movements of every currency converted to ``reporting_currency`` at the
    rate valid on the month's first day, then summed. A currency without such a rate is left
    out and counted (``missing_rate``), never converted at 1; the reporting currency itself
    is its own (rate 1). Unset: the view has its columns and no rows.

    A figure F of currency c in month m: round_half_up(F × rate(c, m) × u(r) / u(c)), with
    u the minor units per unit (``minor_units``) and rate(c, m) the reporting currency's
    units per unit of c of the row with the latest ``valid_from`` <= m; then summed over
    the currencies converted. Ratios are those of the converted sums."""
    rep = reporting_currency or ""
    if not re.fullmatch(r"[a-z]{3}|", rep):  # inlined below: only a validated code
        raise ValueError(f"reporting currency {rep!r} is not a 3-letter ISO 4217 code")
    figures = ",\n               ".join(
        f"toInt64(sumIf(round(toDecimal128(c.{f}, 0) * c.rate * {minor_units(rep) if rep else 1}"
        f" / c.units, 0), c.converted)) AS {f}" for f in MRR_FIGURES)
    return [
        # One row per reporting currency, currency and first day of validity; loading the
        # same key again replaces it (the latest load wins).
        f"""CREATE TABLE IF NOT EXISTS currency_rates_data (
            reporting_currency LowCardinality(String), currency LowCardinality(String),
            valid_from Date, rate_to_reporting Decimal(38, {RATE_SCALE}),
            loaded_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree(loaded_at)
        ORDER BY (reporting_currency, currency, valid_from)""",
        """CREATE OR REPLACE VIEW currency_rates AS
        SELECT reporting_currency, currency, valid_from, rate_to_reporting
        FROM currency_rates_data FINAL""",
        f"""CREATE OR REPLACE VIEW mrr_monthly_reporting AS
        SELECT c.month AS month, '{rep}' AS reporting_currency,
               {figures},
{MRR_RATIOS},
               toUInt32(countIf(c.converted)) AS currencies,
               toUInt32(countIf(NOT c.converted)) AS missing_rate,
               arraySort(groupArrayIf(c.currency, NOT c.converted)) AS missing_currencies
        FROM (
            SELECT m.month AS month, m.currency AS currency,
                   {", ".join(f"any(m.{f}) AS {f}" for f in MRR_FIGURES)},
                   toUInt32({_minor_units_sql("m.currency")}) AS units,
                   m.currency = '{rep}' AS own,
                   own OR (m.currency != '' AND countIf(
                       r.currency = m.currency AND r.valid_from <= toDate(m.month)) > 0)
                       AS converted,
                   if(own, toDecimal128(1, {RATE_SCALE}),
                      argMaxIf(r.rate_to_reporting, r.valid_from,
                               r.currency = m.currency AND r.valid_from <= toDate(m.month)))
                       AS rate
            FROM mrr_monthly AS m
            LEFT JOIN (SELECT currency, valid_from, rate_to_reporting FROM currency_rates
                       WHERE reporting_currency = '{rep}') AS r
                ON r.currency = m.currency
            GROUP BY m.month, m.currency) AS c
        WHERE '{rep}' != ''
        GROUP BY c.month ORDER BY c.month""",
    ]


TABLES = ("account_daily_data", "account_scores_data", "alerts_data", "billing_events_data",
          "support_events_data")


# The audit of `churnsignal forget`: one row per request, phase and partition that deleted
# something (and always one from the request's home partition, so a repeat that found
# nothing is recorded too). A redelivered request rewrites its row (the same key); the one
# that counted the most rows wins.
DELETIONS_COLUMNS = ("request_id", "phase", "partition", "kind", "subject", "requested_at",
                     "done_at", "states", "identities", "parked", "scrubbed", "rows",
                     "rows_total")


def audit_tables() -> list[str]:
    return [
        """CREATE TABLE IF NOT EXISTS deletions_data (
            request_id String, phase LowCardinality(String), partition UInt16,
            kind LowCardinality(String), subject String,
            requested_at DateTime64(3, 'UTC'), done_at DateTime64(3, 'UTC'),
            states UInt32, identities UInt32, parked UInt32, scrubbed UInt32,
            rows Map(String, UInt64), rows_total UInt64
        ) ENGINE = ReplacingMergeTree(rows_total) ORDER BY (request_id, phase, partition)""",
        """CREATE OR REPLACE VIEW deletions AS SELECT * FROM deletions_data FINAL""",
    ]
