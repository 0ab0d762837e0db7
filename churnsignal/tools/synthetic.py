"""Realistic synthetic accounts as providers send them: Segment track, Stripe Events, Zendesk.

Used by the demo, the benchmark and tests. Deterministic for a seed. Each account follows a
profile: healthy (most), declining usage, failed payments, stalled onboarding, support
overload, scheduled cancellation, or silent.

``GatewaySender`` delivers the messages the way the providers do, through `churnsignal
gateway`: Segment batches to ``/v1/batch`` (HTTP Basic, the write key as user name),
Stripe Events to ``/webhooks/stripe`` signed as Stripe signs them (``Stripe-Signature``),
Zendesk tickets to ``/webhooks/zendesk`` signed as Zendesk does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import orjson

DAY = 86_400.0
PROFILES = {
    "healthy": 0.70, "declining": 0.07, "payment_failure": 0.06, "onboarding_stalled": 0.05,
    "support_overload": 0.05, "cancel_scheduled": 0.04, "silent": 0.03,
}
FEATURES = ("dashboards", "reports", "alerts", "api", "exports", "sso", "workflows", "search")


@dataclass(frozen=True, slots=True)
class Message:
    topic: str  # "usage" | "billing" | "support"
    key: bytes
    value: bytes
    ts: float


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def segment_track(account: str, user: str, name: str, ts: float, msg_id: str,
                  feature: str | None = None) -> bytes:
    props: dict[str, object] = {"plan": "pro"}
    if feature:
        props["feature"] = feature
    return orjson.dumps({
        "type": "track", "event": name, "userId": user, "messageId": msg_id,
        "timestamp": _iso(ts), "properties": props, "context": {"groupId": account},
    })


def stripe_event(kind: str, obj: dict[str, object], ts: float, evt_id: str,
                 previous: dict[str, object] | None = None) -> bytes:
    data: dict[str, object] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return orjson.dumps({"id": evt_id, "object": "event", "api_version": "2024-06-20",
                         "created": int(ts), "type": kind, "livemode": False,
                         "pending_webhooks": 1, "data": data})


def stripe_subscription(account: str, status: str, seats: int, unit_amount: int,
                        cancel_at_period_end: bool = False,
                        period_end: float | None = None) -> dict[str, object]:
    return {
        "id": f"sub_{account}", "object": "subscription", "customer": f"cus_{account}",
        "status": status, "cancel_at_period_end": cancel_at_period_end, "currency": "usd",
        "current_period_end": int(period_end) if period_end else None,
        "metadata": {"account_id": account},
        "items": {"object": "list", "data": [{
            "id": f"si_{account}", "object": "subscription_item", "quantity": seats,
            "price": {"id": "price_pro_monthly", "object": "price", "unit_amount": unit_amount,
                      "currency": "usd", "recurring": {"interval": "month",
                                                       "interval_count": 1}},
        }]},
    }


def zendesk_ticket(account: str, ticket_id: int, kind: str, ts: float, evt_id: str,
                   priority: str = "normal", previous: str = "open",
                   current: str = "open") -> bytes:
    payload: dict[str, object] = {
        "type": f"zen:event-type:ticket.{kind}", "id": evt_id, "time": _iso(ts),
        "account_id": 1, "zendesk_event_version": "2022-11-06", "subject": f"zen:ticket:{ticket_id}",
        "detail": {"id": str(ticket_id), "status": current.upper(), "priority": priority.upper(),
                   "organization_id": account, "requester_id": "9001",
                   "created_at": _iso(ts), "updated_at": _iso(ts)},
        "event": {"previous": previous, "current": current} if kind == "status_changed" else {},
    }
    return orjson.dumps(payload)


class Generator:
    """History for ``accounts`` accounts over ``history_days`` days ending at ``now``."""

    def __init__(self, accounts: int, now: float, seed: int = 7, history_days: int = 45,
                 events_per_day: float = 6.0) -> None:
        self.rng = random.Random(seed)
        self.now = now
        self.history_days = history_days
        self.events_per_day = events_per_day
        names = list(PROFILES)
        weights = list(PROFILES.values())
        self.accounts = [(f"acct-{i:05d}", self.rng.choices(names, weights)[0])
                         for i in range(accounts)]
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n:09d}"

    def history(self) -> list[Message]:
        """All accounts' history, in event-time order (as producers would have sent it)."""
        out: list[Message] = []
        for account, profile in self.accounts:
            out.extend(self._account(account, profile))
        out.sort(key=lambda m: m.ts)
        return out

    def _usage(self, account: str, ts: float, users: int) -> Message:
        rng = self.rng
        user = f"{account}-u{rng.randrange(users)}"
        roll = rng.random()
        if roll < 0.25:
            name, feature = "Logged In", None
        elif roll < 0.85:
            feature = rng.choice(FEATURES)
            name = f"{feature.title()} Viewed"
        else:
            name, feature = "Report Exported", None
        key = account.encode()
        return Message("usage", key, segment_track(account, user, name, ts, self._id("msg"),
                                                   feature), ts)

    def _account(self, account: str, profile: str) -> list[Message]:
        rng, now = self.rng, self.now
        start = now - self.history_days * DAY
        if profile == "onboarding_stalled":
            start = now - 20 * DAY
        seats = rng.randint(3, 25)
        users = max(1, int(seats * rng.uniform(0.6, 1.0)))
        price = rng.choice((2900, 4900, 9900))
        msgs = [Message("billing", f"cus_{account}".encode(), stripe_event(
            "customer.subscription.created",
            stripe_subscription(account, "active", seats, price, period_end=now + 20 * DAY),
            start, self._id("evt")), start)]
        rate = self.events_per_day * rng.uniform(0.6, 1.6)
        t = start
        while t < now:
            age = (now - t) / DAY
            r = rate
            if profile == "declining" and age < 10:
                r = rate * 0.08
            if profile == "silent" and age < 12:
                r = 0
            if profile == "onboarding_stalled":
                r = rate * 0.3 if age > 17 else 0
            if r > 0:
                for _ in range(int(rng.expovariate(1 / r)) if r < 1 else rng.randint(
                        int(r * 0.5), int(r * 1.5))):
                    msgs.append(self._usage(account, t + rng.uniform(0, DAY), users))
            t += DAY
        if profile == "payment_failure":
            t0 = now - 6 * DAY
            for attempt in range(1, 5):
                last = attempt == 4
                msgs.append(Message("billing", f"cus_{account}".encode(), stripe_event(
                    "invoice.payment_failed", {
                        "id": f"in_{account}", "object": "invoice", "customer": f"cus_{account}",
                        "amount_due": price * seats, "currency": "usd",
                        "attempt_count": attempt,
                        "next_payment_attempt": None if last else int(t0 + attempt * 2 * DAY),
                        "subscription_details": {"metadata": {"account_id": account}},
                    }, t0 + (attempt - 1) * 1.5 * DAY, self._id("evt")), t0 + attempt))
        if profile == "cancel_scheduled":
            ts = now - 2 * DAY
            msgs.append(Message("billing", f"cus_{account}".encode(), stripe_event(
                "customer.subscription.updated",
                stripe_subscription(account, "active", seats, price, cancel_at_period_end=True,
                                    period_end=now + 20 * DAY),
                ts, self._id("evt"), previous={"cancel_at_period_end": False}), ts))
        if profile == "support_overload":
            for n in range(6):
                ts = now - rng.uniform(1, 12) * DAY
                tid = rng.randint(10_000, 99_999)
                msgs.append(Message("support", account.encode(), zendesk_ticket(
                    account, tid, "created", ts, self._id("zen"),
                    priority="urgent" if n % 2 else "high", current="new"), ts))
                if n < 2:
                    msgs.append(Message("support", account.encode(), zendesk_ticket(
                        account, tid, "status_changed", ts + 3600, self._id("zen"),
                        previous="solved", current="open"), ts + 3600))
        return msgs

    def live(self, ts: float) -> Message:
        """One live event for a random non-silent account at time ``ts``."""
        while True:
            account, profile = self.rng.choice(self.accounts)
            if profile not in ("silent", "declining"):
                return self._usage(account, ts, 5)


# -- through the gateway --------------------------------------------------------------------


def stripe_signature(secret: str, body: bytes, at: float) -> str:
    """``Stripe-Signature`` as Stripe sends it: ``t=<unix>,v1=<hex HMAC-SHA256 of "t.body">``."""
    t = int(at)
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def zendesk_signature(secret: str, body: bytes, at: float) -> dict[str, str]:
    """Zendesk's webhook headers: base64 HMAC-SHA256 over timestamp + body."""
    stamp = datetime.fromtimestamp(int(at), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).digest()
    return {"X-Zendesk-Webhook-Signature": base64.b64encode(digest).decode(),
            "X-Zendesk-Webhook-Signature-Timestamp": stamp}


@dataclass(frozen=True, slots=True)
class GatewayCredentials:
    write_key: str
    stripe_secret: str
    zendesk_secret: str


@dataclass
class SentStats:
    segment_messages: int = 0
    segment_batches: int = 0
    stripe_webhooks: int = 0
    zendesk_webhooks: int = 0
    dead_lettered: int = 0  # messages of a batch the gateway refused (on churn.dlq)
    retried: int = 0  # 503 + Retry-After answers, sent again

    @property
    def events(self) -> int:
        """Records the gateway wrote to the source topics."""
        return (self.segment_messages - self.dead_lettered + self.stripe_webhooks
                + self.zendesk_webhooks)


@dataclass
class GatewaySender:
    """Posts synthetic messages to a gateway as the providers would; every answer is checked
    (a refusal raises, a 503 is retried after its ``Retry-After``, as the SDKs and Stripe do)."""

    url: str
    credentials: GatewayCredentials
    session: aiohttp.ClientSession
    batch_size: int = 500  # ~170 KB of track calls: under Segment's 500 KB per batch
    stats: SentStats = field(default_factory=SentStats)

    async def _post(self, path: str, body: bytes, headers: dict[str, str],
                    auth: aiohttp.BasicAuth | None = None) -> dict[str, object]:
        for attempt in range(20):
            async with self.session.post(self.url + path, data=body, headers=headers,
                                         auth=auth) as resp:
                text = await resp.read()
                if resp.status == 200:
                    answer: dict[str, object] = orjson.loads(text)
                    return answer
                if resp.status != 503 or attempt == 19:
                    raise RuntimeError(f"the gateway answered {resp.status} to {path}: "
                                       f"{text[:500].decode(errors='replace')}")
                self.stats.retried += 1
                await asyncio.sleep(min(1.0, float(resp.headers.get("Retry-After", "1"))))
        raise AssertionError("unreachable")

    async def batch(self, values: Sequence[bytes]) -> None:
        """One Segment ``/v1/batch`` request (the SDKs' ``sentAt`` set now)."""
        if not values:
            return
        sent_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body = b'{"batch":[' + b",".join(values) + b'],"sentAt":"' + sent_at.encode() + b'"}'
        answer = await self._post("/v1/batch", body, {"Content-Type": "application/json"},
                                  aiohttp.BasicAuth(self.credentials.write_key, ""))
        self.stats.segment_messages += len(values)
        self.stats.segment_batches += 1
        self.stats.dead_lettered += int(answer.get("dead_lettered", 0))  # type: ignore[call-overload]

    async def webhook(self, m: Message) -> None:
        now = time.time()
        if m.topic == "billing":
            headers = {"Stripe-Signature": stripe_signature(self.credentials.stripe_secret,
                                                            m.value, now)}
            path = "/webhooks/stripe"
            self.stats.stripe_webhooks += 1
        elif m.topic == "support":
            headers = zendesk_signature(self.credentials.zendesk_secret, m.value, now)
            path = "/webhooks/zendesk"
            self.stats.zendesk_webhooks += 1
        else:
            raise ValueError(f"not a webhook: {m.topic}")
        await self._post(path, m.value, {"Content-Type": "application/json", **headers})

    async def _lane(self, messages: Sequence[Message]) -> None:
        pending: list[bytes] = []
        for m in messages:
            if m.topic == "usage":
                pending.append(m.value)
                if len(pending) >= self.batch_size:
                    await self.batch(pending)
                    pending = []
            else:  # in order with the account's usage before it
                await self.batch(pending)
                pending = []
                await self.webhook(m)
        await self.batch(pending)

    async def send(self, messages: Sequence[Message], lanes: int = 8) -> None:
        """Every message, in order per account: the accounts are spread over ``lanes``
        concurrent senders, each posting its accounts' messages in order."""
        split: list[list[Message]] = [[] for _ in range(lanes)]
        for m in messages:
            account = m.key.removeprefix(b"cus_")
            split[zlib.crc32(account) % lanes].append(m)
        await asyncio.gather(*(self._lane(part) for part in split))
