"""`churnsignal calibrate`: fit the policy's churn model and its band thresholds on a company's
own history, and say honestly how it compares with the simplest alternatives.

Only what was known before ``--until`` is used, labels included (a subscription that ends
after it has not ended yet). The steps:

1. Read what the backtest reads: warehouse exports (CSV, TSV, Parquet; ``--subscriptions``
   says who churned), native Stripe / Segment / Zendesk / canonical JSONL and ``kafka:``
   topic ranges (subscriptions from their billing events unless a file is given).
2. Tracked event types: the most used usage names before ``--until`` (up to
   ``event_types``, 8 by default) become ``model.event_types``. The history is replayed
   with a policy that tracks them (a placeholder model), so every state carries their day
   columns exactly as the worker's will under the written policy.
3. Rows: one per subscribed account and daily checkpoint whose horizon ends before
   ``--until`` (past ``max_rows``, every k-th day of each account, at a phase fixed by the
   account's name: deterministic, and said in the notes). Features: ``stream.features``'
   values, transformed as the model will transform them; label: churned within the horizon.
4. Time split: the last ``validation_share`` of the checkpoint days validate. Training rows
   are those whose label was known when validation starts (an embargo of one horizon), so
   no training label looks into the validation period. Features that fewer than
   ``MIN_SIGNAL_ACCOUNTS`` training accounts had (zero variance included) are dropped, and
   the report says which and why. An L2-regularised logistic regression on the standardised
   features (means and scales of the training rows) is fitted for each C of ``C_GRID``;
   the strongest regularisation whose validation ROC AUC is within one standard error
   (bootstrap over accounts) of the best is chosen (the one-standard-error rule),
   and that fit, Platt-scaled on the validation rows, gives the report's figures that need
   labels (the comparison, the bands' precision): it never saw those days.
   The written model is then refitted with that C on every row (training, embargo and
   validation: the latest behaviour matters, and out of time the refit ranked better on
   every synthetic history tried), standardised on all of them, and Platt-scaled on the
   validation rows (``Model.calibration``), so the score 0-100 is a probability of churn
   within the horizon calibrated to the latest period. The report's ranking figures are thus
   an honest estimate for the written model, not its own in-sample figures.
5. Comparison on the validation rows, with ``evaluation.compare``: the model against the
   baselines (30-day events, 30-day active days, the default policy; and the starting
   policy when it is another rules policy). A model that does not beat the best baseline's
   ROC AUC is refused (``NotBetterThanBaseline``, with by how much and a likely why) unless
   ``force``.
6. Bands, on the written model's validation scores: ``high`` flags as many account-days
   as the lowest threshold whose precision (by the training fit) reaches
   ``target_precision``, or is the lowest that escalates at most ``alert_budget`` accounts
   per 100 per week, or (default) flags ``target_high_share`` of account-days.
   ``critical`` flags the riskiest third of what ``high`` flags, ``medium`` three times as
   many account-days (as the rules' calibration did). Precision needs labels the refit has
   seen, so it is the training fit's on as many of its riskiest account-days; alert volume
   needs none and is the written model's own, estimated by replaying the bands' hysteresis
   over its scores, immediate rules lifting to the paging band as in stream.alerts
   (cooldown ignored: with daily checkpoints it never binds).
7. The written policy is the starting policy + the model + the thresholds + a version. Rule
   weights are kept (the model scores; the rules still decide a cancellation, a scheduled
   cancellation and exhausted retries at once, stream.model); the signals whose every model
   feature the history could not inform are listed in ``kept_shipped``, with why.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from churnsignal.errors import ChurnsignalError
from churnsignal.offline.backtest import Inputs, is_native, load_native, merge_by_time, replay
from churnsignal.offline.evaluation import BASELINES, SCORE, Baselines, Comparison, Scored, compare
from churnsignal.offline.history import DAY, Subscriptions
from churnsignal.stream.features import TRANSFORMS, Feature, catalogue, values
from churnsignal.stream.policy import BANDS, Model, Policy
from churnsignal.stream.reasons import IMMEDIATE
from churnsignal.stream.scoring import score, signals
from churnsignal.stream.state import AccountState, open_failures

EVENT_TYPES = 8  # most used usage names tracked per day (Model allows up to 32)
# Inverse L2 strength (sklearn's C: the penalty is 1 / (2C) of the squared coefficients
# against the summed log loss), on standardised features. Account-days of one account are
# much alike, so histories of a few hundred accounts want the strong end.
C_GRID = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
VALIDATION_SHARE = 0.3
MAX_ROWS = 400_000  # account-days kept for fitting (past it, every k-th day per account)
MIN_CHURNERS = 10
# Accounts of the training period that must have had a feature (a value other than the
# common one) for it to be fitted: a coefficient from fewer would describe those accounts.
MIN_SIGNAL_ACCOUNTS = 10
MIN_FLAGGED = 20  # account-days a precision is judged on, at least
WARMUP_DAYS = 30  # bands replayed before validation starts, so its first day is not a flood
MIN_SLOPE = 0.01  # Platt slope floor: a model that ranks backwards is refused, not flipped
RULES = tuple(name for name in Policy().signals.__class__.model_fields if name != "canceled")
STARTING = "starting_policy"
NAMES = {SCORE: "calibrated model", **BASELINES, STARTING: "starting policy"}


class TooLittleData(ChurnsignalError):
    """Too few churners to fit a model that would not merely memorise them."""


class NotBetterThanBaseline(ChurnsignalError):
    """The fitted model does not beat the best baseline on validation (``calibration`` holds
    the whole report, for printing)."""

    def __init__(self, message: str, calibration: Calibration) -> None:
        super().__init__(message)
        self.calibration = calibration


@dataclass
class Coefficient:
    feature: str
    coefficient: float  # per standard deviation of the transformed feature
    code: str  # the reason code its contribution counts toward


@dataclass
class BandFigures:
    band: str
    threshold: float
    # churn within the horizon among as many validation account-days as the band flags, the
    # riskiest by the training fit (the written model was refitted on those labels)
    precision: float | None
    share: float  # of validation account-days at this band or above (the written model's)
    # escalations per 100 accounts per week if this band were the lowest that pages
    alerts_per_100_per_week: float | None
    pages: bool  # it is the policy's lowest paging band (alerting.min_band)


@dataclass
class Calibration:
    policy: Policy
    train_rows: int
    validation_rows: int
    fitted_rows: int  # the written model's: every row (training, embargo, validation)
    train_churners: int
    validation_churners: int
    event_types: list[str]
    c: float  # the chosen C
    c_auc: dict[float, float]  # validation ROC AUC of each C tried
    train_auc: float  # the training fit's ROC AUC on its own rows
    features: list[str]  # the model's (kept) features
    dropped: dict[str, str]  # feature -> why it was not fitted
    coefficients: list[Coefficient]  # strongest first
    comparison: Comparison  # validation: the model ("score") and the baselines
    bands: list[BandFigures]
    band_rule: str  # how ``high`` was chosen
    weights: dict[str, float]  # the rule weights written (all kept from the starting policy)
    # rule signals no model feature could learn from this history -> why
    kept_shipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stride: int = 1  # 1: every checkpoint; k: every k-th day of each account
    refusal: str | None = None  # why the model should not be written (it does not beat...)

    @property
    def auc_after(self) -> float:
        return self.comparison.systems[SCORE].roc_auc or 0.0

    @property
    def pr_auc_after(self) -> float:
        return self.comparison.systems[SCORE].pr_auc or 0.0

    @property
    def before(self) -> str:
        """The rules policy the model replaces: the starting one, else the default."""
        return STARTING if STARTING in self.comparison.systems else "default_policy"

    @property
    def auc_before(self) -> float:
        return self.comparison.systems[self.before].roc_auc or 0.0

    @property
    def pr_auc_before(self) -> float:
        return self.comparison.systems[self.before].pr_auc or 0.0


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class _History:
    stream: Iterable[Any]
    subs: Subscriptions
    types: list[str]


def _known_by(subs: Subscriptions, until: float) -> None:
    """Subscription periods as known at ``until``: later starts unknown, later ends not yet."""
    for account, periods in list(subs.periods.items()):
        subs.periods[account] = [(s, e if e is not None and e <= until else None, m, p)
                                 for s, e, m, p in periods if s <= until]
        if not subs.periods[account]:
            del subs.periods[account]


def _lower_unique(names: Iterable[str], limit: int) -> list[str]:
    # The state's columns match names case-insensitively: "Export" and "export" are one.
    out: list[str] = []
    for name in names:
        if name.lower() not in out and len(out) < limit:
            out.append(name.lower())
    return out


@contextmanager
def _history(inputs: Inputs, until: float, n_types: int) -> Iterator[_History]:
    from churnsignal.offline import history

    engine = history.Engine()
    native = None
    try:
        if is_native(inputs.events):
            native = load_native(inputs)
            subs = (history.read_subscriptions(engine, inputs.subscriptions)
                    if inputs.subscriptions else native.subscriptions())
            _known_by(subs, until)
            events: Iterable[Any] = (e for e in native.events()
                                     if e.occurred_at.timestamp() <= until)
            if inputs.subscriptions:
                events = merge_by_time(events, history.subscription_events(subs))
            yield _History(events, subs, native.top_usage_names(until, n_types))
        else:
            if inputs.subscriptions is None:
                raise history.HistoryError("--subscriptions is needed with a warehouse export "
                                           "(it says who churned, and when)")
            path = Path(inputs.events)
            subs = history.read_subscriptions(engine, inputs.subscriptions)
            _known_by(subs, until)
            types = _lower_unique(history.top_event_types(engine, path, until, 2 * n_types),
                                  n_types)
            stream = merge_by_time(history.warehouse_days(engine, path, inputs.policy, until),
                                   history.subscription_events(subs))
            yield _History(stream, subs, types)
    finally:
        if native is not None:
            native.close()
        engine.close()


# ---- rows ------------------------------------------------------------------------------------


class _Rows:
    """Checkpoint rows in compact arrays (features as float32: a year of thousands of accounts
    is millions of account-days). Past ``max_rows`` the stride doubles: an account's row is
    kept when (day + phase) % stride == 0, the phase fixed by its name, so the rows kept are
    the same in every run and each doubling keeps a subset of the rows already kept."""

    def __init__(self, width: int, systems: int, max_rows: int) -> None:
        self.width, self.systems, self.max_rows = width, systems, max_rows
        self.x, self.others = array("f"), array("f")
        self.day, self.account, self.label, self.rule = array("i"), array("I"), array("b"), \
            array("b")
        self.codes: dict[str, int] = {}
        self.phases = array("I")
        self.stride = 1

    def __len__(self) -> int:
        return len(self.label)

    def wanted(self, account: str, day: int) -> int | None:
        """The account's code if its row of ``day`` is to be kept."""
        code = self.codes.get(account)
        if code is None:
            code = self.codes[account] = len(self.codes)
            self.phases.append(zlib.crc32(account.encode()))
        return code if (day + self.phases[code]) % self.stride == 0 else None

    def add(self, code: int, day: int, x: list[float], others: Iterable[float], label: bool,
            rule: int) -> None:
        self.x.extend(x)
        self.others.extend(others)
        self.day.append(day)
        self.account.append(code)
        self.label.append(1 if label else 0)
        self.rule.append(rule)
        if len(self.label) > self.max_rows:
            self._thin()

    def _thin(self) -> None:
        import numpy as np

        self.stride *= 2
        phase = np.frombuffer(self.phases, np.uint32).astype(np.int64)
        account = np.frombuffer(self.account, np.uint32)
        keep = (np.frombuffer(self.day, np.int32).astype(np.int64) + phase[account]) \
            % self.stride == 0
        for name, width in (("x", self.width), ("others", self.systems), ("day", 1),
                            ("account", 1), ("label", 1), ("rule", 1)):
            old: array[Any] = getattr(self, name)
            kept = np.frombuffer(old, np.dtype(old.typecode)).reshape(-1, width)[keep]
            setattr(self, name, array(old.typecode, kept.tobytes()))


def _rule(state: AccountState, now: float, policy: Policy) -> int:
    """2: cancelled (the model scores 100); 1: a rule that pages at once applies; else 0."""
    if state.sub_status == "canceled":
        return 2
    if state.cancel_at_period_end or open_failures(state, now) or \
            state.sub_status in ("past_due", "unpaid"):
        return 1 if IMMEDIATE & signals(state, now, policy).keys() else 0
    return 0


def _placeholder(types: list[str], horizon_days: int) -> Model:
    """A model that tracks ``types`` and scores nothing: the replay's states then carry the
    per-type columns the written policy's worker will keep."""
    return Model(horizon_days=horizon_days, event_types=types, features=["events_28d"],
                 transforms=["log1p"], means=[0.0], scales=[1.0], coefficients=[0.0],
                 intercept=0.0)


# ---- fitting ---------------------------------------------------------------------------------


def calibrate(inputs: Inputs, until: float, *, target_high_share: float = 0.03,
              target_precision: float | None = None, alert_budget: float | None = None,
              force: bool = False, event_types: int = EVENT_TYPES,
              validation_share: float = VALIDATION_SHARE, max_rows: int = MAX_ROWS,
              progress: Callable[[float], None] | None = None) -> Calibration:
    """Fit the model and thresholds (module docstring); raises TooLittleData, and
    NotBetterThanBaseline unless ``force``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    if target_precision is not None and alert_budget is not None:
        raise ChurnsignalError("choose --target-precision or --alert-budget, not both")
    if not 1 <= inputs.horizon_days <= 365:
        raise ChurnsignalError("--horizon-days must be between 1 and 365")
    base = inputs.policy
    horizon_days = inputs.horizon_days
    horizon = horizon_days * DAY
    starting = base.model is None and base != Policy()
    baselines = Baselines()
    systems = (*baselines.names, *((STARTING,) if starting else ()))
    with _history(inputs, until, min(event_types, 32)) as hist:
        types = hist.types
        feats = catalogue(types)
        replay_policy = base.model_copy(update={"model": _placeholder(types, horizon_days)})
        churn = hist.subs.churn_dates(inputs.renewal_gap_days)
        transforms = [TRANSFORMS[f.transform] for f in feats]
        rows = _Rows(len(feats), len(systems), max_rows)
        for cp in replay(hist.stream, hist.subs, replay_policy, end=until, progress=progress):
            if cp.as_of + horizon > until or cp.account_id not in hist.subs.periods:
                continue
            cp_day = int(cp.as_of // DAY)
            code = rows.wanted(cp.account_id, cp_day)
            if code is None:
                continue
            raw = values(cp.state, cp.as_of, replay_policy)
            row = [t(raw.get(f.name, 0.0)) for f, t in zip(feats, transforms, strict=True)]
            others = list(baselines(cp.state, cp.as_of))
            if starting:
                others.append(score(cp.state, cp.as_of, base).score)
            label = any(cp.as_of < d <= cp.as_of + horizon for d in churn.get(cp.account_id, ()))
            rows.add(code, cp_day, row, others, label, _rule(cp.state, cp.as_of, replay_policy))
    if not len(rows):
        raise TooLittleData("no checkpoint before --until has a complete horizon; no policy "
                            "written. Use a longer history or a later --until.")

    x_all = np.frombuffer(rows.x, np.float32).reshape(-1, len(feats)).astype(np.float64)
    other = np.frombuffer(rows.others, np.float32).reshape(-1, len(systems)).astype(np.float64)
    day = np.frombuffer(rows.day, np.int32).astype(np.int64)
    account = np.frombuffer(rows.account, np.uint32).astype(np.int64)
    y = np.frombuffer(rows.label, np.int8).astype(bool)
    rule = np.frombuffer(rows.rule, np.int8)
    days = np.unique(day)
    split = int(days[min(len(days) - 1, int(len(days) * (1 - validation_share)))])
    valid = day >= split
    train = day + horizon_days <= split  # labels known when validation starts
    train_churners = int(np.unique(account[train & y]).size)
    valid_pos = int(y[valid].sum())
    if train_churners < MIN_CHURNERS or valid_pos == 0 or valid_pos == int(valid.sum()):
        raise TooLittleData(
            f"only {train_churners} accounts churned in the training period (need "
            f"{MIN_CHURNERS}) or the validation period has no churn to check against; "
            "no policy written: fitting a model on so few would describe those accounts, "
            "not churn. Use a longer history or a later --until.")

    kept, dropped = _screen(x_all[train], account[train], feats)
    if not kept:
        raise TooLittleData("no feature varies across enough accounts of the training "
                            "period; no policy written")
    x = x_all[:, kept]
    # The honest fit: standardised and fitted on the training rows, C chosen and the
    # probability calibrated on the validation rows. Its validation scores give the report's
    # figures that need labels (comparison, precision), as estimates for the written model.
    means, scales = _standard(x[train])
    z = (x - means) / scales
    fit, c, c_auc = _fit(z[train], y[train], z[valid], y[valid], account[valid])
    logit = fit.intercept_[0] + z @ fit.coef_[0]
    scores = _scores(logit, _platt(logit[valid], y[valid], backwards=(1.0, 0.0)), rule)
    train_auc = float(roc_auc_score(y[train], logit[train]))
    comparison = compare(Scored(account[valid], y[valid], {
        SCORE: scores[valid], **{s: other[valid, i] for i, s in enumerate(systems)}}),
        SCORE, names=NAMES)
    # The written model: the same features and C refitted on every row (the validation
    # period is the most recent behaviour; measured out of time, the refit ranks better than
    # the training fit), then calibrated on the validation rows.
    means, scales = _standard(x)
    z = (x - means) / scales
    final = LogisticRegression(C=c, max_iter=2000).fit(z, y)
    coef, intercept = final.coef_[0], float(final.intercept_[0])
    slope, offset = _platt((intercept + z @ coef)[valid], y[valid], backwards=None)
    names = [feats[j].name for j in kept]
    model = Model(horizon_days=horizon_days, event_types=types, features=names,
                  transforms=[feats[j].transform for j in kept],
                  means=[float(v) for v in means], scales=[float(v) for v in scales],
                  coefficients=[float(v) for v in coef], intercept=intercept,
                  calibration=(slope, offset))

    # Bands on the written model's validation scores; what needs labels (precision) is the
    # training fit's at the same share of account-days flagged (the refit saw those labels),
    # alert volume needs none and is the written model's own.
    written = _scores(intercept + z @ coef, (slope, offset), rule)
    alerts = _Alerts(written, account, day, rule, split, rows.stride, base)
    high, band_rule, notes = _high(written[valid], scores[valid], y[valid], alerts,
                                   target_high_share, target_precision, alert_budget)
    medium, high, critical = _derived(high, written[valid])
    if rows.stride > 1:
        notes.insert(0, f"rows: every {rows.stride}th day of each account (more than "
                        f"{max_rows:,} account-days); the alert volume is estimated on them")
    policy = base.model_copy(update={
        "version": f"calibrated-{_date(until)}",
        "model": model,
        "thresholds": base.thresholds.model_copy(update={
            "medium": medium, "high": high, "critical": critical}),
    })
    bands = _band_figures(policy, written[valid], scores[valid], y[valid], alerts)
    coefficients = sorted((Coefficient(feats[j].name, round(float(w), 4), feats[j].code)
                           for j, w in zip(kept, coef, strict=True)),
                          key=lambda co: (-abs(co.coefficient), co.feature))
    result = Calibration(
        policy=policy, train_rows=int(train.sum()), validation_rows=int(valid.sum()),
        fitted_rows=len(y), train_churners=train_churners,
        validation_churners=int(np.unique(account[valid & y]).size), event_types=types,
        c=c, c_auc=c_auc, train_auc=train_auc, features=names, dropped=dropped,
        coefficients=coefficients, comparison=comparison, bands=bands, band_rule=band_rule,
        weights={name: getattr(base.signals, name).weight for name in RULES},
        kept_shipped=_uninformed(feats, dropped), notes=notes, stride=rows.stride)
    result.refusal = _refusal(result)
    if result.refusal is not None and not force:
        raise NotBetterThanBaseline(result.refusal, result)
    return result


def _date(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).date().isoformat()


def _screen(x: Any, accounts: Any, feats: list[Feature]) -> tuple[list[int], dict[str, str]]:
    """Columns to fit, and why the others are not: too few training accounts had them."""
    import numpy as np

    kept: list[int] = []
    dropped: dict[str, str] = {}
    for j, f in enumerate(feats):
        common = float(np.median(x[:, j]))
        seen = int(np.unique(accounts[x[:, j] != common]).size)
        if seen == 0:
            absent = common == 0 or np.isclose(common, TRANSFORMS[f.transform](f.absent))
            dropped[f.name] = ("no account in the training period had it" if absent else
                               "the same value at every training checkpoint")
        elif seen < MIN_SIGNAL_ACCOUNTS:
            dropped[f.name] = (f"only {seen} account(s) in the training period had it "
                               f"(fitting needs {MIN_SIGNAL_ACCOUNTS})")
        else:
            kept.append(j)
    return kept, dropped


def _standard(x: Any) -> tuple[Any, Any]:
    """Means and scales (standard deviations; 1 where a column does not vary)."""
    import numpy as np

    scales = x.std(axis=0)
    return x.mean(axis=0), np.where(scales > 0, scales, 1.0)


def _scores(logit: Any, calibration: tuple[float, float], rule: Any) -> Any:
    """Scores 0-100 as the worker gives them (cancelled accounts: 100)."""
    import numpy as np

    slope, offset = calibration
    probability = 1.0 / (1.0 + np.exp(-np.clip(slope * logit + offset, -700, 700)))
    return np.where(rule == 2, 100.0, np.round(100.0 * probability, 1))


def _fit(z_train: Any, y_train: Any, z_valid: Any, y_valid: Any, accounts_valid: Any
         ) -> tuple[Any, float, dict[float, float]]:
    """The fit of the strongest regularisation whose validation ROC AUC is within one
    standard error of the best C's (the one-standard-error rule: a validation period of a
    few dozen churners cannot tell close Cs apart, and the simpler model carries better to
    the next months). The standard error is the best C's, by bootstrap over accounts."""
    from sklearn.linear_model import LogisticRegression

    fits: dict[float, Any] = {}
    decisions: dict[str, Any] = {}
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000)
        model.fit(z_train, y_train)
        fits[c] = model
        decisions[f"{c:g}"] = model.decision_function(z_valid)
    first = f"{C_GRID[0]:g}"
    figures = compare(Scored(accounts_valid, y_valid, decisions), first).systems
    aucs = {c: round(float(figures[f"{c:g}"].roc_auc or 0.0), 4) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (aucs[c], -c))
    ci = figures[f"{best:g}"].roc_auc_ci
    se = (ci[1] - ci[0]) / (2 * 1.96) if ci is not None else 0.0
    chosen = next(c for c in C_GRID if aucs[c] >= aucs[best] - se)  # ascending: strongest first
    return fits[chosen], chosen, aucs


def _platt(logit: Any, y: Any, backwards: tuple[float, float] | None
           ) -> tuple[float, float]:
    """Slope and offset mapping the logit to a calibrated probability on held-out rows.
    A model ranking them backwards (slope <= 0) gets ``backwards`` if given (the training
    fit: its comparison must show the backward ranking, not a flat score), else the floor
    slope (the written model, refused unless forced: never flipped)."""
    from sklearn.linear_model import LogisticRegression

    platt = LogisticRegression(C=1e6, max_iter=2000)
    platt.fit(logit.reshape(-1, 1), y)
    slope, offset = round(float(platt.coef_[0][0]), 6), round(float(platt.intercept_[0]), 6)
    if slope > 0:
        return slope, offset
    return backwards if backwards is not None else (MIN_SLOPE, offset)


def _uninformed(feats: list[Feature], dropped: dict[str, str]) -> dict[str, str]:
    """Rule signals whose every model feature was dropped (or that have none) -> why."""
    out: dict[str, str] = {}
    for name in RULES:
        mine = [f.name for f in feats if f.code == name]
        if not mine:
            out[name] = ("no event type is tracked" if name == "key_event_decline"
                         else "no feature of the model reads it")
        elif all(f in dropped for f in mine):
            out[name] = "; ".join(dict.fromkeys(dropped[f] for f in mine))
    return out


def _refusal(result: Calibration) -> str | None:
    c = result.comparison
    model = c.systems[SCORE].roc_auc
    if c.best_baseline is None or model is None or c.margin is None or c.margin > 0:
        return None
    best = c.best_baseline
    base = c.systems[best].roc_auc or 0.0
    interval = (f" (95% interval of the difference {c.margin_ci[0]:+.3f} to "
                f"{c.margin_ci[1]:+.3f})" if c.margin_ci else "")
    if result.train_auc - model > 0.05:
        why = (f"on its training rows it reached {result.train_auc:.3f}, so what it learnt "
               "there did not hold in the later period (too few churners to learn from, or "
               "churn changed)")
    else:
        why = (f"even on its training rows it reached only {result.train_auc:.3f}: what this "
               "history records says little about who churns beyond what "
               f"{NAMES.get(best, best)} already ranks by")
    return (f"not written: the calibrated model's validation ROC AUC {model:.3f} does not "
            f"beat the best baseline, {NAMES.get(best, best)} ({base:.3f}): "
            f"{c.margin:+.3f}{interval}. Why: {why}. --force writes it anyway.")


# ---- bands -----------------------------------------------------------------------------------


class _Alerts:
    """Escalation alerts a set of thresholds would send on the validation days, from the
    scores of every row (rows before validation warm the bands up and are not counted)."""

    def __init__(self, scores: Any, accounts: Any, days: Any, rule: Any, split: int,
                 stride: int, policy: Policy) -> None:
        import numpy as np

        near = days >= split - WARMUP_DAYS
        order = np.lexsort((days[near], accounts[near]))
        self.scores = scores[near][order].tolist()
        self.accounts = accounts[near][order].tolist()
        self.counted = (days[near][order] >= split).tolist()
        self.immediate = (rule[near][order] == 1).tolist()
        valid_days = days[days >= split]
        n_days = int(np.unique(valid_days).size)
        # mean accounts a day (a row stands for ``stride`` days of its account)
        self.per_day = len(valid_days) * stride / n_days if n_days else 0.0
        self.weeks = n_days / 7
        self.hysteresis = policy.alerting.hysteresis
        self.floor = BANDS.index(policy.alerting.min_band)

    def per_100_per_week(self, thresholds: tuple[float, float, float],
                         floor: int | None = None) -> float | None:
        if not self.per_day or not self.weeks:
            return None
        return self.count(thresholds, floor) / (self.per_day / 100) / self.weeks

    def count(self, thresholds: tuple[float, float, float], floor: int | None = None) -> int:
        """As stream.alerts.decide: escalate at once, de-escalate below threshold -
        hysteresis, page on rising to the floor band or above, immediate rules lift to it."""
        floor = self.floor if floor is None else floor
        levels = (0.0, *thresholds)
        medium, high, critical = thresholds
        hysteresis = self.hysteresis
        n = 0
        previous = -1
        band = alerted = 0
        for account, s, counted, immediate in zip(self.accounts, self.scores, self.counted,
                                                  self.immediate, strict=True):
            if account != previous:
                previous, band, alerted = account, 0, 0
            natural = 3 if s >= critical else 2 if s >= high else 1 if s >= medium else 0
            if immediate and natural < floor:
                natural = floor
            if natural >= band:
                band = natural
            else:
                while band > natural and s < levels[band] - hysteresis:
                    band -= 1
            if band > alerted and band >= floor:
                n += counted
                alerted = band
            elif band < alerted:
                alerted = band
        return n


def _high(scores: Any, honest: Any, y: Any, alerts: _Alerts, share: float,
          precision: float | None, budget: float | None) -> tuple[float, str, list[str]]:
    """The ``high`` threshold on ``scores`` (the written model's, on validation), how it was
    chosen, and notes. A target precision is met by the ``honest`` scores (the training
    fit's): high then flags as many account-days as the honest threshold did."""
    import numpy as np

    notes: list[str] = []
    if precision is not None:
        # at each threshold the written scores allow, the training fit's precision on as
        # many of its riskiest account-days
        hits = np.cumsum(y[np.argsort(-honest, kind="stable")])
        ranked = np.sort(scores)[::-1]
        ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last of each tie
        flagged = ends + 1
        reached = hits[ends] / flagged
        judged = flagged >= MIN_FLAGGED
        ok = np.flatnonzero(judged & (reached >= precision))
        rule = f"target precision {precision:.0%}"
        if len(ok):
            return float(ranked[ends[ok[-1]]]), rule, notes  # the lowest reaching it
        pool = np.flatnonzero(judged) if judged.any() else np.arange(len(ends))
        best = pool[np.argmax(reached[pool])]
        notes.append(f"no threshold reaches precision {precision:.0%} on validation (with at "
                     f"least {MIN_FLAGGED} account-days flagged); high is set where it is "
                     f"highest, {reached[best]:.0%}")
        return float(ranked[ends[best]]), rule + " (not reached)", notes
    if budget is not None:
        # the lowest high whose alert volume fits the budget (volume falls as high rises)
        candidates = np.unique(scores)
        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            volume = alerts.per_100_per_week(_derived(float(candidates[mid]), scores))
            if volume is not None and volume <= budget:
                hi = mid
            else:
                lo = mid + 1
        return float(candidates[lo]), f"alert budget {budget:g} per 100 accounts per week", notes
    return float(np.quantile(scores, 1 - share)), \
        f"{share:.1%} of account-days at high or above", notes


def _derived(high: float, scores: Any) -> tuple[float, float, float]:
    """medium, high, critical: critical flags the riskiest third of what high flags, medium
    three times as many account-days (strictly increasing, inside (0, 100])."""
    import numpy as np

    flagged = float(np.mean(scores >= high))
    critical = float(np.quantile(scores, 1 - flagged / 3))
    medium = float(np.quantile(scores, max(0.0, 1 - 3 * flagged)))
    return _ordered(min(medium, high), high, max(critical, high))


def _ordered(medium: float, high: float, critical: float) -> tuple[float, float, float]:
    """Strictly increasing thresholds inside (0, 100]."""
    medium = round(min(max(medium, 0.1), 97.0), 1)
    high = round(min(max(high, medium + 0.1), 98.0), 1)
    critical = round(min(max(critical, high + 0.1), 100.0), 1)
    return medium, high, critical


def _band_figures(policy: Policy, scores: Any, honest: Any, y: Any,
                  alerts: _Alerts) -> list[BandFigures]:
    """Per band: the share of validation account-days the written model puts there or
    above, the training fit's precision on as many of its riskiest, and the alert volume."""
    import numpy as np

    t = policy.thresholds
    thresholds = (t.medium, t.high, t.critical)
    riskiest = y[np.argsort(-honest, kind="stable")]
    out = []
    for i, band in enumerate(("medium", "high", "critical"), start=1):
        n = int((scores >= thresholds[i - 1]).sum())
        volume = alerts.per_100_per_week(thresholds, floor=i)
        out.append(BandFigures(band, thresholds[i - 1],
                               float(riskiest[:n].mean()) if n else None,
                               n / len(scores) if len(scores) else 0.0,
                               None if volume is None else round(volume, 3),
                               i == alerts.floor))
    return out


# ---- writing ---------------------------------------------------------------------------------


def kept_notes(kept: dict[str, str], policy: Policy) -> list[str]:
    """One line per rule signal the history could not inform, for the report."""
    return [f"{name}: kept weight {getattr(policy.signals, name).weight:g} from the starting "
            f"policy, not learnt: {why}" for name, why in kept.items()]


def summary(result: Calibration) -> list[str]:
    """A few lines on the fit and its validation, for the policy file's header."""
    c = result.comparison
    high = next(b for b in result.bands if b.band == "high")
    lines = [f"model: {len(result.features)} features, C={result.c:g}, validation ROC AUC "
             f"{result.auc_after:.3f} on {result.validation_rows:,} account-days",
             c.verdict]
    if high.precision is not None:
        lines.append(f"high >= {high.threshold:g}: precision {high.precision:.1%} on "
                     "validation, " + ("n/a" if high.alerts_per_100_per_week is None else
                                       f"{high.alerts_per_100_per_week:.2f}")
                     + " alerts per 100 accounts per week")
    return lines


def write_policy(policy: Policy, path: Path, kept: dict[str, str] | None = None,
                 notes: list[str] | None = None) -> None:
    """The policy as YAML; ``notes`` (``summary``) and ``kept`` (Calibration.kept_shipped) go
    in its header, so whoever reads the file sees how it did and what the history did not
    set."""
    lines = [*(notes or ()), *kept_notes(kept or {}, policy)]
    header = "".join(f"# {line}\n" for line in lines)
    data = policy.model_dump(mode="json")
    path.write_text("# Written by `churnsignal calibrate`; the worker loads it unchanged\n"
                    "# (CHURNSIGNAL_POLICY_FILE).\n" + header
                    + yaml.safe_dump(data, sort_keys=False))

