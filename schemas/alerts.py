"""The versioned churn alert published to ``churn.alerts`` (and stored in ClickHouse)."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

# 3: ``attributes`` (the account attributes the policy maps from Segment group traits).
# 2: ``plan`` (the account attribute routing rules read). Version 1 and 2 alerts (without
# them) still validate, and a consumer of an older version that ignores unknown fields
# reads the newer ones.
ALERT_SCHEMA_VERSION: Final = 3


class AlertReason(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str = Field(description="Signal name, e.g. usage_decline, payment_failed_final.")
    value: float = Field(description="The signal's raw value (days, ratio, count).")
    contribution: float = Field(description="Points this reason added to the score.")
    kind: Literal["voluntary", "involuntary"]
    play: str = Field(description="Recommended play, e.g. card_update, csm_check_in.")
    detail: str = Field(description="One human sentence with the numbers.")


class Alert(BaseModel):
    """A change of an account's risk band that a customer-success team should act on."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1, 2, 3] = ALERT_SCHEMA_VERSION
    alert_id: str = Field(description="Deterministic: the same history gives the same id.")
    account_id: str
    kind: Literal["escalated", "deescalated"]
    score: float = Field(ge=0, le=100)
    band: Literal["low", "medium", "high", "critical"]
    previous_band: Literal["low", "medium", "high", "critical"]
    reasons: list[AlertReason] = Field(description="Top reasons, strongest first.")
    mrr_at_risk_cents: int = Field(ge=0)
    trigger_event_id: str | None = Field(None, description="None when the re-score timer fired.")
    triggered_at: float = Field(description="Event time (Unix s) of the trigger, or the tick.")
    emitted_at: float = Field(description="Processing time (Unix s).")
    policy_version: str
    plan: str | None = Field(None, description="The account's plan (from billing) when the "
                             "alert fired; None when unknown. Since schema version 2.")
    attributes: dict[str, str] | None = Field(
        None, description="The account's attributes the policy maps from "
        "Segment group traits (accounts.traits, e.g. tier, csm): at most 8, values at "
        "most 64 characters; None when it maps none or none is known. Since schema version 3.")
