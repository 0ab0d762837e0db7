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
from typing import Any

from churnsignal.stream.features import TRANSFORMS, Feature, catalogue, values
from churnsignal.stream.policy import Model, Policy
from churnsignal.stream.reasons import IMMEDIATE, REASONS, Reason, Score
from churnsignal.stream.state import AccountState

_CATALOGUES: dict[int, tuple[Model, list[Feature]]] = {}


def _features(model: Model) -> list[Feature]:
    """The model's features with their reason codes and details (cached per model)."""
    held = _CATALOGUES.get(id(model))
    if held is None or held[0] is not model:
        known = {f.name: f for f in catalogue(model.event_types)}
        feats = [known.get(name, Feature(name, "identity", "low_engagement", name + " {:.2f}"))
                 for name in model.features]
        if len(_CATALOGUES) > 64:  # policies are few; never grow without bound
            _CATALOGUES.clear()
        _CATALOGUES[id(model)] = held = (model, feats)
    return held[1]


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-min(x, 700.0)))
    e = math.exp(max(x, -700.0))
    return e / (1.0 + e)


def logit_parts(model: Model, raw: Mapping[str, float]) -> tuple[float, list[float]]:
    """The logit and each feature's contribution to it."""
    parts = []
    total = model.intercept
    for name, transform, mean, scale, coef in zip(
            model.features, model.transforms, model.means, model.scales, model.coefficients,
            strict=True):
        c = coef * (TRANSFORMS[transform](raw.get(name, 0.0)) - mean) / scale
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
    by_code: dict[str, float] = {}
    top: dict[str, tuple[float, Feature]] = {}
    for feature, c in zip(_features(model), parts, strict=True):
        by_code[feature.code] = by_code.get(feature.code, 0.0) + c
        if c > top.get(feature.code, (0.0, feature))[0]:
            top[feature.code] = (c, feature)
    raising = {code: c for code, c in by_code.items() if c > 0 and code in top}
    share = sum(raising.values())
    reasons = []
    for code, c in raising.items():
        feature = top[code][1]
        value = raw.get(feature.name, 0.0)
        kind, play = REASONS[code]
        reasons.append(Reason(code, value, total * c / share, kind, play,
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
