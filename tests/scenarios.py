"""Hand-made account histories as providers send them, shared by unit and integration tests."""

from __future__ import annotations

from churnsignal.tools.synthetic import (
    DAY,
    FEATURES,
    segment_track,
    stripe_event,
    stripe_subscription,
    zendesk_ticket,
)


class Scenario:
    """Builds (topic kind, key, value) messages with unique ids, relative to ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.n = 0
        self.messages: list[tuple[str, bytes | None, bytes]] = []

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n:06d}"

    def usage(self, account: str, days_ago: float, feature_i: int = 0, user: int = 0) -> bytes:
        feature = FEATURES[feature_i % len(FEATURES)]
        value = segment_track(account, f"{account}-u{user}", f"{feature.title()} Viewed",
                              self.now - days_ago * DAY, self._id("msg"), feature)
        self.messages.append(("usage", account.encode(), value))
        return value

    def steady(self, account: str, days: int, per_day: int, until_days_ago: float = 0.0,
               users: int = 3) -> None:
        for d in range(days, 0, -1):
            for i in range(per_day):
                age = until_days_ago + d - 1 + (i + 1) / (per_day + 2)
                self.usage(account, age, feature_i=i, user=i % users)

    def subscription(self, account: str, days_ago: float, seats: int = 5, price: int = 4900,
                     cancel: bool = False, kind: str = "customer.subscription.created") -> None:
        obj = stripe_subscription(account, "active", seats, price, cancel_at_period_end=cancel,
                                  period_end=self.now + 20 * DAY)
        previous = {"cancel_at_period_end": False} if cancel else None
        self.messages.append(("billing", f"cus_{account}".encode(), stripe_event(
            kind, obj, self.now - days_ago * DAY, self._id("evt"), previous)))

    def payment_failed(self, account: str, days_ago: float, attempt: int, final: bool) -> None:
        ts = self.now - days_ago * DAY
        obj = {"id": f"in_{account}", "object": "invoice", "customer": f"cus_{account}",
               "amount_due": 24500, "currency": "usd", "attempt_count": attempt,
               "next_payment_attempt": None if final else int(ts + 3 * DAY),
               "subscription_details": {"metadata": {"account_id": account}}}
        self.messages.append(("billing", None, stripe_event(
            "invoice.payment_failed", obj, ts, self._id("evt"))))

    def invoice_paid(self, account: str, days_ago: float) -> None:
        ts = self.now - days_ago * DAY
        obj = {"id": f"in_{account}", "object": "invoice", "customer": f"cus_{account}",
               "amount_due": 24500, "currency": "usd", "attempt_count": 3,
               "next_payment_attempt": None, "status": "paid",
               "subscription_details": {"metadata": {"account_id": account}}}
        self.messages.append(("billing", None, stripe_event("invoice.paid", obj, ts,
                                                            self._id("evt"))))

    def ticket(self, account: str, days_ago: float, ticket_id: int) -> None:
        self.messages.append(("support", account.encode(), zendesk_ticket(
            account, ticket_id, "created", self.now - days_ago * DAY, self._id("zen"),
            priority="high", current="new")))
