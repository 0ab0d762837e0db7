"""The `churnsignal` command line: worker, demo, bench, migrate, query, report, config, schemas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from churnsignal.app import gc_tuning
from churnsignal.app.embedded import broker_for
from churnsignal.app.logs import configure_logging
from churnsignal.app.settings import Settings, load_settings
from churnsignal.errors import ChurnsignalError

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Churn-risk signals from usage, billing and support event streams.")
config_cli = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
schemas_cli = typer.Typer(no_args_is_help=True, help="Event contract for producers.")
cli.add_typer(config_cli, name="config")
cli.add_typer(schemas_cli, name="schemas")
log = logging.getLogger("churnsignal")

if TYPE_CHECKING:
    from churnsignal.offline.backtest import Report

def _fail(exc: BaseException) -> None:
    typer.secho(f"churnsignal: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def run_worker(settings: Settings) -> None:
    """Run the Faust worker until SIGTERM/SIGINT; flushes and commits on the way out."""
    import faust

    from churnsignal.app.kafka_client import ensure_topics
    from churnsignal.stream.agents import create_app

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(ensure_topics(settings))
    finally:
        loop.close()
    asyncio.set_event_loop(asyncio.new_event_loop())
    runtime = create_app(settings)
    level = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}
    worker = faust.Worker(runtime.app, loglevel=level[settings.log_level], quiet=True,
                          redirect_stdouts=False, override_logging=False)
    gc_tuning.for_long_lived_state()
    with contextlib.suppress(SystemExit):
        worker.execute_from_commandline()
    runtime.sink.close()


@cli.command()
def worker() -> None:
    """Run the stream processor against KAFKA_BOOTSTRAP_SERVERS (or an embedded broker)."""
    from churnsignal.app.embedded import follow_parent

    follow_parent()
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        log.info("starting worker", extra={"config": settings.masked()})
        with broker_for(settings) as effective:
            run_worker(effective)
    except ChurnsignalError as exc:
        _fail(exc)


@cli.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of live traffic after the history.")]
    = 60.0,
    accounts: Annotated[int, typer.Option(help="Synthetic accounts.")] = 400,
    rate: Annotated[float, typer.Option(help="Live events per second.")] = 200.0,
    state_dir: Annotated[Path | None, typer.Option(help="Keep state here (default: temp).")]
    = None,
) -> None:
    """Everything embedded: broker, ClickHouse, worker and synthetic accounts, then a summary."""
    from churnsignal.tools.demo import run_demo

    try:
        settings = load_settings()
        configure_logging("warning", settings.log_format)
        code = run_demo(settings, duration=duration, accounts=accounts, rate=rate,
                        state_dir=state_dir)
    except ChurnsignalError as exc:
        _fail(exc)
    raise typer.Exit(code)


@cli.command()
def bench(
    events: Annotated[int, typer.Option(help="Events in the data set.")] = 200_000,
    accounts: Annotated[int, typer.Option(help="Accounts (activity is skewed).")] = 20_000,
    runs: Annotated[int, typer.Option(help="Runs of each system; medians are reported.")] = 3,
    peers: Annotated[str, typer.Option(help="Comma-separated: ceiling,faust-agent,faust,quix "
                                       "(faust-agent: a plain Faust agent, no table).")]
    = "ceiling,faust-agent,faust,quix",
    out: Annotated[Path, typer.Option(help="Where results.json goes.")] = Path(".bench"),
) -> None:
    """Throughput, latency and memory of churnsignal against the ceiling and the peers."""
    from churnsignal.tools.bench import PEERS, run_bench

    try:
        settings = load_settings()
        configure_logging("warning", settings.log_format)
        chosen = tuple(p for p in peers.split(",") if p)
        unknown = set(chosen) - set(PEERS)
        if unknown:
            raise typer.BadParameter(f"unknown peer(s) {sorted(unknown)}; choose from {PEERS}")
        with broker_for(settings) as effective:
            run_bench(effective, effective.kafka_bootstrap_servers or "", events=events,
                      accounts=accounts, runs=runs, out_dir=out, peers=chosen)
    except ChurnsignalError as exc:
        _fail(exc)


@cli.command()
def migrate() -> None:
    """Create missing ClickHouse tables and views (idempotent)."""
    from churnsignal.sinks.clickhouse import connect
    from churnsignal.sinks.clickhouse import migrate as run_migrate

    try:
        settings = load_settings()
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        client = connect(settings.effective_clickhouse_dsn())
        for name in run_migrate(client, settings.sink.ttl_days):
            typer.echo(name)
    except ChurnsignalError as exc:
        _fail(exc)


def _clickhouse(dsn: str | None) -> tuple[object, str]:
    """A client for --dsn, else the configured DSN (the worker's embedded store by default)."""
    from churnsignal.app.settings import mask_dsn
    from churnsignal.sinks.clickhouse import connect
    from churnsignal.sinks.clickhouse import migrate as run_migrate

    settings = load_settings()
    target = dsn or settings.effective_clickhouse_dsn()
    client = connect(target)
    run_migrate(client, settings.sink.ttl_days)  # the views exist even before a worker ran
    return client, mask_dsn(target)


DsnOption = Annotated[str | None, typer.Option(
    help="chdb:///path or http(s)://user:pass@host:8123 (default: CHURNSIGNAL_CLICKHOUSE_DSN, "
         "else the embedded store under CHURNSIGNAL_STATE_DIR). A worker on chdb must be "
         "stopped first: the embedded store is one process's.")]


@cli.command()
def query(
    name: Annotated[str | None, typer.Argument(help="Saved query; omit to list them.")] = None,
    dsn: DsnOption = None,
    output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Run a saved analyst query (logo_churn, mrr_churn, at_risk, ...) and print a table."""
    from rich.console import Console
    from rich.table import Table

    from churnsignal.sinks.queries import QUERIES, run_query

    if name is None:
        for key, saved in QUERIES.items():
            typer.echo(f"{key:18} {saved.title}")
        return
    if name not in QUERIES:
        _fail(ValueError(f"no saved query {name!r}; one of: {', '.join(QUERIES)}"))
    if output not in ("table", "csv", "json"):
        _fail(ValueError("--format must be table, csv or json"))
    try:
        client, _ = _clickhouse(dsn)
        result = run_query(client, name)
    except ChurnsignalError as exc:
        _fail(exc)
    if output == "json":
        typer.echo(json.dumps(result.rows, default=str, indent=1))
    elif output == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=result.columns)
        writer.writeheader()
        writer.writerows(result.rows)
    else:
        table = Table(title=result.title)
        for column in result.columns:
            table.add_column(column)
        for row in result.rows:
            table.add_row(*(_cell(row[c]) for c in result.columns))
        Console().print(table)


def _cell(value: object) -> str:
    from datetime import datetime

    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime) and not (value.hour or value.minute or value.second):
        return value.date().isoformat()  # months and days
    return str(value)


@cli.command()
def report(
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
    dsn: DsnOption = None,
) -> None:
    """Write a self-contained HTML page (works offline) with the churn charts."""
    from churnsignal.app.report import write_report

    try:
        client, source = _clickhouse(dsn)
        path = write_report(client, out, source)
    except ChurnsignalError as exc:
        _fail(exc)
    typer.echo(str(path))


@cli.command()
def backtest(
    events: Annotated[str, typer.Option(help="Events: CSV/TSV/Parquet export (account_id, "
                                        "event_time, event_type, user_id?; other columns ignored), JSONL of "
                                        "Stripe/Segment/Zendesk/canonical payloads, or a Kafka "
                                        "topic range kafka:TOPIC[,TOPIC...][?from=DATE&to=DATE] "
                                        "(KAFKA_BOOTSTRAP_SERVERS).")],
    subscriptions: Annotated[Path | None, typer.Option(
        help="account_id, start_date, end_date (empty while active), mrr, plan?")] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML (default: shipped).")] = None,
    since: Annotated[str | None, typer.Option(
        help="First checkpoint (YYYY-MM-DD); all history before it is still replayed.")] = None,
    horizon_days: Annotated[int, typer.Option(help="Churn within this many days counts.")] = 30,
    renewal_gap_days: Annotated[float, typer.Option(
        help="A new subscription within this gap is a renewal, not churn.")] = 30.0,
    scores_out: Annotated[Path | None, typer.Option(
        help="CSV: account_id, as_of, score, band per account and checkpoint.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Figures as JSON.")] = None,
    html: Annotated[Path | None, typer.Option(help="Figures and curves as HTML.")] = None,
) -> None:
    """Replay history through the worker's own scoring; measure how well it predicted churn."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    _need_backtest_extra()
    from churnsignal.offline import history
    from churnsignal.offline.backtest import Inputs, run_backtest
    from churnsignal.stream.policy import load_policy

    console = Console(stderr=True)
    try:
        from churnsignal.offline.history_kafka import is_kafka

        inputs = Inputs(events if is_kafka(events) else Path(events), subscriptions,
                        load_policy(policy), history.iso_day(since) if since else None,
                        horizon_days, renewal_gap_days)
        with Progress(TextColumn("replaying"), BarColumn(bar_width=None),
                      TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("", total=None)

            def step(t: float) -> None:
                from datetime import UTC, datetime

                bar.update(task, description=datetime.fromtimestamp(t, tz=UTC).date().isoformat())

            gc_tuning.for_long_lived_state()
            report = run_backtest(inputs, scores_out, progress=step)
    except ChurnsignalError as exc:
        _fail(exc)
    _print_backtest(report)
    if json_out:
        json_out.write_bytes(history.dumps(report.as_dict()))
    if html:
        from churnsignal.app.report import render_backtest

        html.write_text(render_backtest(report), encoding="utf-8")


@cli.command()
def calibrate(
    events: Annotated[Path, typer.Option(help="Events export (CSV/TSV/Parquet).")],
    subscriptions: Annotated[Path, typer.Option(help="Subscriptions export.")],
    until: Annotated[str, typer.Option(help="Learn only from what was known before this date "
                                       "(YYYY-MM-DD), labels included.")],
    out: Annotated[Path, typer.Option(help="Policy YAML to write.")],
    policy: Annotated[Path | None, typer.Option(help="Starting policy (default: shipped).")]
    = None,
    horizon_days: Annotated[int, typer.Option(help="Churn within this many days counts.")] = 30,
    target_high_share: Annotated[float, typer.Option(
        help="Share of account-days at high risk or above the thresholds aim for.")] = 0.03,
) -> None:
    """Fit signal weights and band thresholds from labelled history; write a policy YAML."""
    from rich.console import Console
    from rich.table import Table

    _need_backtest_extra()
    from churnsignal.offline import history
    from churnsignal.offline.backtest import Inputs
    from churnsignal.offline.calibrate import calibrate as fit
    from churnsignal.offline.calibrate import write_policy
    from churnsignal.stream.policy import load_policy

    try:
        inputs = Inputs(events, subscriptions, load_policy(policy), None, horizon_days)
        gc_tuning.for_long_lived_state()
        result = fit(inputs, history.iso_day(until), target_high_share=target_high_share)
    except ChurnsignalError as exc:
        typer.secho(f"churnsignal: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(3) from None
    write_policy(result.policy, out, result.kept_shipped)
    table = Table(title=f"Calibration on the validation period ({result.validation_rows} "
                  f"account-days; trained on {result.train_rows}, {result.train_churners} "
                  "churners)")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right")
    table.add_row("ROC AUC", f"{result.auc_before:.3f}", f"{result.auc_after:.3f}")
    table.add_row("PR AUC", f"{result.pr_auc_before:.3f}", f"{result.pr_auc_after:.3f}")
    t = result.policy.thresholds
    table.add_row("thresholds (medium/high/critical)", "", f"{t.medium}/{t.high}/{t.critical}")
    for name, weight in sorted(result.weights.items(), key=lambda kv: -kv[1]):
        if weight and name not in result.kept_shipped:
            table.add_row(f"weight {name}", "", f"{weight:g}")
    for name, why in result.kept_shipped.items():  # the history could not inform these
        weight = result.policy.signals.model_dump()[name]["weight"]
        table.add_row(f"kept {name}", "", f"{weight:g} (not fitted: {why})")
    table.add_row("key events", "", ", ".join(result.key_events) or "none")
    for name, coef in sorted(result.type_decline_coefficients.items(), key=lambda kv: -kv[1]):
        table.add_row(f"decline of {name!r} (coefficient)", "", f"{coef:+.3f}")
    Console().print(table)
    typer.echo(str(out))


def _need_backtest_extra() -> None:
    import importlib.util

    missing = [m for m in ("sklearn", "chdb", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        _fail(ChurnsignalError(f"backtest and calibrate need {', '.join(missing)}: "
                               "pip install 'churnsignal[backtest]'"))


def _print_backtest(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    from churnsignal.app.report import _pct

    r = report
    table = Table(title=f"Backtest: churn within {r.horizon_days} days "
                  f"(since {r.since or 'the start'})")
    table.add_column("figure")
    table.add_column("value", justify="right")

    def num(v: float | None, fmt: str = "{:.3f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    d = r.as_dict()
    for label, value in (
        ("checkpoints (evaluated)", f"{d['checkpoints']} ({d['evaluated']})"),
        ("accounts / churners", f"{d['accounts']} / {d['churners']}"),
        ("base rate", _pct(d["base_rate"])),
        ("ROC AUC", num(d["roc_auc"])), ("PR AUC", num(d["pr_auc"])),
        ("median lead time (days)", num(d["lead_time_median_days"], "{:.1f}")),
        ("churners alerted >= 14 days ahead", _pct(d["share_alerted_14d_ahead"])),
        ("alerts per 100 accounts per week",
         num(d["alerts_per_100_accounts_per_week"], "{:.2f}")),
    ):
        table.add_row(label, value)
    for b in r.bands:
        table.add_row(f"{b.band}+: precision / recall", f"{_pct(b.precision)} / {_pct(b.recall)}")
    for reason, share in d["churn_caught_by_reason"].items():
        table.add_row(f"churn caught first by {reason}", _pct(share))
    for reason, n in d["payloads_skipped"].items():
        table.add_row(f"payloads not replayed: {reason}", f"{n:,}")
    Console().print(table)


@config_cli.command("show")
def config_show() -> None:
    """Print the effective configuration as JSON, secrets masked."""
    try:
        typer.echo(json.dumps(load_settings().masked(), indent=2, default=str))
    except ChurnsignalError as exc:
        _fail(exc)


@schemas_cli.command("export")
def schemas_export(directory: Path) -> None:
    """Write JSON Schema files for the canonical event and the alert."""
    from churnsignal.schemas.export import export

    for path in export(directory):
        typer.echo(str(path))


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
