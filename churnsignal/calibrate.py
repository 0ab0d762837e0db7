"""`churnsignal calibrate`: fit the policy's signal weights and band thresholds from history.

Features are the policy's own signals at each daily checkpoint (their strengths, 0-1, as the
score uses them), computed by replaying history through the worker's core. A regularised
logistic regression learns which of them precede churn within the horizon; its positive
coefficients become the weights (scaled so that all signals at full strength make 100), and
band thresholds are chosen for a target share of account-days flagged. Only what was known
before ``--until`` is used, labels included; the last part of that period validates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from churnsignal.backtest import Inputs, merge_by_time, replay
from churnsignal.errors import ChurnsignalError
from churnsignal.history import DAY
from churnsignal.stream.policy import Policy
from churnsignal.stream.scoring import signals, strength

# The terminal state is not a predictor: a cancelled account has churned already.
FEATURES = tuple(name for name in Policy().signals.__class__.model_fields if name != "canceled")
MIN_CHURNERS = 10


class TooLittleData(ChurnsignalError):
    """Too few churners to fit weights that would not merely memorise them."""


def feature_row(state: Any, t: float, policy: Policy) -> list[float]:
    values = signals(state, t, policy)
    return [strength(getattr(policy.signals, name), values[name][0]) if name in values else 0.0
            for name in FEATURES]


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


def calibrate(inputs: Inputs, until: float, *, target_high_share: float = 0.03,
              validation_share: float = 0.3,
              progress: Callable[[float], None] | None = None) -> Calibration:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, roc_auc_score

    from churnsignal import history

    base = inputs.policy
    horizon = inputs.horizon_days * DAY
    engine = history.Engine()
    try:
        if inputs.subscriptions is None:
            raise history.HistoryError("--subscriptions is needed to know who churned")
        subs = history.read_subscriptions(engine, inputs.subscriptions)
        # Nothing after --until: neither events, nor the subscriptions' ends (the labels).
        for account, periods in subs.periods.items():
            subs.periods[account] = [(s, e if e is not None and e <= until else None, m, p)
                                     for s, e, m, p in periods if s <= until]
        churn = subs.churn_dates(inputs.renewal_gap_days)
        stream = merge_by_time(
            (e for e in history.warehouse_events(engine, inputs.events)
             if e.occurred_at.timestamp() <= until),
            history.subscription_events(subs))
        rows: list[tuple[float, list[float], int, float]] = []
        churners: dict[float, set[str]] = {}
        for cp in replay(stream, subs, base, end=until, progress=progress):
            if cp.as_of + horizon > until or cp.account_id not in subs.periods:
                continue
            label = int(any(cp.as_of < d <= cp.as_of + horizon
                            for d in churn.get(cp.account_id, ())))
            rows.append((cp.as_of, feature_row(cp.state, cp.as_of, base), label, cp.score))
            if label:
                churners.setdefault(cp.as_of, set()).add(cp.account_id)
    finally:
        engine.close()
    if not rows:
        raise TooLittleData("no checkpoint before --until has a complete horizon")
    times = sorted({t for t, *_ in rows})
    split = times[int(len(times) * (1 - validation_share))]
    train = [r for r in rows if r[0] < split]
    valid = [r for r in rows if r[0] >= split]
    train_churners = len({a for t, accts in churners.items() if t < split for a in accts})
    valid_pos = sum(r[2] for r in valid)
    if train_churners < MIN_CHURNERS or valid_pos == 0 or valid_pos == len(valid):
        raise TooLittleData(
            f"only {train_churners} accounts churned in the training period (need "
            f"{MIN_CHURNERS}) or the validation period has no churn to check against; "
            "no policy written: fitting weights on so few would describe those accounts, "
            "not churn. Use a longer history or a later --until.")
    x_train = np.array([r[1] for r in train])
    y_train = np.array([r[2] for r in train])
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    model.fit(x_train, y_train)
    raw = {name: max(0.0, float(c)) for name, c in zip(FEATURES, model.coef_[0], strict=True)}
    total = sum(raw.values())
    if total <= 0:
        raise TooLittleData("no signal predicts churn in this history; no policy written")
    weights = {name: round(min(100.0, 100.0 * c / total), 2) for name, c in raw.items()}

    def scores_with(ws: dict[str, float], data: list[Any]) -> Any:
        w = np.array([ws[name] for name in FEATURES])
        return np.minimum(100.0, np.array([r[1] for r in data]) @ w)

    train_scores = scores_with(weights, train)
    high = float(np.quantile(train_scores, 1 - target_high_share))
    critical = float(np.quantile(train_scores, 1 - target_high_share / 3))
    medium = float(np.quantile(train_scores, 1 - target_high_share * 3))
    medium, high, critical = _ordered(medium, high, critical)
    signals_update = {name: getattr(base.signals, name).model_copy(
        update={"weight": weights[name]}) for name in FEATURES}
    policy = base.model_copy(update={
        "version": f"calibrated-{len(train)}-{len(valid)}",
        "signals": base.signals.model_copy(update=signals_update),
        "thresholds": base.thresholds.model_copy(update={
            "medium": medium, "high": high, "critical": critical}),
    })
    y_valid = np.array([r[2] for r in valid])
    before = np.array([r[3] for r in valid])
    after = scores_with(weights, valid)
    return Calibration(policy, len(train), len(valid), train_churners,
                       float(roc_auc_score(y_valid, before)),
                       float(roc_auc_score(y_valid, after)),
                       float(average_precision_score(y_valid, before)),
                       float(average_precision_score(y_valid, after)), weights)


def _ordered(medium: float, high: float, critical: float) -> tuple[float, float, float]:
    """Strictly increasing thresholds inside (0, 100]."""
    medium = round(min(max(medium, 1.0), 97.0), 1)
    high = round(min(max(high, medium + 1), 98.0), 1)
    critical = round(min(max(critical, high + 1), 100.0), 1)
    return medium, high, critical


def write_policy(policy: Policy, path: Path) -> None:
    data = policy.model_dump(mode="json")
    path.write_text("# Written by `churnsignal calibrate`; the worker loads it unchanged\n"
                    "# (CHURNSIGNAL_POLICY_FILE).\n" + yaml.safe_dump(data, sort_keys=False))
