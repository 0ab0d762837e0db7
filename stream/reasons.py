"""Reasons and scores: what every scorer (rules or a fitted model) returns (pure)."""

from __future__ import annotations

from dataclasses import dataclass

# Each reason: whether it is voluntary (the customer disengages or decides) or involuntary
# (billing mechanics), and the play a customer-success team should run.
REASONS: dict[str, tuple[str, str]] = {
    # a fitted model's verdict on how much the account uses the product (level, breadth,
    # users) against the accounts that stayed
    "low_engagement": ("voluntary", "csm_check_in"),
    "usage_decline": ("voluntary", "csm_check_in"),
    "key_event_decline": ("voluntary", "csm_check_in"),
    "inactivity": ("voluntary", "csm_check_in"),
    "seat_underuse": ("voluntary", "plan_review"),
    "low_feature_breadth": ("voluntary", "training"),
    "onboarding_stalled": ("voluntary", "onboarding_nudge"),
    "payment_failed": ("involuntary", "dunning_retry"),
    "payment_failed_final": ("involuntary", "card_update"),
    "card_expiring": ("involuntary", "card_update"),
    "contraction": ("voluntary", "pricing_review"),
    "cancellation_scheduled": ("voluntary", "offer_pause_or_plan_change"),
    "paused": ("voluntary", "resume_check_in"),
    "support_burden": ("voluntary", "support_escalation"),
    "negative_feedback": ("voluntary", "csm_check_in"),
    "canceled": ("voluntary", "win_back_offer"),
}

# Reasons that page at once, whatever the cooldown or their weight: the customer is leaving
# now. Kept among the reasons while present even at 0 points (a calibrated policy may weigh
# them 0 when its history had no billing), so the alert rules can still see them.
IMMEDIATE = frozenset({"cancellation_scheduled", "payment_failed_final"})


# Not frozen: a frozen dataclass sets each field through object.__setattr__ (1.5 against
# 0.3 us), and every scored account makes a few; nothing mutates them.
@dataclass(slots=True)
class Reason:
    code: str
    value: float  # the signal's raw value (days, ratio, count...)
    contribution: float  # points added to the score
    kind: str  # voluntary | involuntary
    play: str
    detail: str

    # Written out (here and in the other classes built per event or account batch): mypyc
    # compiles an __init__ in the source, while the one dataclasses generates runs
    # interpreted (setup.py).
    def __init__(self, code: str, value: float, contribution: float, kind: str, play: str,
                 detail: str) -> None:
        self.code = code
        self.value = value
        self.contribution = contribution
        self.kind = kind
        self.play = play
        self.detail = detail

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "value": round(self.value, 3),
                "contribution": round(self.contribution, 1), "kind": self.kind,
                "play": self.play, "detail": self.detail}


@dataclass(slots=True)
class Score:
    score: float
    band: str  # the band this score falls in, before hysteresis
    reasons: tuple[Reason, ...]  # strongest first

    def __init__(self, score: float, band: str, reasons: tuple[Reason, ...]) -> None:
        self.score = score
        self.band = band
        self.reasons = reasons
