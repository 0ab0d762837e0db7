"""Saved analyst queries over the views: `churnsignal query NAME`, the HTML report, Grafana.

Each is plain SQL on a view, so what the command prints is what an analyst gets in any
ClickHouse client. Names are public interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SavedQuery:
    title: str
    sql: str


QUERIES: dict[str, SavedQuery] = {
    "logo_churn": SavedQuery(
        "Logo churn by month (customers lost / customers at the month's start), by kind",
        "SELECT month, customers_at_start, churned, churned_voluntary, churned_involuntary, "
        "logo_churn_rate FROM churn_monthly ORDER BY month"),
    "mrr_churn": SavedQuery(
        "MRR churn by month and currency: gross, net, and net revenue retention",
        "SELECT month, currency, mrr_start_cents, churned_mrr_cents, contraction_mrr_cents, "
        "expansion_mrr_cents, new_mrr_cents, gross_mrr_churn, net_mrr_churn, "
        "net_revenue_retention FROM mrr_monthly ORDER BY month, currency"),
    "at_risk": SavedQuery(
        "Current customers and their MRR by risk band (cancelled accounts left out)",
        "SELECT band, accounts, mrr_cents FROM risk_by_band "
        "ORDER BY indexOf(['critical', 'high', 'medium', 'low'], band)"),
    "at_risk_accounts": SavedQuery(
        "Top accounts at high or critical risk, by MRR then score",
        "SELECT account_id, band, round(score, 1) AS score, mrr_cents, reasons, sub_status, "
        "last_scored_at FROM account_risk WHERE band IN ('high', 'critical') "
        "AND sub_status != 'canceled' "
        "ORDER BY mrr_cents DESC, score DESC LIMIT 50"),
    "alerts_by_reason": SavedQuery(
        "Escalation alerts by top reason and what became of the account",
        "SELECT top_reason, count() AS alerts, countIf(outcome = 'churned') AS churned, "
        "countIf(outcome = 'recovered') AS recovered, "
        "countIf(outcome = 'still_at_risk') AS still_at_risk "
        "FROM alert_outcomes GROUP BY top_reason ORDER BY alerts DESC"),
    "cohort_retention": SavedQuery(
        "Retention by first-paid month (share still a customer k months on)",
        "SELECT cohort, months_since, customers, retained, retention FROM cohort_retention "
        "ORDER BY cohort, months_since"),
    "payment_recovery": SavedQuery(
        "Invoices with a failed payment, by month, and the share later paid",
        "SELECT month, failed_invoices, recovered, recovery_rate FROM payment_recovery "
        "ORDER BY month"),
    "pause_outcomes": SavedQuery(
        "Pauses that resumed, ended in a cancellation, or are still paused",
        "SELECT outcome, pauses FROM pause_outcomes ORDER BY pauses DESC"),
    "daily_activity": SavedQuery(
        "Accepted events and active accounts per day (last 90 days)",
        "SELECT day, sum(events) AS events, uniqExact(account_id) AS accounts "
        "FROM account_daily WHERE day >= today() - 90 GROUP BY day ORDER BY day"),
}


@dataclass(frozen=True)
class QueryResult:
    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]


def run_query(client: Any, name: str) -> QueryResult:
    """Run a saved query on a clickhouse-connect client or a ClickHouseSink."""
    saved = QUERIES[name]
    result = client.query(saved.sql)
    columns = list(result.column_names)
    return QueryResult(name, saved.title, columns,
                       [dict(zip(columns, row, strict=True)) for row in result.result_rows])
