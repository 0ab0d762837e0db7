"""`churnsignal calibrate`: fit the policy's signal weights, key events and band thresholds
from history.

History is replayed through the worker's core. At each daily checkpoint two groups of
candidate features are taken: the policy's own signals (their strengths, 0-1, as the score
uses them) and, for each of the most frequent event types, its trend versus its baseline,
its active days and its volume. Two regularised logistic regressions follow, both trained on
earlier checkpoints and judged on later ones (never on the future):

1. on all candidates (standardised): which event types' declines precede churn. Strongest
   first, each is kept as one of the policy's ``usage.key_events`` (scored together by the
   ``key_event_decline`` signal) only if it improves a held-out later part of the training
   period;
2. on the policy's signals, key_event_decline included: its positive coefficients become
   the weights (scaled so that the fitted signals at full strength make 100). A signal the
   history cannot inform (fewer than ``MIN_SIGNAL_ACCOUNTS`` accounts of the training period
   ever had it, e.g. billing signals in a usage-only export) is left out of the fit and keeps
   the starting policy's weight (the shipped one unless ``--policy``): a fitted 0 would say
   "never matters" where the history only says "never seen". ``Calibration.kept_shipped``
   says which, and why.

Band thresholds are then chosen for a target share of account-days flagged. Only what was
known before ``--until`` is used, labels included; the last part of that period validates.
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from churnsignal.errors import ChurnsignalError
from churnsignal.offline.backtest import Inputs, merge_by_time, replay
from churnsignal.offline.history import DAY
from churnsignal.stream.policy import Policy
from churnsignal.stream.scoring import decline, signals, strength
from churnsignal.stream.state import DayUsage, day_of

# The terminal state is not a predictor: a cancelled account has churned already.
FEATURES = tuple(name for name in Policy().signals.__class__.model_fields if name != "canceled")
KEY = FEATURES.index("key_event_decline")
MIN_CHURNERS = 10
CANDIDATE_TYPES = 12  # most frequent event types tried as key events
TYPE_MIN_BASELINE = 0.25  # per day: below it an event type's trend is noise
MIN_GAIN = 0.002  # held-out ROC AUC a key event type must add to be kept
# Accounts of the training period that must have had a signal (strength > 0 on some day)
# for its weight to be fitted. As with MIN_CHURNERS: a coefficient from fewer would describe
# those few accounts, not the signal.
MIN_SIGNAL_ACCOUNTS = 10


class TooLittleData(ChurnsignalError):
    """Too few churners to fit weights that would not merely memorise them."""


def feature_row(state: Any, t: float, policy: Policy) -> list[float]:
    values = signals(state, t, policy)
    return [strength(getattr(policy.signals, name), values[name][0]) if name in values else 0.0
            for name in FEATURES]


class TypeCounts:
    """Daily counts of the candidate event types per account, fed as the replay reads."""

    def __init__(self, types: list[str], policy: Policy) -> None:
        self.types = types
        self.index = {t.lower(): i for i, t in enumerate(types)}
        self.days: dict[str, dict[int, list[int]]] = defaultdict(dict)
        w = policy.windows
        self.short, self.baseline = w.short_days, w.baseline_days
        self.keep = w.short_days + w.baseline_days

    def feed(self, days: Iterable[DayUsage]) -> Iterator[DayUsage]:
        for usage in days:
            yield usage
            # Counted only once the replay asks for the next item: the checkpoints this
            # day closed were taken without it, as the worker would have scored them.
            counts: list[int] | None = None
            for name, count, _, _ in usage.kinds:
                i = self.index.get(name.lower())
                if i is not None:
                    if counts is None:
                        counts = self.days[usage.account_id].setdefault(
                            day_of(usage.occurred_at.timestamp()), [0] * len(self.types))
                    counts[i] += count

    def windows(self, account: str, t: float) -> tuple[list[float], list[float], list[int]]:
        """Per type: recent total, baseline total, and active days in the recent window
        (the same windows as the score's usage_decline)."""
        today = day_of(t)
        short_first = today - self.short + 1
        base_first = short_first - self.baseline
        n = len(self.types)
        recent, base, active = [0.0] * n, [0.0] * n, [0] * n
        days = self.days.get(account, {})
        for day in [d for d in days if d < base_first]:  # bounded: the windows only
            del days[day]
        for day, counts in days.items():
            if day >= short_first:
                for i, c in enumerate(counts):
                    recent[i] += c
                    active[i] += c > 0
            elif day >= base_first:
                for i, c in enumerate(counts):
                    base[i] += c
        return recent, base, active


def _decline(recent: float, base: float, short: int, baseline: int, min_per_day: float) -> float:
    """The score's decline on window totals (0 where the score would not judge it)."""
    return decline(recent / short, base / baseline, min_per_day) or 0.0


@dataclass(slots=True)
class Row:
    """One checkpoint's features. Arrays, not lists: a year of tens of thousands of accounts
    is millions of rows, and a list of floats costs four times the memory."""

    t: float
    account: int  # index of the account, to count the accounts a signal was seen in
    signals: array[float]
    label: int
    score: float
    recent: array[float]
    base: array[float]
    active: array[int]


@dataclass
class Calibration:
    policy: Policy
    train_rows: int
    validation_rows: int
    train_churners: int
    auc_before: float
    auc_after: float
    pr_auc_before: float
    pr_auc_after: float
    weights: dict[str, float]
    key_events: list[str] = field(default_factory=list)
    # standardised coefficient of each candidate type's decline (positive: precedes churn)
    type_decline_coefficients: dict[str, float] = field(default_factory=dict)
    # signals whose weight was not fitted but kept from the starting policy -> why
    kept_shipped: dict[str, str] = field(default_factory=dict)


def calibrate(inputs: Inputs, until: float, *, target_high_share: float = 0.03,
              validation_share: float = 0.3,
              progress: Callable[[float], None] | None = None) -> Calibration:
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    from churnsignal.offline import history

    base = inputs.policy
    w = base.windows
    horizon = inputs.horizon_days * DAY
    engine = history.Engine()
    try:
        if inputs.subscriptions is None:
            raise history.HistoryError("--subscriptions is needed to know who churned")
        events_path = Path(inputs.events)
        subs = history.read_subscriptions(engine, inputs.subscriptions)
        # Nothing after --until: neither events, nor the subscriptions' ends (the labels).
        for account, periods in subs.periods.items():
            subs.periods[account] = [(s, e if e is not None and e <= until else None, m, p)
                                     for s, e, m, p in periods if s <= until]
        churn = subs.churn_dates(inputs.renewal_gap_days)
        counts = TypeCounts(history.top_event_types(engine, events_path, until,
                                                    CANDIDATE_TYPES), base)
        stream = merge_by_time(
            counts.feed(history.warehouse_days(engine, events_path, base, until)),
            history.subscription_events(subs))
        rows: list[Row] = []
        churners: dict[float, set[str]] = {}
        account_index: dict[str, int] = {}
        for cp in replay(stream, subs, base, end=until, progress=progress):
            if cp.as_of + horizon > until or cp.account_id not in subs.periods:
                continue
            label = int(any(cp.as_of < d <= cp.as_of + horizon
                            for d in churn.get(cp.account_id, ())))
            recent, base_counts, active = counts.windows(cp.account_id, cp.as_of)
            index = account_index.setdefault(cp.account_id, len(account_index))
            rows.append(Row(cp.as_of, index, array("f", feature_row(cp.state, cp.as_of, base)),
                            label, cp.score, array("f", recent), array("f", base_counts),
                            array("H", active)))
            if label:
                churners.setdefault(cp.as_of, set()).add(cp.account_id)
    finally:
        engine.close()
    if not rows:
        raise TooLittleData("no checkpoint before --until has a complete horizon")
    times = sorted({r.t for r in rows})
    split = times[int(len(times) * (1 - validation_share))]
    train = [r for r in rows if r.t < split]
    valid = [r for r in rows if r.t >= split]
    train_churners = len({a for t, accts in churners.items() if t < split for a in accts})
    valid_pos = sum(r.label for r in valid)
    if train_churners < MIN_CHURNERS or valid_pos == 0 or valid_pos == len(valid):
        raise TooLittleData(
            f"only {train_churners} accounts churned in the training period (need "
            f"{MIN_CHURNERS}) or the validation period has no churn to check against; "
            "no policy written: fitting weights on so few would describe those accounts, "
            "not churn. Use a longer history or a later --until.")
    y_train = np.array([r.label for r in train])

    # 1. Which event types' declines precede churn, next to everything else we know.
    types = counts.types
    key_signal = base.signals.key_event_decline

    def type_features(r: Row) -> list[float]:
        declines = [strength(key_signal, _decline(r.recent[i], r.base[i], w.short_days,
                                                  w.baseline_days, TYPE_MIN_BASELINE))
                    for i in range(len(types))]
        return [*r.signals, *declines, *(a / w.short_days for a in r.active),
                *(math.log1p(x / w.short_days) for x in r.recent)]

    coefficients: dict[str, float] = {}
    if types:
        x1 = np.array([type_features(r) for r in train])
        coef = _fit(x1, y_train, standardise=True)
        first = len(FEATURES)
        coefficients = {t: round(float(coef[first + i]), 3) for i, t in enumerate(types)}

    # 2. The policy's signals, key_event_decline over a set of key types included.
    def policy_features(r: Row, key_index: list[int]) -> list[float]:
        row = list(r.signals)
        # Without key types the written policy names no key events, so the signal is off
        # there: the starting policy's own key events must not be fitted either.
        row[KEY] = strength(key_signal, _decline(
            sum(r.recent[i] for i in key_index), sum(r.base[i] for i in key_index),
            w.short_days, w.baseline_days, base.limits.min_baseline_per_day)) if key_index else 0.0
        return row

    def uninformed(x: Any, accounts: Any, key_index: list[int]) -> dict[str, str]:
        """The signals too few accounts of ``x`` had for a weight to be fitted -> why."""
        kept: dict[str, str] = {}
        for j, name in enumerate(FEATURES):
            seen = int(np.unique(accounts[x[:, j] > 0]).size)
            if name == "key_event_decline" and not key_index:
                kept[name] = "no event type's decline was chosen as a key event"
            elif seen == 0:
                kept[name] = "no account in the training period had it"
            elif seen < MIN_SIGNAL_ACCOUNTS:
                kept[name] = (f"only {seen} account(s) in the training period had it "
                              f"(fitting needs {MIN_SIGNAL_ACCOUNTS})")
        return kept

    def fit_weights(data: list[Row], key_index: list[int]
                    ) -> tuple[dict[str, float], dict[str, str]] | None:
        """Weights (fitted, or kept where the data cannot inform them) and the kept ones."""
        y = np.array([r.label for r in data])
        if y.min() == y.max():
            return None
        x = np.array([policy_features(r, key_index) for r in data])
        kept = uninformed(x, np.array([r.account for r in data]), key_index)
        fitted = [j for j, name in enumerate(FEATURES) if name not in kept]
        if not fitted:
            return None
        coef = _fit(x[:, fitted], y, standardise=False)
        raw = {FEATURES[j]: max(0.0, float(c)) for j, c in zip(fitted, coef, strict=True)}
        total = sum(raw.values())
        if total <= 0:
            return None
        weights = {name: round(min(100.0, 100.0 * c / total), 2) for name, c in raw.items()}
        weights.update({name: getattr(base.signals, name).weight for name in kept})
        return {name: weights[name] for name in FEATURES}, kept

    def scores_with(ws: dict[str, float], data: list[Row], key_index: list[int]) -> Any:
        vector = np.array([ws[name] for name in FEATURES])
        return np.minimum(100.0, np.array([policy_features(r, key_index) for r in data])
                          @ vector)

    # Key types, greedily, strongest decline coefficient first: a type is kept only if the
    # policy it makes ranks a held-out later part of the training period better.
    inner_split = times[int(len(times) * (1 - validation_share) ** 2)]
    inner_train = [r for r in train if r.t < inner_split]
    inner_valid = [r for r in train if r.t >= inner_split]

    def inner_auc(key_index: list[int]) -> float:
        fitted = fit_weights(inner_train, key_index)
        labels = [r.label for r in inner_valid]
        if fitted is None or min(labels) == max(labels):
            return 0.0
        return float(roc_auc_score(labels, scores_with(fitted[0], inner_valid, key_index)))

    key_index: list[int] = []
    best = inner_auc(key_index)
    for name, c in sorted(coefficients.items(), key=lambda kv: -kv[1]):
        if c <= 0:
            break
        trial = inner_auc([*key_index, types.index(name)])
        if trial > best + MIN_GAIN:
            key_index, best = [*key_index, types.index(name)], trial
    key_events = sorted(types[i] for i in key_index)

    fitted = fit_weights(train, key_index)
    if fitted is None:
        raise TooLittleData("no signal predicts churn in this history; no policy written")
    weights, kept = fitted

    train_scores = scores_with(weights, train, key_index)
    high = float(np.quantile(train_scores, 1 - target_high_share))
    critical = float(np.quantile(train_scores, 1 - target_high_share / 3))
    medium = float(np.quantile(train_scores, 1 - target_high_share * 3))
    medium, high, critical = _ordered(medium, high, critical)
    signals_update = {name: getattr(base.signals, name).model_copy(
        update={"weight": weights[name]}) for name in FEATURES}
    policy = base.model_copy(update={
        "version": f"calibrated-{len(train)}-{len(valid)}",
        "signals": base.signals.model_copy(update=signals_update),
        "usage": base.usage.model_validate({"key_events": key_events}),
        "thresholds": base.thresholds.model_copy(update={
            "medium": medium, "high": high, "critical": critical}),
    })
    y_valid = np.array([r.label for r in valid])
    before = np.array([r.score for r in valid])
    after = scores_with(weights, valid, key_index)
    return Calibration(policy, len(train), len(valid), train_churners,
                       float(roc_auc_score(y_valid, before)),
                       float(roc_auc_score(y_valid, after)),
                       float(average_precision_score(y_valid, before)),
                       float(average_precision_score(y_valid, after)), weights, key_events,
                       coefficients, kept)


def _fit(x: Any, y: Any, *, standardise: bool) -> Any:
    """L2-regularised logistic regression coefficients (per unit of the standardised
    feature when ``standardise``, so that they compare across features)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    if standardise:
        spread = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    model.fit(x, y)
    return model.coef_[0]


def _ordered(medium: float, high: float, critical: float) -> tuple[float, float, float]:
    """Strictly increasing thresholds inside (0, 100]."""
    medium = round(min(max(medium, 1.0), 97.0), 1)
    high = round(min(max(high, medium + 1), 98.0), 1)
    critical = round(min(max(critical, high + 1), 100.0), 1)
    return medium, high, critical


def kept_notes(kept: dict[str, str], policy: Policy) -> list[str]:
    """One line per signal whose weight the history could not inform, for the report."""
    return [f"{name}: kept weight {getattr(policy.signals, name).weight:g} from the starting "
            f"policy, not fitted: {why}" for name, why in kept.items()]


def write_policy(policy: Policy, path: Path, kept: dict[str, str] | None = None) -> None:
    """The policy as YAML; ``kept`` (Calibration.kept_shipped) is noted in its header, so
    whoever reads the file sees which weights the history did not set."""
    notes = "".join(f"# {line}\n" for line in kept_notes(kept or {}, policy))
    data = policy.model_dump(mode="json")
    path.write_text("# Written by `churnsignal calibrate`; the worker loads it unchanged\n"
                    "# (CHURNSIGNAL_POLICY_FILE).\n" + notes
                    + yaml.safe_dump(data, sort_keys=False))
