"""The canonical event contract: one envelope, typed data per event family, one union to decode."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION: Final = 1

# Bounded lengths: event fields are untrusted and end up in state, logs and ClickHouse.
Id = Annotated[str, Field(min_length=1, max_length=200)]
Name = Annotated[str, Field(max_length=200)]

USAGE_TYPES = ("session", "feature_used", "seat_activity", "activation", "export", "integration",
               "track")
SUBSCRIPTION_TYPES = ("subscription_created", "subscription_updated", "subscription_deleted",
                      "subscription_paused", "subscription_resumed", "trial_will_end")
PAYMENT_TYPES = ("invoice_paid", "payment_failed", "payment_action_required", "invoice_upcoming",
                 "charge_failed", "dispute_created")
CARD_TYPES = ("card_expiring", "payment_method_updated")
TICKET_TYPES = ("ticket_opened", "ticket_updated", "ticket_solved", "ticket_reopened")
FEEDBACK_TYPES = ("satisfaction_rating", "nps_response")
# A subscription as a backfill describes it (``churnsignal import subscriptions``): history,
# so the policy horizon does not apply to it.
SNAPSHOT_TYPES = ("subscription_snapshot",)
# Facts about the account itself (Segment group traits the policy maps): not activity, no
# billing or support either; they set the state's attributes and nothing else.
ACCOUNT_TYPES = ("account_traits",)

SubscriptionStatus = Literal["trialing", "active", "past_due", "unpaid", "paused", "canceled",
                             "incomplete", "incomplete_expired"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_max_length=2000)


class UsageData(_Strict):
    name: Name | None = Field(None, description="The product's own event name (Segment `event`).")
    feature: Name | None = Field(None, description="Feature used, for feature breadth.")
    count: int = Field(1, ge=1, le=1_000_000, description="How many actions this event stands for.")


class SubscriptionData(_Strict):
    subscription_id: Id | None = None
    status: SubscriptionStatus | None = None
    plan: Name | None = None
    seats: int | None = Field(None, ge=0, le=10_000_000)
    mrr_cents: int | None = Field(None, ge=0, description="Monthly recurring revenue, minor units.")
    previous_mrr_cents: int | None = Field(None, ge=0)
    currency: Annotated[str, Field(max_length=3)] | None = None
    cancel_at_period_end: bool | None = None
    current_period_end: AwareDatetime | None = None
    pause_resumes_at: AwareDatetime | None = None
    trial_end: AwareDatetime | None = None
    cancellation_reason: Name | None = Field(
        None, description="Why it ended (Stripe cancellation_details.reason: cancellation_requested, "
        "payment_failed, payment_disputed); payment_* means involuntary churn.")


class SnapshotData(_Strict):
    subscription_id: Id = Field(description="Stable id of the subscription (Stripe sub_..., or "
                                "account and start for a file without one).")
    status: SubscriptionStatus = Field(description="Status as of the snapshot's occurred_at.")
    plan: Name | None = None
    mrr_cents: int = Field(0, ge=0, description="Monthly recurring revenue, minor units.")
    currency: Annotated[str, Field(max_length=3)] | None = None
    started_at: AwareDatetime = Field(description="When the subscription started paying (or "
                                      "its trial began, for a trialing one).")
    ended_at: AwareDatetime | None = Field(None, description="When it ended; unset while it "
                                           "runs (a scheduled end is current_period_end).")
    cancel_at_period_end: bool = False
    current_period_end: AwareDatetime | None = None
    cancellation_reason: Name | None = Field(
        None, description="As SubscriptionData's: payment_* means involuntary churn.")
    stripe_customer_id: Id | None = Field(
        None, description="The Stripe customer (cus_...) the subscription belongs to, when the "
        "account is another id: the snapshot then also links that customer to the account, "
        "so the customer's live events that name no account find it at once.")


class PaymentData(_Strict):
    invoice_id: Id | None = None
    amount_cents: int | None = Field(None, ge=0)
    currency: Annotated[str, Field(max_length=3)] | None = None
    attempt_count: int | None = Field(None, ge=0, le=1000)
    next_attempt_at: AwareDatetime | None = Field(
        None, description="Set while the provider will retry; unset once retries are exhausted."
    )


class CardData(_Strict):
    expires_at: AwareDatetime | None = None


class TicketData(_Strict):
    ticket_id: Id
    status: Name | None = None
    priority: Literal["low", "normal", "high", "urgent"] | None = None
    channel: Name | None = None
    first_response_s: float | None = Field(None, ge=0)
    resolution_s: float | None = Field(None, ge=0)


class FeedbackData(_Strict):
    csat: Literal["good", "bad"] | None = None
    score: int | None = Field(None, ge=0, le=10, description="NPS 0-10.")


class _Envelope(_Strict):
    event_id: Id = Field(description="Idempotency key: the same id twice changes nothing.")
    account_id: Id = Field(description="Account (customer company); also the partitioning key.")
    occurred_at: AwareDatetime = Field(description="Event time, timezone-aware.")
    user_id: Id | None = None
    schema_version: Literal[1] = SCHEMA_VERSION


class UsageEvent(_Envelope):
    type: Literal["session", "feature_used", "seat_activity", "activation", "export",
                  "integration", "track"]
    data: UsageData = Field(default_factory=UsageData)


class SubscriptionEvent(_Envelope):
    type: Literal["subscription_created", "subscription_updated", "subscription_deleted",
                  "subscription_paused", "subscription_resumed", "trial_will_end"]
    data: SubscriptionData = Field(default_factory=SubscriptionData)


class SnapshotEvent(_Envelope):
    """A subscription as a backfill saw it at ``occurred_at``: a later live subscription event
    wins over it, an older one does not undo it."""

    type: Literal["subscription_snapshot"]
    data: SnapshotData


class PaymentEvent(_Envelope):
    type: Literal["invoice_paid", "payment_failed", "payment_action_required", "invoice_upcoming",
                  "charge_failed", "dispute_created"]
    data: PaymentData = Field(default_factory=PaymentData)


class CardEvent(_Envelope):
    type: Literal["card_expiring", "payment_method_updated"]
    data: CardData = Field(default_factory=CardData)


class TicketEvent(_Envelope):
    type: Literal["ticket_opened", "ticket_updated", "ticket_solved", "ticket_reopened"]
    data: TicketData


class FeedbackEvent(_Envelope):
    type: Literal["satisfaction_rating", "nps_response"]
    data: FeedbackData


class TraitsData(_Strict):
    traits: dict[Name, Name | None] = Field(
        default_factory=dict, max_length=32, description="Trait key -> value of a Segment "
        "group call (only the keys the policy's accounts.traits maps); null clears it.")


class TraitsEvent(_Envelope):
    """An account's traits (a Segment group call): sets its attributes, is not activity."""

    type: Literal["account_traits"]
    data: TraitsData = Field(default_factory=TraitsData)


Event = Annotated[
    UsageEvent | SubscriptionEvent | PaymentEvent | CardEvent | TicketEvent | FeedbackEvent
    | SnapshotEvent | TraitsEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)
EVENT_TYPES = frozenset(USAGE_TYPES + SUBSCRIPTION_TYPES + PAYMENT_TYPES + CARD_TYPES
                        + TICKET_TYPES + FEEDBACK_TYPES + SNAPSHOT_TYPES + ACCOUNT_TYPES)


USAGE_TYPE_SET = frozenset(USAGE_TYPES)  # for membership tests on the hot path


def family_of(event_type: str) -> str:
    """usage, billing, support or account: the family an event type belongs to."""
    if event_type in USAGE_TYPE_SET:
        return "usage"
    if event_type in ACCOUNT_TYPES:
        return "account"
    if event_type in TICKET_TYPES or event_type in FEEDBACK_TYPES:
        return "support"
    return "billing"

