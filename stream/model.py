"""Scoring by a fitted model: a calibrated probability of churn, explained (pure).

The score is 100 times the probability of churn within the model's horizon. Each feature
adds its coefficient times its standardised value to the logit: what it says about this
account against an average one. Those contributions, summed per reason code, are the
reasons (the risk-raising ones, strongest first; their points share the score in proportion
to their contributions). The billing rules that must act at once (a scheduled cancellation,
exhausted retries) and a cancelled subscription are still decided by the rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from churnsignal.stream.features import Feature, catalogue, values
from churnsignal.stream.policy import Model, Policy
from churnsignal.stream.reasons import IMMEDIATE, REASONS, Reason, Score
from churnsignal.stream.state import AccountState

# Per model (policies are few): its features with their reason codes and details, its
# reason codes in first-seen order with each feature's index into them, and its terms as
# plain tuples (the per-account loops then do no lookups by name).
_Term = tuple[str, bool, float, float, float]  # name, log1p?, mean, scale, coefficient


@dataclass(frozen=True, slots=True)
class _Compiled:
    model: Model
    features: list[Feature]
    codes: list[str]
    code_of: list[int]
    terms: list[_Term]


_COMPILED: dict[int, _Compiled] = {}


def _compiled(model: Model) -> _Compiled:
    held = _COMPILED.get(id(model))
    if held is None or held.model is not model:
        known = {f.name: f for f in catalogue(model.event_types)}
        feats = [known.get(name, Feature(name, "identity", "low_engagement", name + " {:.2f}"))
                 for name in model.features]
        codes = list(dict.fromkeys(f.code for f in feats))
        index = {code: k for k, code in enumerate(codes)}
        terms = [(name, transform == "log1p", mean, scale, coef) for name, transform, mean,
                 scale, coef in zip(model.features, model.transforms, model.means,
                                    model.scales, model.coefficients, strict=True)]
        if len(_COMPILED) > 64:  # never grow without bound
            _COMPILED.clear()
        _COMPILED[id(model)] = held = _Compiled(model, feats, codes,
                                                [index[f.code] for f in feats], terms)
    return held


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-min(x, 700.0)))
    e = math.exp(max(x, -700.0))
    return e / (1.0 + e)


def logit_parts(model: Model, raw: Mapping[str, float]) -> tuple[float, list[float]]:
    """The logit and each feature's contribution to it."""
    parts = []
    total = model.intercept
    get = raw.get
    log1p = math.log1p
    for name, log, mean, scale, coef in _compiled(model).terms:
        x = get(name, 0.0)
        if log:  # TRANSFORMS["log1p"], inline
            x = log1p(x) if x > 0.0 else 0.0
        c = coef * (x - mean) / scale
        parts.append(c)
        total += c
    return total, parts


def probability(model: Model, raw: Mapping[str, float]) -> float:
    logit, _ = logit_parts(model, raw)
    slope, offset = model.calibration
    return sigmoid(slope * logit + offset)


def model_score(state: AccountState, now: float, policy: Policy,
                rules: Mapping[str, tuple[float, str, tuple[Any, ...]]]) -> Score:
    """The model's score for ``state`` at ``now``; ``rules`` are the rule signals (for what
    must still be decided by rule)."""
    model = policy.model
    assert model is not None
    if "canceled" in rules:  # nothing left to predict
        value, template, args = rules["canceled"]
        kind, play = REASONS["canceled"]
        return Score(100.0, policy.band_of(100.0),
                     (Reason("canceled", value, 100.0, kind, play, template.format(*args)),))
    raw = values(state, now, policy)
    logit, parts = logit_parts(model, raw)
    slope, offset = model.calibration
    total = round(100.0 * sigmoid(slope * logit + offset), 1)
    # Contributions summed per reason code, and each code's strongest risk-raising feature
    # (lists indexed by the model's codes: this runs for every account a flush scores).
    compiled = _compiled(model)
    feats, codes, code_of = compiled.features, compiled.codes, compiled.code_of
    by_code = [0.0] * len(codes)
    best = [0.0] * len(codes)
    best_at = [-1] * len(codes)
    for j, c in enumerate(parts):
        k = code_of[j]
        by_code[k] += c
        if c > best[k]:
            best[k], best_at[k] = c, j
    raising = [(k, c) for k, c in enumerate(by_code) if c > 0 and best_at[k] >= 0]
    share = sum(c for _, c in raising)
    reasons = []
    for k, c in raising:
        feature = feats[best_at[k]]
        value = raw.get(feature.name, 0.0)
        kind, play = REASONS[codes[k]]
        reasons.append(Reason(codes[k], value, total * c / share, kind, play,
                              _detail(feature, value)))
    present = {r.code for r in reasons}
    for code in IMMEDIATE & rules.keys() - present:  # decided by rule, whatever the model
        value, template, args = rules[code]
        kind, play = REASONS[code]
        reasons.append(Reason(code, value, 0.0, kind, play, template.format(*args)))
    reasons.sort(key=lambda r: (-r.contribution, r.code))
    return Score(total, policy.band_of(total), tuple(reasons))


def _detail(feature: Feature, value: float) -> str:
    try:
        return feature.detail.format(value)
    except (ValueError, IndexError):
        return f"{feature.name} {value:.2f}"
