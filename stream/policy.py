"""The scoring policy: weights, thresholds, windows and alerting rules, loaded from YAML (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from churnsignal.errors import ConfigError
from churnsignal.notify.routing import NotifyPolicy
from churnsignal.stream.attributes import AccountsPolicy

Band = Literal["low", "medium", "high", "critical"]
BASE_COLUMNS = 7  # a state's day bucket: events, usage, sessions, users, billing, support, key
BANDS: tuple[Band, ...] = ("low", "medium", "high", "critical")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Windows(_Frozen):
    horizon_days: int = Field(90, ge=35, le=400, description="Daily buckets kept per account.")
    short_days: int = Field(7, ge=1, le=60, description="Recent window compared with the baseline.")
    baseline_days: int = Field(28, ge=7, le=180, description="Baseline window before the short one.")
    grace_days: int = Field(3, ge=0, le=30, description="Days whose distinct users stay exact.")


class Signal(_Frozen):
    weight: float = Field(ge=0, le=100, description="Points this signal adds at full strength.")
    start: float = Field(0.0, description="Value where the signal starts to count.")
    full: float = Field(1.0, description="Value where it counts fully.")


class Signals(_Frozen):
    usage_decline: Signal = Signal(weight=55, start=0.3, full=0.9)  # 1 - recent/baseline rate
    # the same, for the policy's key events only (weight 0 until key_events are named)
    key_event_decline: Signal = Signal(weight=0, start=0.3, full=0.9)
    inactivity: Signal = Signal(weight=35, start=3, full=14)  # days since last usage
    seat_underuse: Signal = Signal(weight=10, start=0.5, full=0.9)  # 1 - active users / seats
    low_feature_breadth: Signal = Signal(weight=5, start=0, full=1)  # 1 - features / min
    onboarding_stalled: Signal = Signal(weight=25, start=0, full=1)
    payment_failed: Signal = Signal(weight=25, start=0, full=1)  # retries still pending
    payment_failed_final: Signal = Signal(weight=60, start=0, full=1)  # retries exhausted/unpaid
    card_expiring: Signal = Signal(weight=10, start=0, full=1)
    contraction: Signal = Signal(weight=20, start=0.05, full=0.5)  # MRR drop vs 90-day peak
    cancellation_scheduled: Signal = Signal(weight=80, start=0, full=1)
    paused: Signal = Signal(weight=20, start=0, full=1)
    support_burden: Signal = Signal(weight=20, start=1, full=6)  # open + 2*high + reopened
    negative_feedback: Signal = Signal(weight=15, start=0, full=1)
    canceled: Signal = Signal(weight=100, start=0, full=1)


class Onboarding(_Frozen):
    stalled_after_days: int = Field(14, ge=1, description="No activation by this account age.")
    watch_until_days: int = Field(60, ge=1, description="Onboarding is judged only until then.")
    activation_events: list[str] = Field(
        default_factory=list,
        description="Event names that count as activation; empty: generic activity rule below.",
    )
    min_active_days: int = Field(3, ge=1, description="Generic activation: active days...")
    min_active_users: int = Field(1, ge=1, description="...and distinct active users.")

    @field_validator("activation_events")
    @classmethod
    def _lower(cls, names: list[str]) -> list[str]:
        return [n.lower() for n in names]  # matched case-insensitively


class Usage(_Frozen):
    key_events: list[str] = Field(
        default_factory=list, max_length=100,
        description="Usage event names (or features) whose own decline is a signal, "
        "key_event_decline: the ones that matter to this product, e.g. 'Report Exported'. "
        "`churnsignal calibrate` picks them from history. Case-insensitive.")

    track_types: list[str] = Field(
        default_factory=list, max_length=32,
        description="Usage event names counted per day in the state besides the model's own "
        "(e.g. those a shadow policy's model reads). Case-insensitive.")

    @field_validator("key_events")
    @classmethod
    def _lower(cls, names: list[str]) -> list[str]:
        return sorted({n.lower() for n in names})

    @field_validator("track_types")
    @classmethod
    def _lower_tracked(cls, names: list[str]) -> list[str]:
        return [n.lower() for n in names]


class Thresholds(_Frozen):
    medium: float = 25
    high: float = 50
    critical: float = 75

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if not 0 < self.medium < self.high < self.critical <= 100:
            raise ValueError("thresholds must satisfy 0 < medium < high < critical <= 100")
        return self


class Alerting(_Frozen):
    hysteresis: float = Field(5, ge=0, le=50, description="De-escalate only this far below.")
    cooldown_hours: float = Field(24, ge=0, description="No second escalation alert sooner.")
    min_band: Band = Field("high", description="Escalations below this band do not alert.")
    top_reasons: int = Field(3, ge=1, le=14)
    catch_up_lag_hours: float = Field(
        1.0, gt=0, description="Accounts whose newest event is older than this do not alert "
        "from events (back-fill); the re-score timer alerts on them once caught up.")


class Limits(_Frozen):
    dedup_ids: int = Field(64, ge=0, le=10_000, description="Recent event ids kept per account.")
    features: int = Field(40, ge=1, le=1000)
    open_tickets: int = Field(50, ge=1, le=1000)
    day_users: int = Field(100, ge=1, le=10_000, description="Distinct users tracked per day.")
    min_baseline_per_day: float = Field(1.0, ge=0, description="Decline needs this much baseline.")
    min_features: int = Field(3, ge=1)
    slow_resolution_hours: float = Field(72, gt=0)


Transform = Literal["log1p", "identity"]


class Model(_Frozen):
    """A churn model fitted on a company's own history (``churnsignal calibrate``).

    score = 100 * sigmoid(calibration[0] * logit + calibration[1]), where
    logit = intercept + sum(coefficient * (transform(value) - mean) / scale) over the
    features (stream.features names them and computes their values from the state). A
    feature's contribution to an account's risk is its coefficient times its standardised
    value: what it adds against an average account.
    """

    horizon_days: int = Field(30, ge=1, le=365, description="Churn within this many days.")
    event_types: list[str] = Field(
        default_factory=list, max_length=32, description="Usage event names counted per day in "
        "the state (one column each), lower-case; the model's per-type features read them.")
    features: list[str] = Field(min_length=1, description="Feature names (stream.features).")
    transforms: list[Transform]
    means: list[float]
    scales: list[float]
    coefficients: list[float]
    intercept: float
    calibration: tuple[float, float] = Field(
        (1.0, 0.0), description="Slope and offset applied to the logit (Platt scaling on a "
        "held-out period), so the score is a calibrated probability.")

    @model_validator(mode="after")
    def _aligned(self) -> Model:
        n = len(self.features)
        if not (len(self.transforms) == len(self.means) == len(self.scales)
                == len(self.coefficients) == n):
            raise ValueError("features, transforms, means, scales and coefficients must "
                             "have the same length")
        if any(s <= 0 for s in self.scales):
            raise ValueError("scales must be positive")
        return self

    @field_validator("event_types")
    @classmethod
    def _lower_types(cls, names: list[str]) -> list[str]:
        return [n.lower() for n in names]


class Policy(_Frozen):
    """Everything scoring reads. Changing it needs no code change."""

    version: str = "default-1"
    windows: Windows = Windows()
    signals: Signals = Signals()
    onboarding: Onboarding = Onboarding()
    usage: Usage = Usage()
    thresholds: Thresholds = Thresholds()
    alerting: Alerting = Alerting()
    limits: Limits = Limits()
    # None: the rules above (no history needed). Set by calibrate: a fitted model scores,
    # the rules that must fire at once still do (stream.scoring).
    model: Model | None = None
    # Named alert destinations and routing rules (churnsignal.notify.routing); None: the
    # environment's destinations receive every alert.
    notify: NotifyPolicy | None = None
    # Account attributes read from Segment group traits (churnsignal.stream.attributes);
    # empty: none kept.
    accounts: AccountsPolicy = AccountsPolicy()

    @model_validator(mode="after")
    def _routed_attributes_mapped(self) -> Policy:
        for i, route in enumerate(self.notify.routes if self.notify else (), 1):
            for name in route.attributes or ():
                if name not in self.accounts.traits:
                    raise ValueError(
                        f"notify route {i}: attribute {name!r} is not mapped in accounts.traits "
                        f"(mapped: {', '.join(self.accounts.traits) or 'none'})")
        return self

    @cached_property
    def tracked_types(self) -> list[str]:
        """Usage event names counted per day in the state: the model's, then the others."""
        names = list(self.model.event_types) if self.model is not None else []
        return names + [n for n in self.usage.track_types if n not in names]

    @cached_property
    def type_columns(self) -> dict[str, int]:
        """Usage event name -> its per-day column in the state (after the base columns)."""
        return {name: BASE_COLUMNS + i for i, name in enumerate(self.tracked_types)}

    @cached_property
    def signal_table(self) -> dict[str, tuple[float, float, float]]:
        """Signal name -> (weight, start, full): read for every account scored, where
        attribute lookups through three pydantic models add up."""
        return {name: (s.weight, s.start, s.full) for name, s in self.signals}

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> Policy:
        """A copy; what the cached properties hold is worked out again (pydantic's copy
        would carry it over, stale, into a copy with other fields)."""
        copy = super().model_copy(update=update, deep=deep)
        for name in ("tracked_types", "type_columns", "signal_table"):
            copy.__dict__.pop(name, None)
        return copy

    def tracking(self, other: Policy) -> Policy:
        """This policy, also counting the event types ``other`` reads (a shadow policy
        scores the states this one folds)."""
        missing = [n for n in other.tracked_types if n not in self.tracked_types]
        if not missing:
            return self
        usage = self.usage.model_copy(update={"track_types": self.usage.track_types + missing})
        return self.model_copy(update={"usage": usage})

    def band_of(self, score: float) -> Band:
        t = self.thresholds
        if score >= t.critical:
            return "critical"
        if score >= t.high:
            return "high"
        if score >= t.medium:
            return "medium"
        return "low"

    def threshold_of(self, band: Band) -> float:
        return {"low": 0.0, "medium": self.thresholds.medium, "high": self.thresholds.high,
                "critical": self.thresholds.critical}[band]


def load_policy(path: Path | None = None) -> Policy:
    """The policy at ``path``, or the shipped default; errors name the file and the field."""
    if path is None:
        text = resources.files("churnsignal").joinpath("default_policy.yaml").read_text()
        source = "default_policy.yaml"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"CHURNSIGNAL_POLICY_FILE: cannot read {path}: {exc}") from None
        source = str(path)
    try:
        return Policy.model_validate(yaml.safe_load(text) or {})
    except (ValidationError, yaml.YAMLError) as exc:
        raise ConfigError(f"policy {source} is invalid: {exc}") from None
