"""How well risk scores rank churners, compared with simple baselines on the same checkpoints.

Pure given its inputs: ``compare`` takes checkpoints scored by several systems (an account, a
churned-within-horizon label and one risk score per system; higher means riskier) and returns
ROC AUC, PR AUC (average precision), lift in the top decile and a decile table per system, with
bootstrap intervals that resample *accounts* (an account's checkpoints are correlated: resampling
checkpoints would give intervals far too narrow). The same seeded resamples serve every system,
so differences between systems are paired. The backtest and calibrate both call it.

The baselines are what a team could do without churnsignal (``Baselines``): rank accounts by
their usage events in the last 30 days, by their active days in the last 30 days (fewer means
riskier, so the risk score is minus the count), and by the shipped default policy.

Ties: a score shared by checkpoints on both sides of a decile boundary is shared between the
deciles pro rata — what a random tie-break gives on average — so a score that puts most
checkpoints at 0 is not credited with an order it does not have.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from churnsignal.stream.policy import Policy
from churnsignal.stream.scoring import score
from churnsignal.stream.state import SESSIONS, USAGE, AccountState, day_of

DAY = 86_400.0
SCORE = "score"  # the evaluated system's name in a comparison
BASELINES: dict[str, str] = {  # name -> how reports call it (short: a table's column)
    "events_30d": "events (30 d)",  # usage events in the last 30 days
    "active_days_30d": "active days (30 d)",  # days with usage in the last 30 days
    "default_policy": "default policy",  # the shipped rules, on the same state
}
TRAILING_DAYS = 30
RESAMPLES = 200
SEED = 15
LEVEL = 0.95
# Bootstrap cost is O(resamples x systems x checkpoints): past this many checkpoints the
# intervals use every k-th checkpoint of each account (every account kept); point figures
# always use all checkpoints.
MAX_BOOTSTRAP_POINTS = 250_000

F64 = npt.NDArray[np.float64]
Ints = npt.NDArray[np.integer[Any]]
Floats = npt.NDArray[np.floating[Any]]


# ---- the baselines ---------------------------------------------------------------------------


def _trailing(state: AccountState, as_of: float, days: int) -> tuple[int, int]:
    """Usage events and active days over the ``days`` whole days before ``as_of``."""
    first, last = day_of(as_of - days * DAY), day_of(as_of)
    # A checkpoint at midnight starts day ``last``: it has no events yet, and a day is counted
    # only once it began inside the window.
    if as_of - last * DAY > 0:
        first += 1
        last += 1
    events = active = 0
    for d, b in reversed(state.days.items()):  # days are in order: newest last
        if d >= last:
            continue  # after the checkpoint (a producer's clock running fast)
        if d < first:
            break
        events += b[USAGE]
        if b[USAGE] or b[SESSIONS]:
            active += 1
    return events, active


def trailing_events(state: AccountState, as_of: float, days: int = TRAILING_DAYS) -> int:
    return _trailing(state, as_of, days)[0]


def active_days(state: AccountState, as_of: float, days: int = TRAILING_DAYS) -> int:
    return _trailing(state, as_of, days)[1]


class Baselines:
    """The baselines' risk scores for one checkpoint's state, in ``BASELINES`` order.

    ``evaluated`` is the policy under test: when it is the default policy, the caller's own
    score is reused instead of scoring the state twice.
    """

    names: tuple[str, ...] = tuple(BASELINES)

    def __init__(self, evaluated: Policy | None = None, default: Policy | None = None) -> None:
        self.default = default if default is not None else Policy()
        self.same = evaluated is not None and evaluated == self.default

    def __call__(self, state: AccountState, as_of: float,
                 evaluated_score: float | None = None) -> tuple[float, float, float]:
        events, active = _trailing(state, as_of, TRAILING_DAYS)
        if self.same and evaluated_score is not None:
            shipped = evaluated_score
        else:
            shipped = score(state, as_of, self.default).score
        return -float(events), -float(active), shipped


# ---- scored checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """Checkpoints to evaluate: per checkpoint an account code (a non-negative int shared by
    the checkpoints of one account), a label (churned within the horizon) and a risk score
    per system (higher means riskier; any float dtype)."""

    accounts: Ints
    labels: npt.NDArray[np.bool_]
    scores: dict[str, Floats]

    @classmethod
    def of(cls, accounts: Sequence[Any], labels: Sequence[bool] | Sequence[int],
           scores: Mapping[str, Sequence[float]]) -> Scored:
        """From plain sequences; accounts may be any hashable ids."""
        codes: dict[Any, int] = {}
        acc = np.fromiter((codes.setdefault(a, len(codes)) for a in accounts), np.int64,
                          len(accounts))
        return cls(acc, np.asarray(labels, dtype=bool),
                   {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()})

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.accounts) != n or any(len(s) != n for s in self.scores.values()):
            raise ValueError("accounts, labels and every system's scores need one value per "
                             "checkpoint")
        for name, s in self.scores.items():
            if n and np.isnan(s).any():  # NaN would sort as the riskiest
                raise ValueError(f"{name}: NaN scores")


class Collector:
    """Checkpoints gathered one at a time in compact arrays: 4 bytes per account code and per
    system's score, 1 per label (a year of 20,000 accounts is millions of checkpoints)."""

    def __init__(self, systems: Sequence[str]) -> None:
        self.systems = tuple(systems)
        self._codes: dict[str, int] = {}
        self.accounts = array("I")
        self.labels = array("b")
        self.scores = {s: array("f") for s in self.systems}
        self._columns = [self.scores[s] for s in self.systems]

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, account: str, label: bool, scores: Sequence[float]) -> None:
        """``scores`` in ``systems`` order."""
        code = self._codes.get(account)
        if code is None:
            code = self._codes[account] = len(self._codes)
        self.accounts.append(code)
        self.labels.append(1 if label else 0)
        for column, value in zip(self._columns, scores, strict=True):
            column.append(value)

    def scored(self) -> Scored:
        """Views of the arrays, not copies (millions of checkpoints): while they live, the
        collector cannot grow (``add`` raises BufferError)."""
        return Scored(np.frombuffer(self.accounts, dtype=np.uint32),
                      np.frombuffer(self.labels, dtype=np.bool_),
                      {s: np.frombuffer(a, dtype=np.float32) for s, a in self.scores.items()})


# ---- figures ---------------------------------------------------------------------------------


@dataclass
class Decile:
    decile: int  # 1: the riskiest tenth of checkpoints
    checkpoints: float  # a tenth of all (fractional when not divisible by 10)
    churners: float  # positives; fractional where tied scores straddle a boundary
    churn_rate: float | None
    cumulative_recall: float | None  # share of all positives in this decile and riskier ones
    score_range: tuple[float, float] | None  # lowest and highest risk score in the decile
    # (baselines: minus the count)


@dataclass
class Figures:
    roc_auc: float | None
    pr_auc: float | None  # average precision, as sklearn computes it
    top_decile_lift: float | None  # churn rate in the riskiest 10 % / base rate
    roc_auc_ci: tuple[float, float] | None = None
    pr_auc_ci: tuple[float, float] | None = None
    top_decile_lift_ci: tuple[float, float] | None = None
    deciles: list[Decile] = field(default_factory=list)


@dataclass
class Comparison:
    primary: str  # the evaluated system
    systems: dict[str, Figures]  # primary first, then the others in the order given
    checkpoints: int
    accounts: int
    positives: int
    best: str | None  # best ROC AUC of all systems (None without both outcomes)
    best_baseline: str | None  # best ROC AUC among the others (those not identical to primary)
    margin: float | None  # primary's ROC AUC minus best_baseline's
    margin_ci: tuple[float, float] | None  # paired bootstrap interval of that difference
    share_resamples_better: float | None  # share of resamples where primary beat best_baseline
    resamples: int
    seed: int
    level: float
    stride: int  # 1: intervals used every checkpoint; k: every k-th of each account
    verdict: str  # one plain sentence: which is best by ROC AUC, and by how much
    identical: list[str] = field(default_factory=list)  # systems scoring exactly as primary
    resamples_ahead: tuple[int, int] | None = None  # (primary ahead in, of) resamples with figures

    @property
    def baselines(self) -> dict[str, Figures]:
        return {k: v for k, v in self.systems.items() if k != self.primary}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Ranked:
    """One system's checkpoints sorted riskiest first, and their groups of tied scores."""

    scores: Floats
    labels: F64  # 0 or 1
    accounts: Ints | None  # for the bootstrap's weights
    group: npt.NDArray[np.intp] | None  # group of each checkpoint; None: no ties at all
    groups_count: int

    @classmethod
    def of(cls, scores: Floats, labels: npt.NDArray[np.bool_],
           accounts: Ints | None = None) -> _Ranked:
        order = np.argsort(scores)[::-1]  # the order among ties does not matter
        s = scores[order]
        n = len(s)
        new = np.empty(n, dtype=bool)
        if n:
            new[0] = True
            np.not_equal(s[1:], s[:-1], out=new[1:])
        count = int(new.sum())
        group = np.cumsum(new, dtype=np.intp) - 1 if count < n else None
        return cls(s, labels[order].astype(np.float64),
                   None if accounts is None else accounts[order], group, count)

    def groups(self, weights: F64 | None = None) -> tuple[F64, F64]:
        """Positive and negative weight per group of tied scores, riskiest first (``weights``
        is overwritten)."""
        pos = self.labels if weights is None else np.multiply(weights, self.labels)
        if self.group is None:  # every checkpoint its own group
            return pos, (1.0 - self.labels if weights is None else
                         np.subtract(weights, pos, out=weights))
        # bincount, not add.reduceat: several times faster when most groups are small
        pos_g = self._sums(pos)
        return pos_g, self._sums(weights) - pos_g

    def _sums(self, weights: F64 | None) -> F64:
        assert self.group is not None
        sums = np.bincount(self.group, weights=weights, minlength=self.groups_count)
        return sums.astype(np.float64, copy=False)


def _dot(a: F64, b: F64) -> float:
    # numpy's own loop: BLAS's dot spins threads, slow on a busy machine for these sizes
    return float(np.einsum("i,i->", a, b))


def _figures(pos: F64, neg: F64, work: F64 | None = None) -> tuple[float, float, float] | None:
    """ROC AUC, average precision and top-decile lift from per-group weights (riskiest group
    first); None without both outcomes. A bootstrap runs it hundreds of times: few passes, into
    ``work`` (3 x len(pos)) when given, since fresh large arrays cost page faults each time."""
    p_total, n_total = float(pos.sum()), float(neg.sum())
    if p_total <= 0 or n_total <= 0:
        return None
    if work is None:
        work = np.empty((3, len(pos)))
    cum_p, cum_n, cum_w = work[0, :len(pos)], work[1, :len(pos)], work[2, :len(pos)]
    np.cumsum(pos, out=cum_p)
    np.cumsum(neg, out=cum_n)
    # Mann-Whitney: each positive beats the negatives below its group, and half its ties.
    roc = 1.0 - (_dot(pos, cum_n) - 0.5 * _dot(pos, neg)) / (p_total * n_total)
    np.add(cum_p, cum_n, out=cum_w)
    # where pos > 0, cum_w > 0; elsewhere the precision is multiplied by 0
    precision = np.divide(cum_p, np.maximum(cum_w, 1e-300, out=cum_n), out=cum_n)
    ap = _dot(pos, precision) / p_total
    total = p_total + n_total
    top = 0.1 * total
    i = min(int(np.searchsorted(cum_w, top)), len(cum_w) - 1)  # the group holding the cut
    w0, p0 = (float(cum_w[i - 1]), float(cum_p[i - 1])) if i else (0.0, 0.0)
    share = (top - w0) / (float(cum_w[i]) - w0) if cum_w[i] > w0 else 0.0
    top_p = p0 + share * (float(cum_p[i]) - p0)  # the cut's group shared pro rata
    lift = (top_p / top) / (p_total / total)
    return roc, ap, lift


def _deciles(ranked: _Ranked, pos: F64, neg: F64) -> list[Decile]:
    n = len(ranked.scores)
    if not n:
        return []
    p_total = float(pos.sum())
    cum_w, cum_p = np.r_[0.0, np.cumsum(pos + neg)], np.r_[0.0, np.cumsum(pos)]
    bounds = np.linspace(0.0, float(n), 11)
    at = np.interp(bounds, cum_w, cum_p)  # ties at a boundary shared pro rata
    out = []
    for k in range(10):
        churners = float(at[k + 1] - at[k])
        size = float(bounds[k + 1] - bounds[k])
        first = min(math.floor(bounds[k]), n - 1)  # riskiest first: the decile's highest
        last = min(max(math.ceil(bounds[k + 1]) - 1, first), n - 1)
        out.append(Decile(
            k + 1, size, churners, churners / size if size else None,
            float(at[k + 1]) / p_total if p_total else None,
            (float(ranked.scores[last]), float(ranked.scores[first]))))
    return out


def _subsample(accounts: Ints, limit: int) -> tuple[npt.NDArray[np.intp], int]:
    """Indices of every k-th checkpoint of each account (phase varying by account), so that at
    most about ``limit`` remain; and k."""
    n = len(accounts)
    stride = max(1, math.ceil(n / limit)) if limit > 0 else 1
    if stride == 1:
        return np.arange(n), 1
    order = np.argsort(accounts, kind="stable")  # each account's checkpoints, in order
    a = accounts[order]
    first = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    within = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
    keep = order[(within + a.astype(np.intp)) % stride == 0]
    return np.sort(keep), stride


def _interval(values: F64, level: float) -> tuple[float, float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def compare(scored: Scored, primary: str = SCORE, *, resamples: int = RESAMPLES,
            seed: int = SEED, level: float = LEVEL,
            max_bootstrap_points: int = MAX_BOOTSTRAP_POINTS,
            names: Mapping[str, str] | None = None) -> Comparison:
    """Figures for every system in ``scored`` (``primary`` is the one under test), with seeded
    bootstrap intervals over accounts; the same inputs give the same result."""
    if primary not in scored.scores:
        raise ValueError(f"no scores for {primary!r}")
    systems = [primary, *(s for s in scored.scores if s != primary)]
    labels, accounts = scored.labels, scored.accounts
    n_accounts = 0
    if len(accounts):  # codes 0..A-1, so that resampling draws only accounts that exist
        present = np.bincount(accounts) > 0
        n_accounts = int(present.sum())
        if n_accounts < len(present):
            accounts = (np.cumsum(present) - 1)[accounts]
    figures: dict[str, Figures] = {}
    for name in systems:
        ranked = _Ranked.of(scored.scores[name], labels)
        pos, neg = ranked.groups()
        roc_auc, pr_auc, lift = _figures(pos, neg) or (None, None, None)
        figures[name] = Figures(roc_auc, pr_auc, lift, deciles=_deciles(ranked, pos, neg))
    roc = {k: f.roc_auc for k, f in figures.items() if f.roc_auc is not None}
    best = max(roc, key=lambda k: roc[k]) if roc else None
    # A baseline that scores exactly as the primary (the default policy, when it is the one
    # under test) is no alternative to it: the margin is against the best of the others.
    identical = [s for s in systems[1:]
                 if np.array_equal(scored.scores[s], scored.scores[primary])]
    others = {k: v for k, v in roc.items() if k != primary and k not in identical}
    best_baseline = max(others, key=lambda k: others[k]) if others else None

    keep, stride = _subsample(accounts, max_bootstrap_points)
    draws = np.full((len(systems), 3, resamples), np.nan)
    if n_accounts and resamples > 0 and roc:
        ranked_sub = [_Ranked.of(scored.scores[s][keep], labels[keep], accounts[keep])
                      for s in systems]
        rng = np.random.default_rng(seed)
        weights, work = np.empty(len(keep)), np.empty((3, len(keep)))
        for b in range(resamples):
            # Resampling accounts with replacement = weighting each by how often it was drawn.
            times = np.bincount(rng.integers(0, n_accounts, n_accounts),
                                minlength=n_accounts).astype(np.float64)
            for i, r in enumerate(ranked_sub):
                assert r.accounts is not None
                got = _figures(*r.groups(np.take(times, r.accounts, out=weights)), work)
                if got is not None:
                    draws[i, :, b] = got
    for i, name in enumerate(systems):
        f = figures[name]
        if f.roc_auc is not None:
            f.roc_auc_ci = _interval(draws[i, 0], level)
            f.pr_auc_ci = _interval(draws[i, 1], level)
            f.top_decile_lift_ci = _interval(draws[i, 2], level)
    margin = margin_ci = better = ahead = None
    if primary in roc and best_baseline is not None:
        margin = roc[primary] - roc[best_baseline]
        diff = draws[0, 0] - draws[systems.index(best_baseline), 0]
        margin_ci = _interval(diff, level)
        valid = diff[~np.isnan(diff)]
        if len(valid):
            ahead = (int(np.sum(valid > 0)), len(valid))
            better = ahead[0] / ahead[1]
    comparison = Comparison(
        primary, figures, len(labels), n_accounts, int(np.count_nonzero(labels)), best,
        best_baseline,
        margin, margin_ci, better, resamples, seed, level, stride, "", identical, ahead)
    comparison.verdict = verdict(comparison, names)
    return comparison


def verdict(c: Comparison, names: Mapping[str, str] | None = None) -> str:
    """Which system ranks churners best by ROC AUC, and by how much, in one sentence."""
    label = {**BASELINES, SCORE: "the score", **(names or {})}

    def name(k: str) -> str:
        return label.get(k, k)

    if c.best is None:
        return "No comparison: the evaluated checkpoints need both churners and stayers."
    same = "".join(f" The {name(k)} baseline gives exactly the same scores as {name(c.primary)}."
                   for k in c.identical)
    primary = c.systems[c.primary].roc_auc
    if c.best_baseline is None or primary is None or c.margin is None:
        return f"Best by ROC AUC: {name(c.best)}.{same}"
    base = c.systems[c.best_baseline].roc_auc
    assert base is not None
    ci = (f" ({c.level:.0%} interval of the difference {c.margin_ci[0]:+.3f} to "
          f"{c.margin_ci[1]:+.3f}; {name(c.primary)} ahead in {c.resamples_ahead[0]} of "
          f"{c.resamples_ahead[1]} resamples of accounts)"
          if c.margin_ci is not None and c.resamples_ahead is not None else "")
    if c.margin > 0:
        return (f"Best by ROC AUC: {name(c.primary)}, {primary:.3f} against {base:.3f} for the "
                f"best baseline, {name(c.best_baseline)}: {c.margin:+.3f}{ci}.{same}")
    if c.margin == 0:
        return (f"No better than the best baseline: {name(c.primary)} and "
                f"{name(c.best_baseline)} both have ROC AUC {primary:.3f}.{same}")
    return (f"Best by ROC AUC: {name(c.best_baseline)}, a baseline, {base:.3f} against "
            f"{primary:.3f} for {name(c.primary)}: {name(c.primary)} is {-c.margin:.3f} "
            f"behind{ci}.{same}")
