"""`churnsignal backtest`: replay history through the worker's own core and measure how well
the score predicted churn.

The replay folds each day's events per account with ``engine.fold`` and scores every active
account once at each daily checkpoint with ``engine.rescore`` — the fold and the re-score the
worker runs on packs and on its timer — so live and replayed histories score alike. Warehouse
exports arrive counted per account and day (``history.warehouse_days``), which folds to the
same state as their events one by one at a fraction of the cost.

Every evaluated checkpoint is also scored by the baselines (``evaluation.Baselines``: usage
events and active days in the last 30 days, the default policy) on the same state, and the
report compares them with the score (``evaluation.compare``), intervals included.
"""

from __future__ import annotations

import csv
import heapq
import math
import statistics
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from churnsignal.app.settings import Settings
from churnsignal.offline.evaluation import SCORE, Baselines, Collector, Comparison, Figures, compare
from churnsignal.offline.history import DAY, Subscriptions
from churnsignal.stream.engine import fold, rescore
from churnsignal.stream.policy import BANDS, Policy
from churnsignal.stream.state import AccountState, prune

RANK: dict[str, int] = {band: i for i, band in enumerate(BANDS)}  # looked up by plain str


@dataclass(slots=True)
class Checkpoint:
    account_id: str
    as_of: float
    score: float
    band: str
    state: AccountState


@dataclass(slots=True)
class AlertSeen:
    account_id: str
    at: float
    band: str
    kind: str
    reason: str


def _day_end(ts: float) -> float:
    return (math.floor(ts / DAY) + 1) * DAY


def replay(events: Iterable[Any], subs: Subscriptions, policy: Policy, *,
           since: float | None = None, end: float | None = None,
           alerts: list[AlertSeen] | None = None,
           progress: Callable[[float], None] | None = None) -> Iterator[Checkpoint]:
    """Yield a checkpoint per active account per day (from ``since``), in time order.

    ``events`` must be in event-time order (history.* give them so). An account is active
    while one of its subscription periods covers the checkpoint; accounts without any
    subscription row are scored while they have events in the policy horizon.
    """
    states: dict[str, AccountState] = {}
    pending: dict[str, list[Any]] = defaultdict(list)
    next_cp: float | None = None
    horizon = policy.windows.horizon_days * DAY

    def close(t: float) -> Iterator[Checkpoint]:
        folded = set(pending)
        for account, items in pending.items():
            states[account] = fold(states.get(account), account, items, t, policy).state
        pending.clear()
        for account, state in states.items():
            covered = account in subs.periods
            if (covered and not subs.active(account, t - 1e-6)) or (
                    not covered and t - state.last_event > horizon):
                if account in folded:
                    prune(state, t, policy)  # not scored, but kept bounded
                continue
            # One score per account and day, events or not: the worker's re-score.
            out = rescore(state, t, policy)
            _seen(out.alert, alerts)
            if since is None or t >= since:
                yield Checkpoint(account, t, out.scored.score if out.scored else 0.0,
                                 state.band, state)
        if progress is not None:
            progress(t)

    for event in events:
        ts = event.occurred_at.timestamp()
        if next_cp is None:
            next_cp = _day_end(ts)
        while ts >= next_cp:
            yield from close(next_cp)
            next_cp += DAY
        pending[event.account_id].append((None, 0, event))
    if next_cp is not None:
        last = end if end is not None else next_cp
        while next_cp <= last:
            yield from close(next_cp)
            next_cp += DAY


def _seen(alert: Any, alerts: list[AlertSeen] | None) -> None:
    if alert is not None and alerts is not None:
        top = alert.reasons[0].code if alert.reasons else "none"
        alerts.append(AlertSeen(alert.account_id, alert.triggered_at, alert.band, alert.kind,
                                top))


def merge_by_time(*streams: Iterable[Any]) -> Iterator[Any]:
    """Several event-time-ordered streams as one."""
    return heapq.merge(*streams, key=lambda e: e.occurred_at)


@dataclass
class BandFigures:
    band: str
    precision: float | None
    recall: float | None
    flagged: int


@dataclass
class Report:
    horizon_days: int
    since: str | None
    checkpoints: int
    evaluated: int  # checkpoints whose horizon is complete
    accounts: int
    churners: int
    roc_auc: float | None
    pr_auc: float | None
    base_rate: float | None
    bands: list[BandFigures]
    lead_time_median_days: float | None
    share_alerted_14d_ahead: float | None
    alerts_per_100_accounts_per_week: float | None
    churn_caught_by_reason: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict, repr=False)
    # native payloads not replayed, by reason (not decodable, unused type, no account)
    payloads_skipped: dict[str, int] = field(default_factory=dict)
    # The score's and each baseline's figures on the same checkpoints: ROC AUC, PR AUC,
    # top-decile lift with bootstrap intervals, and a decile table (evaluation.Figures).
    score_figures: Figures | None = None
    baselines: dict[str, Figures] = field(default_factory=dict)
    # which is best by ROC AUC, by how much, and how the intervals were drawn
    comparison: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("curves")
        return data


class Evaluator:
    """Collects checkpoints (compactly) and computes the report."""

    def __init__(self, churn_dates: dict[str, list[float]], horizon_days: int,
                 data_end: float, subscribed: set[str], policy: Policy | None = None) -> None:
        self.churn = churn_dates
        self.subscribed = subscribed  # accounts a label can be given to
        self.horizon = horizon_days * DAY
        self.data_end = data_end
        # The baselines score the same states at the same checkpoints as the policy under test.
        self.baselines = Baselines(policy)
        self.scored = Collector((SCORE, *self.baselines.names))
        self.scores = self.scored.scores[SCORE]
        self.labels = self.scored.labels
        self.bands = array("b")
        self.accounts: set[str] = set()
        self.checkpoints = 0
        self.first: float | None = None
        self.last: float | None = None
        self.per_day: Counter[float] = Counter()

    def label(self, account: str, t: float) -> bool:
        return any(t < d <= t + self.horizon for d in self.churn.get(account, ()))

    def add(self, cp: Checkpoint) -> None:
        self.checkpoints += 1
        self.per_day[cp.as_of] += 1
        self.first = cp.as_of if self.first is None else min(self.first, cp.as_of)
        self.last = cp.as_of if self.last is None else max(self.last, cp.as_of)
        if cp.as_of + self.horizon > self.data_end or cp.account_id not in self.subscribed:
            return  # horizon not over yet (censored), or nothing to label it with
        self.accounts.add(cp.account_id)
        self.scored.add(cp.account_id, self.label(cp.account_id, cp.as_of),
                        (cp.score, *self.baselines(cp.state, cp.as_of, cp.score)))
        self.bands.append(RANK[cp.band])

    def compare(self, **options: Any) -> Comparison:
        """The score against the baselines on the evaluated checkpoints (evaluation.compare)."""
        return compare(self.scored.scored(), SCORE, **options)

    def report(self, alerts: list[AlertSeen], since: float | None) -> Report:
        from sklearn.metrics import (
            average_precision_score,
            precision_recall_curve,
            roc_auc_score,
            roc_curve,
        )

        labels, scores = list(self.labels), list(self.scores)
        both = 0 < sum(labels) < len(labels)
        curves: dict[str, list[float]] = {}
        roc = pr = None
        if both:
            roc = float(roc_auc_score(labels, scores))
            pr = float(average_precision_score(labels, scores))
            fpr, tpr, _ = roc_curve(labels, scores)
            precision, recall, _ = precision_recall_curve(labels, scores)
            curves = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                      "precision": precision.tolist(), "recall": recall.tolist()}
        bands = []
        positives = sum(labels)
        for band in ("medium", "high", "critical"):
            flagged = [lab for lab, b in zip(labels, self.bands, strict=True) if b >= RANK[band]]
            bands.append(BandFigures(
                band, sum(flagged) / len(flagged) if flagged else None,
                sum(flagged) / positives if positives else None, len(flagged)))
        start = since if since is not None else (self.first or 0.0)
        window_end = self.data_end
        churners = {a: d for a, ds in self.churn.items() for d in ds if start < d <= window_end}
        escalations = sorted((a for a in alerts if a.kind == "escalated"
                              and RANK[a.band] >= RANK["high"]), key=lambda a: a.at)
        first_alert: dict[tuple[str, float], AlertSeen] = {}
        for a in escalations:
            for d in self.churn.get(a.account_id, ()):
                if d - 90 * DAY <= a.at < d and (a.account_id, d) not in first_alert:
                    first_alert[(a.account_id, d)] = a
        leads = [(d - first_alert[(acc, d)].at) / DAY for acc, d in churners.items()
                 if (acc, d) in first_alert]
        caught = Counter(first_alert[(acc, d)].reason for acc, d in churners.items()
                         if (acc, d) in first_alert)
        in_window = [a for a in escalations if a.at >= start]
        days = max(1.0, (window_end - start) / DAY)
        mean_active = (sum(self.per_day.values()) / len(self.per_day)) if self.per_day else 0
        comparison = self.compare()
        summary = comparison.as_dict()
        summary.pop("systems")
        return Report(
            horizon_days=round(self.horizon / DAY), checkpoints=self.checkpoints,
            since=datetime.fromtimestamp(since, tz=UTC).date().isoformat() if since else None,
            evaluated=len(labels), accounts=len(self.accounts), churners=len(churners),
            roc_auc=roc, pr_auc=pr, base_rate=positives / len(labels) if labels else None,
            bands=bands,
            lead_time_median_days=statistics.median(leads) if leads else None,
            share_alerted_14d_ahead=(sum(1 for lead in leads if lead >= 14) / len(churners)
                                     if churners else None),
            alerts_per_100_accounts_per_week=(len(in_window) / (mean_active / 100) / (days / 7)
                                              if mean_active else None),
            churn_caught_by_reason={r: n / len(churners) for r, n in caught.most_common()}
            if churners else {},
            curves=curves, score_figures=comparison.systems[SCORE],
            baselines=comparison.baselines, comparison=summary)


class ScoresWriter:
    """--scores-out: one row per account and checkpoint (account_id, as_of, score, band)."""

    def __init__(self, path: Path | None) -> None:
        self._fh = path.open("w", newline="") if path else None
        self._w = csv.writer(self._fh) if self._fh else None
        if self._w:
            self._w.writerow(["account_id", "as_of", "score", "band"])

    def add(self, cp: Checkpoint) -> None:
        if self._w:
            self._w.writerow([cp.account_id,
                              datetime.fromtimestamp(cp.as_of, tz=UTC).date().isoformat(),
                              round(cp.score, 1), cp.band])

    def close(self) -> None:
        if self._fh:
            self._fh.close()


@dataclass
class Inputs:
    events: Path | str  # a file, or a Kafka topic range (kafka:TOPIC,...?from=&to=)
    subscriptions: Path | None
    policy: Policy
    since: float | None
    horizon_days: int = 30
    renewal_gap_days: float = 30.0
    account_key: str = "account_id"
    settings: Settings | None = None  # for a Kafka topic range (default: the environment's)


NATIVE_SUFFIXES = (".jsonl", ".json", ".ndjson")


def load_native(inputs: Inputs, progress: Callable[[int], None] | None = None) -> Any:
    """Native payloads (JSONL file or Kafka range) decoded and sorted: a NativeHistory."""
    from churnsignal.offline.history_kafka import KafkaRange, is_kafka, read_range
    from churnsignal.offline.history_native import NativeHistory

    native = NativeHistory(inputs.account_key)
    try:
        if isinstance(inputs.events, str) and is_kafka(inputs.events):
            from churnsignal.app.settings import load_settings

            read_range(KafkaRange.parse(inputs.events), inputs.settings or load_settings(),
                       native.add, progress)
        else:
            native.add_jsonl(Path(inputs.events))
    except BaseException:
        native.close()
        raise
    return native


def is_native(events: Path | str) -> bool:
    from churnsignal.offline.history_kafka import is_kafka

    return is_kafka(str(events)) or Path(events).suffix.lower() in NATIVE_SUFFIXES


def run_backtest(inputs: Inputs, scores_out: Path | None = None,
                 progress: Callable[[float], None] | None = None) -> Report:
    """Replay ``inputs`` and evaluate; streams events, keeps state per account."""
    from churnsignal.offline import history

    engine = history.Engine()
    native = None
    try:
        if is_native(inputs.events):
            native = load_native(inputs)
            subs = (history.read_subscriptions(engine, inputs.subscriptions)
                    if inputs.subscriptions else native.subscriptions())
            stream: Iterable[Any] = native.events() if not inputs.subscriptions else \
                merge_by_time(native.events(), history.subscription_events(subs))
            last = native.last
        else:
            if inputs.subscriptions is None:
                raise history.HistoryError("--subscriptions is needed with a warehouse export")
            events = Path(inputs.events)
            subs = history.read_subscriptions(engine, inputs.subscriptions)
            stream = merge_by_time(history.warehouse_days(engine, events, inputs.policy),
                                   history.subscription_events(subs))
            last = history.last_event_time(engine, events)
        end = _data_end(subs, last)
        evaluator = Evaluator(subs.churn_dates(inputs.renewal_gap_days), inputs.horizon_days,
                              end, set(subs.periods), inputs.policy)
        alerts: list[AlertSeen] = []
        writer = ScoresWriter(scores_out)
        try:
            for cp in replay(stream, subs, inputs.policy, since=inputs.since, end=end,
                             alerts=alerts, progress=progress):
                evaluator.add(cp)
                writer.add(cp)
        finally:
            writer.close()
        report = evaluator.report(alerts, inputs.since)
        if native is not None:
            report.payloads_skipped = dict(native.skipped.most_common())
        return report
    finally:
        if native is not None:
            native.close()
        engine.close()


def _data_end(subs: Subscriptions, last_event: float | None) -> float:
    """The last moment the history speaks for: its latest event or subscription change."""
    moments = [t for periods in subs.periods.values() for start, end, _, _ in periods
               for t in (start, end) if t is not None]
    if last_event is not None:
        moments.append(last_event)
    return _day_end(max(moments)) if moments else 0.0
