"""`churnsignal report`: one self-contained HTML page of the churn views, readable offline.

The charts are Plotly figures; plotly.js is embedded once in the page (no CDN), so the file
can be mailed or archived. Figures come from the saved queries, so the page shows exactly
what `churnsignal query NAME` prints.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from churnsignal.sinks.queries import QueryResult, run_query

BAND_COLORS = {"critical": "#b2182b", "high": "#ef8a62", "medium": "#fddbc7", "low": "#67a9cf"}

_PAGE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
 .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1rem; }
 .card { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; min-width: 0; }
 table { border-collapse: collapse; font-size: .9rem; }
 th, td { border-bottom: 1px solid #eee; padding: .25rem .6rem; text-align: left; }
 .muted { color: #777; }
</style>
<script>{{ plotly_js }}</script></head>
<body>
<h1>{{ title }}</h1>
<p class="muted">Generated {{ generated }} from {{ source }}.</p>
<div class="grid">
{% for chart in charts %}<div class="card">{{ chart }}</div>
{% endfor %}</div>
<h2>{{ table_title }}</h2>
{% if accounts.rows %}<table><tr>{% for c in accounts.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in accounts.rows %}<tr>{% for c in accounts.columns %}<td>{{ row[c] }}</td>{% endfor %}</tr>
{% endfor %}</table>{% else %}<p class="muted">No account is at high or critical risk.</p>{% endif %}
</body></html>
""", autoescape=True)


def _figure(title: str, traces: list[Any], *, percent: bool = False, **layout: Any) -> go.Figure:
    fig = go.Figure(traces)
    fig.update_layout(title=title, height=360, margin={"l": 50, "r": 20, "t": 50, "b": 40},
                      legend={"orientation": "h"}, **layout)
    if percent:
        fig.update_yaxes(tickformat=".1%")
    fig.update_xaxes(type="category")  # months and bands are labels, not a time axis
    if not traces or not any(len(t.x or t.z or []) for t in traces):
        fig.add_annotation(text="no data yet", showarrow=False, font={"size": 16})
    return fig


def _ratio(part: Any, whole: Any) -> float | None:
    return part / whole if whole else None


def _col(result: QueryResult, name: str) -> list[Any]:
    return [row[name] for row in result.rows]


def build_figures(results: dict[str, QueryResult]) -> list[go.Figure]:
    churn, mrr = results["logo_churn"], results["mrr_churn"]
    risk, alerts = results["at_risk"], results["alerts_by_reason"]
    cohorts = results["cohort_retention"]
    months = [str(m)[:7] for m in _col(churn, "month")]
    figures = [
        _figure("Logo churn rate by month, and its split by kind", [
            go.Scatter(name=label, x=months, y=[_ratio(row[col], row["customers_at_start"])
                                                for row in churn.rows], mode="lines+markers")
            for col, label in (("churned", "all"), ("churned_voluntary", "voluntary"),
                               ("churned_involuntary", "involuntary"))
        ], percent=True),
        _figure("MRR churn and net revenue retention", [
            go.Scatter(name=label, x=[str(m)[:7] for m in _col(mrr, "month")], y=_col(mrr, col),
                       mode="lines+markers")
            for col, label in (("gross_mrr_churn", "gross MRR churn"),
                               ("net_mrr_churn", "net MRR churn"),
                               ("net_revenue_retention", "NRR"))
        ], percent=True),
        _figure("Accounts and MRR by risk band", [
            go.Bar(name="accounts", x=_col(risk, "band"), y=_col(risk, "accounts"),
                   marker_color=[BAND_COLORS.get(b, "#999") for b in _col(risk, "band")]),
            go.Scatter(name="MRR ($)", x=_col(risk, "band"),
                       y=[c / 100 for c in _col(risk, "mrr_cents")], yaxis="y2",
                       mode="markers", marker={"size": 14, "symbol": "diamond"}),
        ], yaxis2={"overlaying": "y", "side": "right", "title": "MRR ($)", "rangemode": "tozero"}),
        _figure("Alerts by reason and outcome", [
            go.Bar(name=outcome.replace("_", " "), x=_col(alerts, "top_reason"),
                   y=_col(alerts, outcome))
            for outcome in ("churned", "recovered", "still_at_risk")
        ], barmode="stack"),
    ]
    cohort_names = sorted({str(c)[:7] for c in _col(cohorts, "cohort")})
    ks = sorted({int(k) for k in _col(cohorts, "months_since")})
    grid = {(str(r["cohort"])[:7], int(r["months_since"])): r["retention"] for r in cohorts.rows}
    figures.append(_figure("Cohort retention (first paid month)", [go.Heatmap(
        x=ks, y=cohort_names, z=[[grid.get((c, k)) for k in ks] for c in cohort_names],
        colorscale="Blues", zmin=0, zmax=1)] if cohort_names else [],
        xaxis={"title": "months since"}, yaxis={"type": "category"}))
    return figures


def render(client: Any, source: str, title: str = "churnsignal: churn and risk") -> str:
    """The page as a string, from any clickhouse-connect client (or ClickHouseSink)."""
    names = ("logo_churn", "mrr_churn", "at_risk", "alerts_by_reason", "cohort_retention",
             "at_risk_accounts")
    results = {name: run_query(client, name) for name in names}
    config = {"displaylogo": False, "responsive": True}
    charts = [fig.to_html(full_html=False, include_plotlyjs=False, config=config)
              for fig in build_figures(results)]
    return _PAGE.render(
        title=title, generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), source=source,
        # plotly.js itself, and figures whose data plotly serialises with <, > and / escaped.
        plotly_js=Markup(get_plotlyjs()),  # noqa: S704
        charts=[Markup(c) for c in charts],  # noqa: S704
        accounts=results["at_risk_accounts"], table_title="Top accounts at risk")


def write_report(client: Any, out: Path, source: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(client, source), encoding="utf-8")
    return out


def render_backtest(report: Any, title: str = "churnsignal backtest") -> str:
    """The backtest's figures and its ROC and precision-recall curves, as one offline page."""
    curves = report.curves
    figures = [
        _figure(f"ROC (AUC {report.roc_auc:.3f})" if report.roc_auc is not None else "ROC", [
            go.Scatter(name="score", x=curves.get("fpr", []), y=curves.get("tpr", []),
                       mode="lines"),
            go.Scatter(name="chance", x=[0, 1], y=[0, 1], mode="lines",
                       line={"dash": "dot", "color": "#999"})],
            xaxis={"title": "false positive rate"}, yaxis={"title": "true positive rate"}),
        _figure(f"Precision-recall (AP {report.pr_auc:.3f})" if report.pr_auc is not None
                else "Precision-recall", [
            go.Scatter(name="score", x=curves.get("recall", []), y=curves.get("precision", []),
                       mode="lines")],
            xaxis={"title": "recall"}, yaxis={"title": "precision"}),
    ]
    config = {"displaylogo": False, "responsive": True}
    charts = [fig.to_html(full_html=False, include_plotlyjs=False, config=config)
              for fig in figures]
    rows = [{"figure": k, "value": v} for k, v in report.as_dict().items()
            if not isinstance(v, list | dict)]
    rows += [{"figure": f"{b.band}+ precision / recall / flagged",
              "value": f"{_pct(b.precision)} / {_pct(b.recall)} / {b.flagged}"}
             for b in report.bands]
    rows += [{"figure": f"churn caught by {reason}", "value": _pct(share)}
             for reason, share in report.churn_caught_by_reason.items()]
    table = QueryResult("figures", "Figures", ["figure", "value"], rows)
    return _PAGE.render(
        title=title, generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        source=f"a replay with a {report.horizon_days}-day churn horizon",
        plotly_js=Markup(get_plotlyjs()),  # noqa: S704 - plotly.js itself
        charts=[Markup(c) for c in charts],  # noqa: S704 - plotly escapes its data
        accounts=table, table_title="Figures")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
