"""The `churnsignal` command line: worker, gateway, demo, bench, migrate, query, report, config,
schemas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

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
    from rich.console import Console

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
def notify() -> None:
    """Deliver alerts from churn.alerts to the configured destinations (webhook, Slack,
    PagerDuty, Alertmanager), apart from the worker; /metrics, /healthz, /readyz on the web port."""
    from churnsignal.app.embedded import follow_parent
    from churnsignal.errors import ConfigError
    from churnsignal.notify.service import run_standalone

    follow_parent()
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        if settings.embedded_broker:
            raise ConfigError("`churnsignal notify` reads the alerts of a running worker's "
                              "broker: set KAFKA_BOOTSTRAP_SERVERS")
        log.info("starting notify", extra={"config": settings.masked()})
        asyncio.run(run_standalone(settings))
    except ChurnsignalError as exc:
        _fail(exc)


@cli.command()
def gateway() -> None:
    """HTTP ingest: a Segment-compatible tracking API and the Stripe, Zendesk and Intercom
    webhooks, into the source topics (2xx only once Kafka acknowledged)."""
    from churnsignal.app.embedded import follow_parent
    from churnsignal.app.kafka_client import ensure_topics
    from churnsignal.errors import BrokerUnavailable
    from churnsignal.gateway.server import run

    follow_parent()  # started by the demo or the bench: dies with it
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        log.info("starting gateway", extra={"config": settings.masked()})
        with broker_for(settings) as effective:
            if settings.embedded_broker:
                log.warning("no KAFKA_BOOTSTRAP_SERVERS: the gateway started its own embedded "
                            "broker at %s; point a worker at it with KAFKA_BOOTSTRAP_SERVERS=%s",
                            effective.kafka_bootstrap_servers, effective.kafka_bootstrap_servers)
            try:
                asyncio.run(ensure_topics(effective))
            except BrokerUnavailable as exc:  # serve anyway: 503 + Retry-After until it answers
                log.warning("%s; serving, and answering 503 until Kafka answers", exc)
            run(effective)
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
    """Everything embedded: broker, ClickHouse, worker, gateway (the synthetic accounts' traffic
    goes through it) and a local alert receiver, then a summary."""
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
    dense_accounts: Annotated[int, typer.Option(
        min=0, help="Accounts of the second, dense data set (every account active every "
        "day); 0 skips it. Only the ceiling and Quix of --peers run on it.")] = 1000,
    dense_days: Annotated[int, typer.Option(min=1, help="Days of the dense data set.")] = 30,
    dense_per_day: Annotated[int, typer.Option(
        min=1, help="Events per account per day in the dense data set.")] = 20,
    scale_out: Annotated[bool, typer.Option(
        help="Also run two workers of one deployment (one consumer group) on the data set "
        "at once.")] = True,
    latency_seconds: Annotated[float, typer.Option(
        min=1.0, help="Length of each latency phase (an alert every 0.2 s; the p99 of 30 s "
        "is not simply the slowest alert).")] = 30.0,
    out: Annotated[Path, typer.Option(
        help="Where results.json (gateway.json, fold.json) goes.")] = Path(".bench"),
    gateway: Annotated[bool, typer.Option(
        "--gateway", help="Benchmark the HTTP ingest gateway against a bare HTTP-to-aiokafka "
        "forwarder instead (writes gateway.json; the other options do not apply).")] = False,
    fold_only: Annotated[bool, typer.Option(
        "--fold-only", help="Measure the state side alone, in this process and without Kafka: "
        "the data set's packs (--events, --accounts) folded in steps and flushed, each stage "
        "timed (writes fold.json; the other options do not apply).")] = False,
    live_events: Annotated[int, typer.Option(
        min=0, help="With --fold-only: then fold this many events of the latency load on the "
        "states the data set left, as a live worker does (small packs, each folded as it "
        "comes, a flush every few); 0 skips it.")] = 100_000,
) -> None:
    """Throughput, latency and memory of churnsignal against the ceiling and the peers."""
    from churnsignal.tools.bench import PEERS, run_bench

    try:
        settings = load_settings()
        configure_logging("warning", settings.log_format)
        if fold_only:
            if gateway:
                raise typer.BadParameter("--fold-only and --gateway measure different things; "
                                         "choose one")
            _fold_bench(settings, events, accounts, out, live_events)
            return
        chosen = tuple(p for p in peers.split(",") if p)
        unknown = set(chosen) - set(PEERS)
        if unknown:
            raise typer.BadParameter(f"unknown peer(s) {sorted(unknown)}; choose from {PEERS}")
        with broker_for(settings) as effective:
            if gateway:
                from churnsignal.tools.bench_gateway import run_gateway_bench

                run_gateway_bench(effective, effective.kafka_bootstrap_servers or "", out)
                return
            run_bench(effective, effective.kafka_bootstrap_servers or "", events=events,
                      accounts=accounts, runs=runs, out_dir=out, peers=chosen,
                      dense_accounts=dense_accounts, dense_days=dense_days,
                      dense_per_day=dense_per_day, scale_out=scale_out,
                      latency_s=latency_seconds)
    except ChurnsignalError as exc:
        _fail(exc)


def _fold_bench(settings: Settings, events: int, accounts: int, out: Path,
                live_events: int = 0) -> None:
    import orjson

    from churnsignal.stream.policy import load_policy
    from churnsignal.tools.foldbench import run

    result = run(settings, load_policy(settings.policy_file), events, accounts,
                 live_events=live_events).summary()
    out.mkdir(parents=True, exist_ok=True)
    (out / "fold.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    typer.echo(f"state side alone (no Kafka): {result['events']:,} events, "
               f"{result['items']:,} pack items in {result['packs']} packs, "
               f"{accounts:,} accounts; {result['steps']} steps, {result['flushes']} flushes")
    _fold_table(result)
    live = result.get("live")
    if live is not None:
        typer.echo(f"then live: {live['events']:,} events of the latency load in "
                   f"{live['packs']} packs, each folded as it comes; {live['flushes']} flushes")
        _fold_table(live)
        typer.echo(f"live / catch-up per event: "
                   f"{live['total_us_per_event'] / result['total_us_per_event']:.2f}x")
    typer.echo(f"wrote {out / 'fold.json'}")


def _fold_table(result: dict[str, Any]) -> None:
    typer.echo(f"per event: {result['account_batches_per_event']:.2f} account batches, "
               f"{result['states_written_per_event']:.2f} states written, "
               f"{result['rows_per_event']:.2f} ClickHouse rows")
    total = result["total_us_per_event"]
    typer.echo(f"{'stage':<12} {'us/event':>9} {'share':>6}")
    for stage, us in result["us_per_event"].items():
        typer.echo(f"{stage:<12} {us:>9.2f} {us / total:>6.0%}")
    typer.echo(f"{'total':<12} {total:>9.2f}   ({result['events_per_s']:,.0f} events/s on "
               f"one core; the collector {result['gc_us_per_event']:.2f} us/event of it)")


@cli.command()
def migrate() -> None:
    """Create missing ClickHouse tables and views (idempotent)."""
    from churnsignal.sinks.clickhouse import connect
    from churnsignal.sinks.clickhouse import migrate as run_migrate

    try:
        settings = load_settings()
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        client = connect(settings.effective_clickhouse_dsn())
        for name in run_migrate(client, settings.sink.ttl_days, settings.views):
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
    # the views exist even before a worker ran, as the settings define them
    run_migrate(client, settings.sink.ttl_days, settings.views)
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
    events: Annotated[str, typer.Option(help="Events, as backtest reads them: CSV/TSV/Parquet "
                                        "export (with --subscriptions), JSONL of Stripe/"
                                        "Segment/Zendesk/canonical payloads, or a Kafka topic "
                                        "range kafka:TOPIC[,TOPIC...][?from=DATE&to=DATE].")],
    until: Annotated[str, typer.Option(help="Learn only from what was known before this date "
                                       "(YYYY-MM-DD), labels included.")],
    out: Annotated[Path, typer.Option(help="Policy YAML to write.")],
    subscriptions: Annotated[Path | None, typer.Option(
        help="account_id, start_date, end_date (empty while active), mrr, plan?; optional "
             "when billing events carry the subscriptions (JSONL, Kafka).")] = None,
    policy: Annotated[Path | None, typer.Option(help="Starting policy (default: shipped).")]
    = None,
    horizon_days: Annotated[int, typer.Option(help="Churn within this many days counts.")] = 30,
    target_high_share: Annotated[float, typer.Option(
        help="Without --target-precision or --alert-budget: share of account-days at high "
             "risk or above.")] = 0.03,
    target_precision: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Set 'high' at the lowest score whose precision on the "
        "validation period reaches P (0-1).")] = None,
    alert_budget: Annotated[float | None, typer.Option(
        min=0.0, help="Set 'high' so that about N accounts per 100 escalate per week on the "
        "validation period.")] = None,
    event_types: Annotated[int, typer.Option(
        min=0, max=32, help="Most used event types tracked per day as model features.")] = 8,
    force: Annotated[bool, typer.Option(
        help="Write the policy even if it does not beat the best baseline on validation.")]
    = False,
) -> None:
    """Fit a churn model and band thresholds on labelled history; write a policy YAML."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    _need_backtest_extra()
    from churnsignal.offline import history
    from churnsignal.offline.backtest import Inputs
    from churnsignal.offline.calibrate import NotBetterThanBaseline, summary, write_policy
    from churnsignal.offline.calibrate import calibrate as fit
    from churnsignal.offline.history_kafka import is_kafka
    from churnsignal.stream.policy import load_policy

    if target_precision is not None and alert_budget is not None:
        _fail(ValueError("choose --target-precision or --alert-budget, not both"))
    console = Console()
    try:
        inputs = Inputs(events if is_kafka(events) else Path(events), subscriptions,
                        load_policy(policy), None, horizon_days)
        with Progress(TextColumn("replaying"), BarColumn(bar_width=None),
                      TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("", total=None)

            def step(t: float) -> None:
                from datetime import UTC, datetime

                bar.update(task, description=datetime.fromtimestamp(t, tz=UTC).date().isoformat())

            gc_tuning.for_long_lived_state()
            result = fit(inputs, history.iso_day(until), target_high_share=target_high_share,
                         target_precision=target_precision, alert_budget=alert_budget,
                         event_types=event_types, force=force, progress=step)
    except NotBetterThanBaseline as exc:
        _print_calibration(console, exc.calibration)
        typer.secho(f"churnsignal: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(3) from None
    except ChurnsignalError as exc:
        typer.secho(f"churnsignal: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(3) from None
    _print_calibration(console, result)
    if result.refusal is not None:  # written with --force
        typer.secho(f"churnsignal: --force: written although {result.refusal.split(': ', 1)[1]}",
                    err=True, fg=typer.colors.YELLOW)
    write_policy(result.policy, out, result.kept_shipped, summary(result))
    typer.echo(str(out))


def _print_calibration(console: Console, result: object) -> None:
    """The calibration report: the fit, the model beside the baselines on the validation
    period, its strongest coefficients, the bands both ways, and the rule weights kept."""
    from rich.table import Table

    from churnsignal.app.report import _pct
    from churnsignal.offline.calibrate import NAMES, Calibration
    from churnsignal.offline.evaluation import SCORE

    assert isinstance(result, Calibration)
    r = result
    c = r.comparison
    horizon = r.policy.model.horizon_days if r.policy.model is not None else "?"
    fit = Table(title=f"Calibration: churn within {horizon} days")
    fit.add_column("figure")
    fit.add_column("value")
    fit.add_row("training rows / churners", f"{r.train_rows:,} / {r.train_churners}")
    fit.add_row("validation rows / churners", f"{r.validation_rows:,} / {r.validation_churners}")
    fit.add_row("written model fitted on", f"{r.fitted_rows:,} rows (training + validation), "
                f"calibrated on validation")
    fit.add_row("event types tracked", ", ".join(r.event_types) or "none")
    fit.add_row("C (L2), by validation ROC AUC (1-SE rule)",
                f"{r.c:g}  (" + ", ".join(f"{k:g}: {v:.3f}" for k, v in r.c_auc.items()) + ")")
    fit.add_row("training ROC AUC", f"{r.train_auc:.3f}")
    fit.add_row("features kept / dropped", f"{len(r.features)} / {len(r.dropped)}")
    for name, why in r.dropped.items():
        fit.add_row(f"dropped {name}", why)
    for note in r.notes:
        fit.add_row("note", note)
    console.print(fit)

    systems = c.systems
    console.print(_comparison_table(
        f"Validation: calibrated model against baselines ({c.level:.0%} intervals, "
        f"{c.resamples} resamples of {c.accounts} accounts)",
        {NAMES.get(name, name): figures for name, figures in systems.items()}))
    console.print(c.verdict, style="bold")
    if systems[SCORE].roc_auc is not None:
        console.print(f"(the validation figures are the training fit's, on days it never saw; "
                      f"the written model is refitted with C={r.c:g} on every row)")

    coefs = Table(title="Strongest coefficients (per standard deviation; + raises the risk)")
    for column in ("feature", "coefficient", "reason"):
        coefs.add_column(column)
    for co in r.coefficients[:10]:
        coefs.add_row(co.feature, f"{co.coefficient:+.4f}", co.code)
    console.print(coefs)

    bands = Table(title=f"Bands on the validation period (high: {r.band_rule}; precision: "
                  "the training fit's, on as many account-days)")
    for column in ("band", "score >=", "precision", "account-days", "alerts / 100 accts / wk"):
        bands.add_column(column, justify="right")
    for b in r.bands:
        volume = "n/a" if b.alerts_per_100_per_week is None else \
            f"{b.alerts_per_100_per_week:.2f}"
        bands.add_row(b.band + (" (pages)" if b.pages else ""), f"{b.threshold:g}",
                      _pct(b.precision), _pct(b.share), volume)
    console.print(bands)
    weights = r.policy.signals.model_dump()
    console.print("Rule weights kept from the starting policy (the model scores; a "
                  "cancellation, a scheduled cancellation and exhausted retries still alert "
                  "at once by rule):")
    for name, why in r.kept_shipped.items():
        console.print(f"  kept {name}: {weights[name]['weight']:g} (not learnt: {why})")


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
    console = Console()
    console.print(table)
    _print_baselines(console, r)


def _print_baselines(console: Console, r: Report) -> None:
    """The score beside each baseline on the same checkpoints, then the verdict and deciles."""
    from rich.table import Table

    from churnsignal.app.report import _pct
    from churnsignal.offline.evaluation import BASELINES

    if r.score_figures is None:
        return
    systems = {"score": r.score_figures, **r.baselines}
    names = {"score": "score", **BASELINES}
    c = r.comparison
    sampled = (f"; 1 in {c['stride']} checkpoints of each account" if c["stride"] > 1 else "")
    console.print(_comparison_table(
        f"Score against baselines ({c['level']:.0%} intervals: {c['resamples']} resamples of "
        f"{c['accounts']} accounts{sampled})",
        {names.get(name, name): figures for name, figures in systems.items()}))
    console.print(c["verdict"], style="bold", markup=False)
    if not r.score_figures.deciles:
        return
    deciles = Table(title="Churn rate / cumulative recall by decile of risk (1: riskiest)")
    deciles.add_column("decile")
    deciles.add_column("checkpoints", justify="right")
    for name in systems:
        deciles.add_column(names.get(name, name), justify="right")

    def recall(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    for i, first in enumerate(r.score_figures.deciles):
        deciles.add_row(str(first.decile), f"{first.checkpoints:,.0f}", *(
            f"{_pct(f.deciles[i].churn_rate)} / {recall(f.deciles[i].cumulative_recall)}"
            for f in systems.values()))
    console.print(deciles)


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


import_cli = typer.Typer(no_args_is_help=True, help="Backfill history churnsignal did not see.")
cli.add_typer(import_cli, name="import")


@import_cli.command("subscriptions")
def import_subscriptions(
    file: Annotated[Path, typer.Argument(help="CSV/TSV/Parquet: account_id, start_date, "
                                         "end_date (empty while active), mrr (currency units), "
                                         "plan?, currency?, subscription_id?, "
                                         "customer_id? (Stripe customer); or the Stripe "
                                         "Dashboard's subscriptions export (CSV)")],
    as_of: Annotated[str | None, typer.Option(
        help="When the file described the subscriptions (ISO date or time); default: the "
        "file's modification time, so importing the same file again changes nothing.")] = None,
) -> None:
    """Seed accounts' subscriptions (start, end, plan, MRR): through Kafka to the worker, or,
    on the embedded defaults, straight into ClickHouse (stop the worker first)."""
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from churnsignal.offline.importer import ImportSummary, produce, snapshots, write_direct

    console = Console(stderr=True)
    try:
        settings = load_settings()
        if as_of is None:
            moment = file.stat().st_mtime if file.is_file() else 0.0
        else:
            parsed = datetime.fromisoformat(as_of)
            moment = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        summary = ImportSummary(topic=settings.topics.snapshots)
        events = snapshots(file, moment, summary)
        direct = settings.embedded_broker
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("importing subscriptions", total=len(events))

            def step(n: int) -> None:
                progress.advance(task, n)

            if direct:
                asyncio.run(write_direct(settings.effective_clickhouse_dsn(), events, step,
                                         settings.views))
            else:
                asyncio.run(produce(settings, events, step))
    except (ChurnsignalError, OSError, ValueError) as exc:
        _fail(exc)
    where = ("ClickHouse (embedded defaults)" if direct
             else f"topic {summary.topic} (the worker applies them)")
    typer.echo(f"rows read: {summary.rows}")
    typer.echo(f"subscriptions: {summary.subscriptions} -> {where}")
    typer.echo(f"accounts: {len(summary.accounts)}")
    typer.echo(f"as of: {datetime.fromtimestamp(summary.as_of, tz=UTC).isoformat()}")
    skipped = sum(summary.skipped.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items()))
    typer.echo(f"skipped: {skipped}" + (f" ({reasons})" if reasons else ""))


@import_cli.command("rates")
def import_rates(
    file: Annotated[Path, typer.Argument(help="CSV: currency,rate[,valid_from] per line (rate: "
                                         "units of the reporting currency per unit; "
                                         "valid_from: ISO date, omitted: always)")],
) -> None:
    """Load exchange rates to CHURNSIGNAL_VIEWS__REPORTING_CURRENCY for the
    `mrr_monthly_reporting` view (ClickHouse; on the embedded store, stop the worker first)."""
    import time
    from collections import Counter

    from churnsignal.offline import rates as rates_mod

    try:
        settings = load_settings()
        reporting = settings.views.reporting_currency
        if reporting is None:
            raise ChurnsignalError(
                "set CHURNSIGNAL_VIEWS__REPORTING_CURRENCY (e.g. usd) to the currency the "
                "rates convert to (the views are made with it too)")
        parsed = rates_mod.read_rates(file, reporting)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        rates_mod.load(settings.effective_clickhouse_dsn(), parsed, reporting, time.time(),
                       settings.views)
    except (ChurnsignalError, OSError, ValueError) as exc:
        _fail(exc)
    by_currency = Counter(r.currency for r in parsed)
    detail = ", ".join(f"{c} {n}" for c, n in sorted(by_currency.items()))
    typer.echo(f"rates: {len(parsed)}" + (f" ({detail})" if detail else "")
               + f" -> {reporting}")


sync_cli = typer.Typer(no_args_is_help=True, help="Read history from a provider's API.")
cli.add_typer(sync_cli, name="sync")


@sync_cli.command("stripe")
def sync_stripe(
    restart: Annotated[bool, typer.Option(
        help="Forget an unfinished sync's checkpoint and start afresh.")] = False,
) -> None:
    """Subscriptions of every status (as snapshots, like `import subscriptions`), customers'
    account links and the last 30 days of Events (to the billing topic, as Stripe delivers
    them) from Stripe's API (CHURNSIGNAL_STRIPE__API_KEY or _FILE: a restricted key). Resumes
    an interrupted sync from its checkpoint under CHURNSIGNAL_STATE_DIR/stripe-sync."""
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from churnsignal.offline import stripe_sync as ss

    try:
        import stripe
    except ImportError:
        _fail(ChurnsignalError("the stripe library is missing: pip install 'churnsignal[stripe]'"))
    console = Console(stderr=True)
    try:
        settings = load_settings()
        conf = settings.stripe
        if conf.api_key is None:
            raise ValueError("CHURNSIGNAL_STRIPE__API_KEY (or CHURNSIGNAL_STRIPE__API_KEY_FILE) "
                             "is not set: a restricted key with read access to Customers, "
                             "Subscriptions and Events")
        key = conf.api_key.get_secret_value()
        checkpoint = ss.Checkpoint(settings.state_dir / "stripe-sync",
                                   ss.fingerprint(key, conf.api_base or ""))
        resumed = checkpoint.load(restart, datetime.now(UTC).timestamp())
        if resumed:
            console.print(f"resuming the sync from its checkpoint ({checkpoint.state['phase']})")
        client = ss.make_client(key, conf.api_base, conf.max_network_retries)
        options = ss.SyncOptions(
            page_size=conf.page_size, rate_limit_retries=conf.rate_limit_retries,
            rate_limit_backoff_s=conf.rate_limit_backoff_s,
            rate_limit_backoff_max_s=conf.rate_limit_backoff_max_s, events_days=conf.events_days)
        direct = settings.embedded_broker
        dsn = settings.effective_clickhouse_dsn()

        def destination(links: dict[str, str]) -> ss.Destination:
            if direct:
                return ss.ClickHouseDestination(dsn, links, views=settings.views)
            return ss.KafkaDestination(settings)

        with Progress(SpinnerColumn(), TextColumn("{task.description}"),
                      TextColumn("{task.completed:,.0f}"), console=console,
                      transient=True) as progress:
            tasks: dict[str, Any] = {}

            def step(phase: str, n: int) -> None:
                if phase not in tasks:
                    tasks[phase] = progress.add_task(phase.replace("_", " "))
                progress.advance(tasks[phase], n)

            summary = ss.StripeSync(client, checkpoint, options, step).run(destination)
    except (ChurnsignalError, OSError, ValueError) as exc:
        _fail(exc)
    except stripe.StripeError as exc:  # the checkpoint keeps what was done
        _fail(ChurnsignalError(f"Stripe: {type(exc).__name__}: {exc} (run it again to resume)"))
    snapshots_to = ("ClickHouse (embedded defaults)" if direct
                    else f"topic {settings.topics.snapshots}")
    events_to = ("ClickHouse (embedded defaults)" if direct
                 else f"topic {settings.topics.billing}")
    typer.echo(f"customers: {summary.customers} ({summary.linked_customers} linked to an "
               "account by metadata)")
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary.statuses.items()))
    typer.echo(f"subscriptions: {summary.subscriptions}" + (f" ({statuses})" if statuses else ""))
    typer.echo(f"snapshots: {summary.snapshots} -> {snapshots_to}")
    typer.echo(f"accounts: {len(summary.accounts)}")
    skipped = sum(summary.skipped.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items()))
    typer.echo(f"skipped: {skipped}" + (f" ({reasons})" if reasons else ""))
    typer.echo(f"events: {summary.events} -> {events_to}")
    typer.echo(f"pages: {summary.pages}, rate limited: {summary.rate_limited}"
               + (", resumed" if resumed else ""))
    typer.echo(f"as of: {datetime.fromtimestamp(summary.as_of, tz=UTC).isoformat()}")


forget_cli = typer.Typer(no_args_is_help=True, help="Delete what churnsignal holds about an "
                         "account or a user (the workers carry it out; this waits for them).")
cli.add_typer(forget_cli, name="forget")


def _forget(kind: Literal["account", "user"], subject: str, timeout: float,
            as_json: bool) -> None:
    from churnsignal.app.forget import forget

    try:
        report = asyncio.run(forget(load_settings(), kind, subject, timeout))
    except ChurnsignalError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        for line in report.lines():
            typer.echo(line)


@forget_cli.command("account")
def forget_account(
    account_id: Annotated[str, typer.Argument(help="The account id, as events carry it.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the workers.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Delete an account's state, the identity links to it and its ClickHouse rows."""
    _forget("account", account_id, timeout, as_json)


@forget_cli.command("user")
def forget_user(
    user_id: Annotated[str, typer.Argument(help="The user id (Segment userId or "
                                                "anonymousId, Zendesk user id).")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the workers.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Delete a user's identity links, the events waiting under them and the user's traces
    in account states (per-day user counts are aggregates and stay)."""
    _forget("user", user_id, timeout, as_json)


def _comparison_table(title: str, systems: dict[str, Any]) -> Any:
    """ROC AUC, PR AUC and top-decile lift of each system (evaluation.Figures), with their
    intervals: the one table backtest and calibrate both print."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    for name in systems:
        table.add_column(name, justify="right")

    def cell(value: float | None, ci: tuple[float, float] | None, fmt: str) -> str:
        if value is None:
            return "n/a"
        return fmt.format(value) + ("" if ci is None else "\n" + f"{fmt}–{fmt}".format(*ci))

    figures = systems.values()
    table.add_row("ROC AUC", *(cell(f.roc_auc, f.roc_auc_ci, "{:.3f}") for f in figures))
    table.add_row("PR AUC", *(cell(f.pr_auc, f.pr_auc_ci, "{:.3f}") for f in figures))
    table.add_row("top-decile lift", *(cell(f.top_decile_lift, f.top_decile_lift_ci, "{:.2f}")
                                       for f in figures))
    return table


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
