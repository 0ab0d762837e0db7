"""`churnsignal report`: one self-contained HTML page of the churn views, readable offline.

The charts are Plotly figures; plotly.js is embedded once in the page (no CDN), so the file
can be mailed or archived. Figures come from the saved queries, so the page shows exactly
what `churnsignal query NAME` prints, in a customer-success lead's terms: whole scores,
money in currency units, reasons and plays in words, times to the minute.

Building the page is pure (`build_page`: query results in, HTML out); only `render` talks to
ClickHouse. Every section draws from whatever subset of data exists (usage only, billing only,
support only, nothing yet) and says plainly what is missing instead of drawing an empty chart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import dropwhile
from pathlib import Path
from typing import Any, TypeGuard

import jinja2
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from churnsignal.sinks.queries import QueryResult, run_query
from churnsignal.stream.reasons import REASONS

NONE = "—"  # what a cell shows when there is no value
BANDS = ("critical", "high", "medium", "low")
BAND_COLORS = {"critical": "#b2182b", "high": "#ef8a62", "medium": "#f4c27a", "low": "#67a9cf"}
OUTCOME_COLORS = {"churned": "#b2182b", "recovered": "#4daf4a", "still_at_risk": "#f4a261"}

# Reason codes (stream/scoring.py REASONS, the policy's signal names) in words.
REASON_TEXT: dict[str, str] = {
    "low_engagement": "Low engagement",
    "usage_decline": "Usage declining",
    "key_event_decline": "Key feature use declining",
    "inactivity": "No recent activity",
    "seat_underuse": "Seats going unused",
    "low_feature_breadth": "Uses few features",
    "onboarding_stalled": "Onboarding stalled",
    "payment_failed": "Payment failed, retrying",
    "payment_failed_final": "Payment failed, retries exhausted",
    "card_expiring": "Card expires before renewal",
    "contraction": "MRR down from its peak",
    "cancellation_scheduled": "Cancellation scheduled",
    "paused": "Subscription paused",
    "support_burden": "Heavy support load",
    "negative_feedback": "Negative feedback (CSAT or NPS)",
    "canceled": "Subscription cancelled",
}
# The play each reason calls for (the second item of REASONS), in words.
PLAY_TEXT: dict[str, str] = {
    "csm_check_in": "CSM check-in",
    "plan_review": "Review plan and seats",
    "training": "Offer training",
    "onboarding_nudge": "Nudge onboarding",
    "dunning_retry": "Remind to pay; retries pending",
    "card_update": "Ask for a card update",
    "pricing_review": "Review pricing",
    "offer_pause_or_plan_change": "Offer a pause or plan change",
    "resume_check_in": "Check in before the pause ends",
    "support_escalation": "Escalate open tickets",
    "win_back_offer": "Win-back offer",
}
STATUS_TEXT: dict[str, str] = {
    "trialing": "Trial", "active": "Active", "past_due": "Past due", "unpaid": "Unpaid",
    "paused": "Paused", "canceled": "Cancelled", "incomplete": "Incomplete",
    "incomplete_expired": "Incomplete (expired)",
}
# Currencies whose minor unit is the unit itself (Stripe's zero-decimal list), and symbols
# worth printing; any other currency is written after the amount as its ISO code.
ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf",
                          "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})
SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"}


# ---- formatting: pure, one value at a time --------------------------------------------------

def _humanize(code: str) -> str:
    return code.replace("_", " ").strip().capitalize() or NONE


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def whole(value: float | None) -> str:
    """A score as a whole number, halves rounded up (62.5 -> 63)."""
    return str(math.floor(value + 0.5)) if _finite(value) else NONE


def count(value: int | None) -> str:
    return f"{value:,}" if isinstance(value, int) else NONE


def money(cents: float | None, currency: str | None = None) -> str:
    """Minor units (cents) as an amount in currency units: 123450 -> "$1,234.50"."""
    if not _finite(cents):
        return NONE
    code = (currency or "").lower()
    digits = 0 if code in ZERO_DECIMAL else 2
    amount = abs(cents) / 10 ** digits
    sign = "-" if cents < 0 else ""
    if code in SYMBOLS:
        return f"{sign}{SYMBOLS[code]}{amount:,.{digits}f}"
    suffix = f" {code.upper()}" if code else ""
    return f"{sign}{amount:,.{digits}f}{suffix}"


def percent(ratio: float | None, digits: int = 1) -> str:
    return f"{ratio:.{digits}%}" if _finite(ratio) else NONE


def minute(value: object) -> str:
    """A time to the minute, in UTC (naive values are UTC already): "2026-11-20 14:05"."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, date):
        return value.isoformat()
    return NONE if value in (None, "") else str(value)


def month_label(value: object, current: date | None = None) -> str:
    """"Oct 2026"; the month in progress says so, its figures are not final."""
    if not isinstance(value, date):
        return str(value)
    label = value.strftime("%b %Y")
    if current is not None and (value.year, value.month) == (current.year, current.month):
        label += " (to date)"
    return label


def reason_text(code: str) -> str:
    return REASON_TEXT.get(code) or _humanize(code)


def play_of(code: str) -> str | None:
    """The play the policy pairs with a reason code (None for a code it does not know)."""
    known = REASONS.get(code)
    return known[1] if known else None


def play_text(play: str) -> str:
    return PLAY_TEXT.get(play) or _humanize(play)


def reasons_with_plays(codes: Iterable[str]) -> list[tuple[str, str]]:
    """Each reason in words with its play in words, strongest reason first."""
    out = []
    for code in codes:
        play = play_of(code)
        out.append((reason_text(code), play_text(play) if play else ""))
    return out


def status_text(status: str | None) -> str:
    return STATUS_TEXT.get(status or "") or (_humanize(status) if status else NONE)


# ---- axes that fit their data ----------------------------------------------------------------

def percent_axis(values: Iterable[float | None]) -> dict[str, Any]:
    """A ratio axis from 0 (lower only for a negative value) to just above the largest value.

    Plotly's autorange puts an all-zero or empty series on a -100 % .. 100 % axis; a churn
    rate is never below 0 and a 5 % rate should not sit at the bottom of a 100 % axis.
    """
    seen = [v for v in values if _finite(v)]
    top, bottom = max(seen, default=0.0), min(seen, default=0.0)
    high = max(top * 1.15, 0.01)  # all zero: a flat line at the bottom of a 0-1 % axis
    low = bottom * 1.15 if bottom < 0 else 0.0
    return {"range": [low, high], "tickformat": ".1%" if high - low <= 0.05 else ".0%",
            "zeroline": True, "zerolinecolor": "#999"}


def count_axis(top: float) -> dict[str, Any]:
    """Whole counts from 0; small counts tick at every unit (not 0.2, 0.4 ...)."""
    axis: dict[str, Any] = {"rangemode": "tozero", "tickformat": ",d"}
    if top <= 6:
        axis.update(dtick=1, range=[0, max(top, 1) * 1.1])
    return axis


def money_axis(currency: str | None) -> dict[str, Any]:
    code = (currency or "").lower()
    axis: dict[str, Any] = {"rangemode": "tozero", "tickformat": ",.0f"}
    if code in SYMBOLS:
        axis["tickprefix"] = SYMBOLS[code]
    elif code:
        axis["ticksuffix"] = f" {code.upper()}"
    return axis


# ---- sections: one chart each, or a plain sentence when there is nothing to draw -------------

@dataclass(frozen=True)
class Section:
    key: str  # stable: tests and the page's data-section attribute use it
    title: str
    note: str  # how to read the figure
    figure: go.Figure | None = None
    empty: str = ""  # said instead of the chart when there is nothing to draw


@dataclass(frozen=True)
class Tile:
    label: str
    value: str
    detail: str = ""


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    note: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)  # str or Markup cells
    empty: str = ""
    numeric: frozenset[int] = frozenset()  # right-aligned column indexes


NO_BILLING = ("No subscription events yet. Churn and revenue are measured from billing events "
              "(e.g. Stripe subscriptions); this chart fills in once they arrive.")


def _figure(traces: list[Any], **layout: Any) -> go.Figure:
    fig = go.Figure(traces)
    fig.update_layout({"template": "plotly_white", "height": 340, "hovermode": "closest",
                       "font": {"family": "system-ui, sans-serif", "size": 12},
                       "margin": {"l": 60, "r": 60, "t": 30, "b": 40},
                       "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
                       **layout})
    return fig


def _months(rows: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    # Months before any customer (or any MRR) have no rate: leave them out, not a gap.
    return list(dropwhile(lambda r: not r.get(base), rows))


def logo_churn_section(result: QueryResult, today: date | None = None) -> Section:
    title = "Logo churn by month"
    note = ("Customers lost in the month as a share of the customers at its start; "
            "involuntary churn is a subscription ended by failed payments.")
    rows = _months(result.rows, "customers_at_start")
    if not rows:
        empty = NO_BILLING if not result.rows else (
            "No month has begun with paying customers yet: the first rate appears at the start "
            "of the month after the first payment.")
        return Section("logo_churn", title, note, empty=empty)
    months = [month_label(r["month"], today) for r in rows]
    traces = []
    for column, name, width in (("churned", "All", 3), ("churned_voluntary", "Voluntary", 1.5),
                                ("churned_involuntary", "Involuntary", 1.5)):
        # a later month can start with no customer again (all churned): a gap, not a 0
        rates = [r[column] / r["customers_at_start"] if r["customers_at_start"] else None
                 for r in rows]
        traces.append(go.Scatter(
            name=name, x=months, y=rates, mode="lines+markers", line={"width": width},
            customdata=[[count(r[column]), count(r["customers_at_start"])] for r in rows],
            hovertemplate="%{x}: %{y:.1%} (%{customdata[0]} of %{customdata[1]} customers)"
                          "<extra>%{fullData.name}</extra>"))
    axis = percent_axis(v for t in traces for v in t.y)
    return Section("logo_churn", title, note,
                   _figure(traces, yaxis={**axis, "title": "churn rate"},
                           xaxis={"type": "category"}))


def mrr_churn_section(result: QueryResult, today: date | None = None,
                      currency: str | None = None) -> Section:
    title = "MRR churn and net revenue retention"
    note = ("Of the MRR paying at the month's start: gross churn is what cancellations and "
            "downgrades took; net churn also counts expansion. Net revenue retention (right "
            "axis) is what remained, expansion included.")
    rows = _months(result.rows, "mrr_start_cents")
    if not rows:
        empty = NO_BILLING if not result.rows else (
            "No month has begun with paying customers yet: MRR churn appears at the start of "
            "the month after the first payment.")
        return Section("mrr_churn", title, note, empty=empty)
    # MRR is never summed across currencies: one set of lines per currency.
    by_currency: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_currency.setdefault(str(r.get("currency") or currency or ""), []).append(r)
    several = len(by_currency) > 1
    traces: list[Any] = []
    for code, group in by_currency.items():
        cur = code or currency
        tag = f" ({code.upper()})" if several and code else ""
        months = [month_label(r["month"], today) for r in group]
        start = [money(r["mrr_start_cents"], cur) for r in group]
        lost = [money(r["churned_mrr_cents"] + r["contraction_mrr_cents"], cur) for r in group]
        traces.append(go.Scatter(
            name="Gross MRR churn" + tag, x=months, y=[r["gross_mrr_churn"] for r in group],
            mode="lines+markers", line={"color": "#b2182b", "width": 3},
            customdata=list(zip(lost, start, strict=True)),
            hovertemplate="%{x}: %{y:.1%} (%{customdata[0]} of %{customdata[1]})"
                          "<extra>gross MRR churn" + tag + "</extra>"))
        traces.append(go.Scatter(
            name="Net MRR churn" + tag, x=months, y=[r["net_mrr_churn"] for r in group],
            mode="lines+markers", line={"color": "#ef8a62", "width": 1.5},
            hovertemplate="%{x}: %{y:.1%}<extra>net MRR churn" + tag + "</extra>"))
        traces.append(go.Scatter(
            name="Net revenue retention (right)" + tag, x=months, yaxis="y2",
            y=[r["net_revenue_retention"] for r in group], mode="lines+markers",
            line={"color": "#2166ac", "width": 2, "dash": "dot"},
            hovertemplate="%{x}: %{y:.1%}<extra>net revenue retention" + tag + "</extra>"))
    churn_values = [v for t in traces if t.yaxis != "y2" for v in t.y]
    nrr_values = [v for t in traces if t.yaxis == "y2" for v in t.y]
    churn_axis = percent_axis(churn_values)
    nrr_axis = percent_axis(nrr_values)
    return Section("mrr_churn", title, note, _figure(
        traces, xaxis={"type": "category"},
        yaxis={**churn_axis, "title": "MRR churn"},
        yaxis2={**nrr_axis, "title": "net revenue retention", "overlaying": "y",
                "side": "right", "showgrid": False, "tickmode": "auto"}))


def risk_section(result: QueryResult, currency: str | None = None) -> Section:
    note = ("Current accounts (cancelled ones left out) by their latest risk score: low 0-24, "
            "medium 25-49, high 50-74, critical 75-100 with the default policy.")
    by_band = {r["band"]: r for r in result.rows}
    accounts = [int(by_band.get(b, {}).get("accounts", 0)) for b in BANDS]
    mrr = [by_band.get(b, {}).get("mrr_cents", 0) or 0 for b in BANDS]
    # usage- or support-only deployments know no MRR: no empty money bars or axis
    title = "Accounts and MRR by risk band" if any(mrr) else "Accounts by risk band"
    if not sum(accounts):
        return Section("risk", title, note, empty=(
            "No account has been scored yet. Each account gets a 0-100 risk score as its "
            "usage, billing or support events arrive."))
    labels = [b.capitalize() for b in BANDS]
    traces: list[Any] = [go.Bar(
        name="Accounts", x=labels, y=accounts, text=[count(a) for a in accounts],
        textposition="outside", cliponaxis=False, offsetgroup="accounts",
        marker_color=[BAND_COLORS[b] for b in BANDS],
        hovertemplate="%{x}: %{y:,} accounts<extra></extra>")]
    layout: dict[str, Any] = {"xaxis": {"type": "category"}, "showlegend": any(mrr),
                              "yaxis": {**count_axis(max(accounts)), "title": "accounts"}}
    if any(mrr):
        # Side by side, each on its own axis (offsetgroup keeps them from overlapping).
        traces.append(go.Bar(
            name="MRR (right axis)", x=labels, y=[c / _minor(currency) for c in mrr],
            yaxis="y2", offsetgroup="mrr", marker_color="#8c8c8c",
            customdata=[money(c, currency) for c in mrr],
            hovertemplate="%{x}: %{customdata} MRR<extra></extra>"))
        layout["yaxis2"] = {**money_axis(currency), "title": "MRR", "overlaying": "y",
                            "side": "right", "showgrid": False, "tickmode": "auto"}
    return Section("risk", title, note, _figure(traces, **layout))


def _minor(currency: str | None) -> int:
    return 1 if (currency or "").lower() in ZERO_DECIMAL else 100


def alerts_section(result: QueryResult) -> Section:
    title = "Alerts by top reason, and what became of the account"
    note = ("Each escalation alert under its strongest reason: the account churned since, "
            "recovered (back to low or medium risk), or is still at risk. Hover for the play.")
    rows = [r for r in result.rows if r["alerts"]]
    if not rows:
        return Section("alerts", title, note, empty=(
            "No escalation alert yet. An alert is raised when an account's risk escalates to "
            "the policy's alerting band (high by default)."))
    reasons = [reason_text(r["top_reason"]) if r["top_reason"] else "No reason recorded"
               for r in rows]
    plays = [play_text(p) if (p := play_of(r["top_reason"])) else NONE for r in rows]
    traces = [go.Bar(
        name=outcome.replace("_", " ").capitalize(), y=reasons, x=[r[outcome] for r in rows],
        orientation="h", marker_color=OUTCOME_COLORS[outcome], customdata=plays,
        hovertemplate="%{y}: %{x:,} " + outcome.replace("_", " ")
                      + "<br>play: %{customdata}<extra></extra>")
        for outcome in ("churned", "recovered", "still_at_risk")]
    height = max(240, 120 + 36 * len(rows))
    return Section("alerts", title, note, _figure(
        traces, barmode="stack", height=height,
        margin={"l": 230, "r": 30, "t": 20, "b": 40},
        xaxis={**count_axis(max(r["alerts"] for r in rows)), "title": "alerts"},
        yaxis={"type": "category", "autorange": "reversed", "automargin": True}))


def cohort_section(result: QueryResult) -> Section:
    title = "Retention by first paid month"
    note = ("Each row is the customers who first paid in that month; each cell the share still "
            "a customer that many months later.")
    if not result.rows:
        return Section("cohorts", title, note, empty=(
            "No paying customers yet: cohorts group customers by the month of their first "
            "payment."))
    cohorts = sorted({r["cohort"] for r in result.rows})
    ks = sorted({int(r["months_since"]) for r in result.rows})
    cells = {(r["cohort"], int(r["months_since"])): r for r in result.rows}
    z = [[cells[c, k]["retention"] if (c, k) in cells else None for k in ks] for c in cohorts]
    text = [[percent(cells[c, k]["retention"], 0) if (c, k) in cells else "" for k in ks]
            for c in cohorts]
    custom = [[f"{count(cells[c, k]['retained'])} of {count(cells[c, k]['customers'])}"
               if (c, k) in cells else "" for k in ks] for c in cohorts]
    heat = go.Heatmap(
        x=[str(k) for k in ks], y=[month_label(c) for c in cohorts], z=z, text=text,
        texttemplate="%{text}", customdata=custom, colorscale="Blues", zmin=0, zmax=1,
        colorbar={"tickformat": ".0%", "thickness": 12},
        hovertemplate="%{y} cohort, month %{x}: %{z:.0%} retained (%{customdata})"
                      "<extra></extra>")
    return Section("cohorts", title, note, _figure(
        [heat], height=max(240, 140 + 32 * len(cohorts)),
        xaxis={"type": "category", "title": "months since first payment"},
        yaxis={"type": "category", "autorange": "reversed"}))


# ---- summary tiles and the at-risk accounts table --------------------------------------------

def _latest(rows: list[dict[str, Any]], column: str, today: date | None) -> dict[str, Any] | None:
    """The last complete month with a figure (the month in progress only if none is)."""
    known = [r for r in rows if _finite(r.get(column))]
    done = [r for r in known if today is None or not isinstance(r["month"], date)
            or (r["month"].year, r["month"].month) < (today.year, today.month)]
    pool = done or known
    return pool[-1] if pool else None


def tiles(results: Mapping[str, QueryResult], today: date | None = None,
          currency: str | None = None) -> list[Tile]:
    by_band = {r["band"]: r for r in results["at_risk"].rows}
    scored = sum(int(r["accounts"]) for r in by_band.values())
    risky = [by_band[b] for b in ("critical", "high") if b in by_band]
    risky_mrr = sum(r["mrr_cents"] or 0 for r in risky)
    out = [
        Tile("Accounts scored", count(scored), "current accounts, cancelled ones left out"
             if scored else "none yet"),
        Tile("At high or critical risk", count(sum(int(r["accounts"]) for r in risky)),
             f"{money(risky_mrr, currency)} MRR" if risky_mrr else
             ("no MRR known" if risky else "")),
    ]
    churn = _latest(results["logo_churn"].rows, "logo_churn_rate", today)
    out.append(Tile("Logo churn", percent(churn["logo_churn_rate"]),
                    f"{month_label(churn['month'], today)}: {count(churn['churned'])} of "
                    f"{count(churn['customers_at_start'])} customers") if churn
               else Tile("Logo churn", NONE, "no paying customers yet"))
    nrr = _latest(results["mrr_churn"].rows, "net_revenue_retention", today)
    out.append(Tile("Net revenue retention", percent(nrr["net_revenue_retention"]),
                    month_label(nrr["month"], today)) if nrr
               else Tile("Net revenue retention", NONE, "no MRR yet"))
    return out


def accounts_table(result: QueryResult, currency: str | None = None) -> Table:
    columns = ["Account", "Risk", "Score", "MRR", "Subscription", "Why, and the play to run",
               "Score since (UTC)"]
    rows = []
    for r in result.rows:
        band = str(r.get("band") or "")
        status = r.get("sub_status") or ""
        mrr = r.get("mrr_cents")
        pairs = reasons_with_plays(r.get("reasons") or ())
        why = Markup("<ul class='why'>{}</ul>").format(Markup("").join(
            Markup("<li>{} <span class='play'>→ {}</span></li>").format(reason, play) if play
            else Markup("<li>{}</li>").format(reason) for reason, play in pairs)) if pairs \
            else NONE
        rows.append([
            str(r.get("account_id", "")),
            Markup("<span class='band band-{}'>{}</span>").format(band, band.capitalize()),
            whole(r.get("score")),
            # no subscription seen: MRR unknown, not zero
            money(mrr, currency) if status or mrr else NONE,
            status_text(status), why, minute(r.get("last_scored_at"))])
    return Table("accounts", "Accounts at high or critical risk",
                 "The 50 largest by MRR, then score. Scores run from 0 (no sign of churn) to "
                 "100; each reason comes with the play a customer-success team should run.",
                 columns, rows, empty="No account is at high or critical risk.",
                 numeric=frozenset({2, 3}))


# ---- the page --------------------------------------------------------------------------------

_PAGE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{ title }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px;
        padding: 0 1.5rem; color: #222; }
 h1 { margin-bottom: .2rem; }
 h2 { font-size: 1.1rem; margin: .2rem 0 .6rem; }
 .meta, .note { color: #666; font-size: .85rem; }
 .notice { background: #eef4fb; border-left: 4px solid #2166ac; padding: .7rem 1rem; }
 .tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr));
          gap: 1rem; margin: 1.2rem 0; }
 .tile { border: 1px solid #ddd; border-radius: 6px; padding: .7rem 1rem; }
 .tile .label { color: #555; font-size: .85rem; }
 .tile .value { font-size: 1.8rem; font-weight: 600; margin: .15rem 0; }
 .tile .detail { color: #777; font-size: .8rem; }
 /* auto-fill, not auto-fit: a chart drawn before the next card exists must not take the
    whole row (Plotly sizes itself once, when its inline script runs). */
 .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1rem; }
 .card { border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem; min-width: 0; }
 .empty { background: #f6f6f6; border-radius: 4px; padding: 2rem 1.2rem; color: #555; }
 table { border-collapse: collapse; font-size: .9rem; width: 100%; }
 th, td { border-bottom: 1px solid #eee; padding: .4rem .6rem; text-align: left;
          vertical-align: top; }
 th { background: #fafafa; }
 td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
 td:last-child { white-space: nowrap; }
 ul.why { margin: 0; padding-left: 1rem; }
 .play { color: #2166ac; }
 .band { border-radius: 3px; padding: .05rem .4rem; font-size: .8rem; color: #fff; }
 .band-critical { background: #b2182b; } .band-high { background: #d6604d; }
 .band-medium { background: #f4c27a; color: #222; } .band-low { background: #67a9cf; }
</style>
{% if plotly_js %}<script>{{ plotly_js }}</script>{% endif %}</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">Generated {{ generated }} UTC from {{ source }}.{% if money_note %}
 {{ money_note }}{% endif %}</p>
{% if notice %}<p class="notice">{{ notice }}</p>{% endif %}
{% if tiles %}<div class="tiles">{% for t in tiles %}<div class="tile">
<div class="label">{{ t.label }}</div><div class="value">{{ t.value }}</div>
<div class="detail">{{ t.detail }}</div></div>{% endfor %}</div>{% endif %}
<div class="grid">
{% for s in sections %}<section class="card" data-section="{{ s.key }}"><h2>{{ s.title }}</h2>
{% if s.html %}{{ s.html }}{% else %}<p class="empty">{{ s.empty }}</p>{% endif %}
<p class="note">{{ s.note }}</p></section>
{% endfor %}</div>
{% for t in tables %}<section data-section="{{ t.key }}"><h2>{{ t.title }}</h2>
<p class="note">{{ t.note }}</p>
{% if t.rows %}<table><tr>{% for c in t.columns %}<th{% if loop.index0 in t.numeric %}
 class="num"{% endif %}>{{ c }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for cell in row %}<td{% if loop.index0 in t.numeric %}
 class="num"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>{% else %}<p class="empty">{{ t.empty }}</p>{% endif %}</section>
{% endfor %}
</body></html>
""", autoescape=True)

CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": False}


def _page(title: str, generated: datetime, source: str, sections: Sequence[Section],
          tables: Sequence[Table], page_tiles: Sequence[Tile] = (), money_note: str = "",
          notice: str = "") -> str:
    cards = [{"key": s.key, "title": s.title, "note": s.note, "empty": s.empty, "html": (
        # plotly escapes <, > and / in the figure JSON it writes into the script
        Markup(s.figure.to_html(  # noqa: S704
            full_html=False, include_plotlyjs=False, config=CONFIG, div_id=f"chart-{s.key}"))
        if s.figure is not None else None)} for s in sections]
    drawn = any(s.figure is not None for s in sections)
    return _PAGE.render(
        title=title, generated=minute(generated), source=source, tiles=page_tiles,
        sections=cards, tables=tables, money_note=money_note, notice=notice,
        plotly_js=Markup(get_plotlyjs()) if drawn else None)  # noqa: S704 - plotly.js itself


QUERY_NAMES = ("logo_churn", "mrr_churn", "at_risk", "alerts_by_reason", "cohort_retention",
               "at_risk_accounts")


def build_sections(results: Mapping[str, QueryResult], today: date | None = None,
                   currency: str | None = None) -> list[Section]:
    return [
        logo_churn_section(results["logo_churn"], today),
        mrr_churn_section(results["mrr_churn"], today, currency),
        risk_section(results["at_risk"], currency),
        alerts_section(results["alerts_by_reason"]),
        cohort_section(results["cohort_retention"]),
    ]


def build_page(results: Mapping[str, QueryResult], *, source: str, generated: datetime,
               currency: str | None = None, title: str = "churnsignal: churn and risk") -> str:
    """The report page from the saved queries' results (pure: no I/O, no clock)."""
    today = generated.date()
    money_note = "" if currency else (
        "Amounts are monthly recurring revenue in your billing currency.")
    notice = "" if any(r.rows for r in results.values()) else (
        "No events have reached ClickHouse yet. Each section fills in as the worker scores "
        "usage, billing and support events.")
    return _page(title, generated, source, build_sections(results, today, currency),
                 [accounts_table(results["at_risk_accounts"], currency)],
                 tiles(results, today, currency), money_note, notice)


def render(client: Any, source: str, title: str = "churnsignal: churn and risk", *,
           currency: str | None = None) -> str:
    """The page as a string, from any clickhouse-connect client (or ClickHouseSink).

    ``currency`` (an ISO code such as "usd") prints amounts with their symbol; the tables do
    not record it, so without it amounts are plain numbers in the billing currency.
    """
    results = {name: run_query(client, name) for name in QUERY_NAMES}
    return build_page(results, source=source, generated=datetime.now(UTC), currency=currency,
                      title=title)


def write_report(client: Any, out: Path, source: str, *, currency: str | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(client, source, currency=currency), encoding="utf-8")
    return out


# ---- the backtest page -----------------------------------------------------------------------

def render_backtest(report: Any, title: str = "churnsignal backtest",
                    generated: datetime | None = None) -> str:
    """The backtest's figures and its ROC and precision-recall curves, as one offline page."""
    curves = report.curves
    no_curve = ("Not enough outcomes to draw this curve: it needs accounts that churned and "
                "accounts that did not.")
    sections = [Section(
        "roc", f"ROC (AUC {report.roc_auc:.3f})" if report.roc_auc is not None else "ROC",
        "True against false positive rate at each score threshold; the dotted line is chance.",
        _figure([
            go.Scatter(name="score", x=curves["fpr"], y=curves["tpr"], mode="lines"),
            go.Scatter(name="chance", x=[0, 1], y=[0, 1], mode="lines",
                       line={"dash": "dot", "color": "#999"})],
            xaxis={"title": "false positive rate", "range": [0, 1]},
            yaxis={"title": "true positive rate", "range": [0, 1.02]})
        if curves.get("fpr") else None, no_curve), Section(
        "pr", f"Precision-recall (AP {report.pr_auc:.3f})" if report.pr_auc is not None
        else "Precision-recall",
        "Share of flagged accounts that churned, against the share of churners flagged.",
        _figure([go.Scatter(name="score", x=curves["recall"], y=curves["precision"],
                            mode="lines")],
                xaxis={"title": "recall", "range": [0, 1]},
                yaxis={"title": "precision", "range": [0, 1.02]})
        if curves.get("recall") else None, no_curve)]
    rows: list[list[Any]] = [[k, str(v)] for k, v in report.as_dict().items()
                             if not isinstance(v, list | dict) and k != "score_figures"]
    rows += [[f"{b.band}+ precision / recall / flagged",
              f"{_pct(b.precision)} / {_pct(b.recall)} / {b.flagged}"] for b in report.bands]
    rows += [[f"churn caught by {reason_text(reason).lower()}", _pct(share)]
             for reason, share in report.churn_caught_by_reason.items()]
    table = Table("figures", "Figures", "", ["figure", "value"], rows, empty="No figures.")
    comparison = getattr(report, "comparison", None) or {}
    return _page(title, generated or datetime.now(UTC),
                 f"a replay with a {report.horizon_days}-day churn horizon", sections,
                 [table, *_baseline_tables(report)], notice=comparison.get("verdict", ""))


def _baseline_tables(report: Any) -> list[Table]:
    """The score beside each baseline on the same checkpoints, and their decile tables."""
    from churnsignal.offline.evaluation import BASELINES

    score = getattr(report, "score_figures", None)
    if score is None:  # a report from before the baselines
        return []
    systems = {"score": score, **report.baselines}
    names = [{"score": "score", **BASELINES}.get(k, k) for k in systems]
    c = report.comparison

    def cell(value: float | None, ci: tuple[float, float] | None, fmt: str) -> str:
        if value is None:
            return "n/a"
        return fmt.format(value) + ("" if ci is None else f" ({fmt}–{fmt})".format(*ci))

    rows = [["ROC AUC", *(cell(f.roc_auc, f.roc_auc_ci, "{:.3f}") for f in systems.values())],
            ["PR AUC", *(cell(f.pr_auc, f.pr_auc_ci, "{:.3f}") for f in systems.values())],
            ["lift in the top decile", *(cell(f.top_decile_lift, f.top_decile_lift_ci, "{:.2f}")
                                         for f in systems.values())]]
    sampled = (f", using 1 in {c['stride']} checkpoints of each account" if c["stride"] > 1
               else "")
    numeric = frozenset(range(1, len(systems) + 1))
    baselines = Table(
        "baselines", "Score against baselines",
        f"The same {c['checkpoints']:,} checkpoints ranked by each: usage events and active days "
        "in the last 30 days (fewer is riskier) and the shipped default policy. In brackets: "
        f"{c['level']:.0%} bootstrap intervals from {c['resamples']} resamples of the "
        f"{c['accounts']:,} accounts{sampled}. Lift: churn rate among the riskiest 10% over the "
        "base rate.", ["figure", *names], rows, empty="No figures.", numeric=numeric)
    decile_rows = [[str(d.decile), f"{d.checkpoints:,.0f}",
                    *(f"{_pct(f.deciles[i].churn_rate)} / {_pct(f.deciles[i].cumulative_recall)}"
                      for f in systems.values())] for i, d in enumerate(score.deciles)]
    deciles = Table(
        "deciles", "Churn rate / cumulative recall by decile of risk",
        "Decile 1 is the riskiest tenth of checkpoints by each ranking. Tied scores across a "
        "decile boundary are shared pro rata.", ["decile", "checkpoints", *names], decile_rows,
        empty="No checkpoints were evaluated.",
        numeric=frozenset(range(1, len(systems) + 2)))
    return [baselines, deciles]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
