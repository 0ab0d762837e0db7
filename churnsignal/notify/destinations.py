"""What a destination sends for each alert, and the state Alertmanager needs (pure).

A destination turns an alert into at most one HTTP request (None: nothing to send, e.g. a
de-escalation PagerDuty never paged for). ``accepted`` is called once the destination took
the request or refused it for good, and only then may state move on; Alertmanager keeps the
accounts that are firing, per Kafka partition (alerts are keyed by account, so a partition
holds all of an account's alerts), to re-send them and to resolve them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import orjson

from churnsignal.notify import formats
from churnsignal.notify.routing import Route
from churnsignal.schemas.alerts import Alert

Kind = Literal["webhook", "legacy-json", "slack", "pagerduty", "alertmanager"]
KINDS: Final = ("webhook", "legacy-json", "slack", "pagerduty", "alertmanager")
JSON: Final = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Spec:
    """One configured destination (URLs and keys are secrets: never logged)."""

    name: str
    kind: Kind
    url: str
    secret: str | None = None  # webhook: whsec_...
    routing_key: str | None = None  # pagerduty
    app_id: str = "churnsignal"
    min_band: str = "high"
    account_url: str | None = None
    timeout_s: float = 10.0
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    resend_s: float = 60.0  # alertmanager
    # the policy's routes naming this destination (churnsignal.notify.routing); None:
    # every alert
    routes: tuple[Route, ...] | None = None

    @property
    def group(self) -> str:
        return f"{self.app_id}-notify-{self.name}"


@dataclass(frozen=True)
class Request:
    """A POST body and headers; ``sign_id``: sign it (Standard Webhooks) at each attempt."""

    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    sign_id: str | None = None
    url: str | None = None  # None: the destination's URL


@dataclass(frozen=True)
class Firing:
    """An account Alertmanager is told is firing, with the labels it was sent under."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    generator_url: str | None


class Destination:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.name = spec.name

    remembers: bool = False  # keeps state rebuilt from the alerts topic's history

    def request(self, alert: Alert, partition: int, now: float) -> Request | None:
        raise NotImplementedError

    def accepted(self, alert: Alert, partition: int) -> None:
        """The destination took (or refused for good) what ``request`` gave for ``alert``."""

    def resend(self, now: float) -> list[Request]:
        """Periodic requests (Alertmanager: the accounts still firing)."""
        return []

    def drop(self, partitions: set[int]) -> None:
        """Partitions another consumer now owns: forget their state."""


class SignedWebhook(Destination):
    def request(self, alert: Alert, partition: int, now: float) -> Request | None:
        return Request(formats.webhook_body(alert), sign_id=alert.alert_id)


class LegacyJson(Destination):
    """CHURNSIGNAL_WEBHOOK__URL with format json: the alert as on the topic, unsigned."""

    def request(self, alert: Alert, partition: int, now: float) -> Request | None:
        return Request(alert.model_dump_json().encode())


class Slack(Destination):
    def request(self, alert: Alert, partition: int, now: float) -> Request | None:
        link = formats.account_link(self.spec.account_url, alert.account_id)
        return Request(orjson.dumps(formats.slack_message(alert, link)))


class PagerDuty(Destination):
    def request(self, alert: Alert, partition: int, now: float) -> Request | None:
        link = formats.account_link(self.spec.account_url, alert.account_id)
        event = formats.pagerduty_event(alert, self.spec.routing_key or "", self.spec.app_id,
                                        self.spec.min_band, link)
        return None if event is None else Request(orjson.dumps(event))


class Alertmanager(Destination):
    """Firing while at or above ``min_band``; re-sent every ``resend_s`` with ``endsAt``
    four intervals ahead (as Prometheus does), so a churnsignal that stops lets them resolve
    on their own; resolved explicitly (``endsAt`` = now) when the account falls below. A new
    band or top reason is a new label set: the old one is resolved in the same request."""

    remembers = True

    def __init__(self, spec: Spec) -> None:
        super().__init__(spec)
        self.firing: dict[int, dict[str, Firing]] = {}
        base = spec.url.rstrip("/")
        self.endpoint = base if base.endswith("/api/v2/alerts") else base + "/api/v2/alerts"

    def _next(self, alert: Alert) -> Firing | None:
        if formats.rank(alert.band) < formats.rank(self.spec.min_band):
            return None
        return Firing(formats.alertmanager_labels(alert), formats.alertmanager_annotations(alert),
                      alert.emitted_at,
                      formats.account_link(self.spec.account_url, alert.account_id))

    def plan(self, alert: Alert, partition: int) -> tuple[Firing | None, Firing | None]:
        """(what to resolve, what to fire) for this alert."""
        old = self.firing.get(partition, {}).get(alert.account_id)
        new = self._next(alert)
        if old is not None and new is not None and old.labels == new.labels:
            new = Firing(new.labels, new.annotations, old.starts_at, new.generator_url)
            return None, new
        return old, new

    def request(self, alert: Alert, partition: int, now: float) -> Request | None:
        old, new = self.plan(alert, partition)
        items = []
        if old is not None:
            items.append(formats.postable_alert(old.labels, old.annotations, old.starts_at,
                                                now, old.generator_url))
        if new is not None:
            items.append(self._postable(new, now))
        return Request(orjson.dumps(items), url=self.endpoint) if items else None

    def _postable(self, f: Firing, now: float) -> dict[str, object]:
        return formats.postable_alert(f.labels, f.annotations, f.starts_at,
                                      now + 4 * self.spec.resend_s, f.generator_url)

    def accepted(self, alert: Alert, partition: int) -> None:
        _, new = self.plan(alert, partition)
        accounts = self.firing.setdefault(partition, {})
        if new is None:
            accounts.pop(alert.account_id, None)
        else:
            accounts[alert.account_id] = new

    def firing_accounts(self) -> dict[str, Firing]:
        return {a: f for accounts in self.firing.values() for a, f in accounts.items()}

    def resend(self, now: float, chunk: int = 500) -> list[Request]:
        items = [self._postable(f, now) for f in self.firing_accounts().values()]
        return [Request(orjson.dumps(items[i:i + chunk]), url=self.endpoint)
                for i in range(0, len(items), chunk)]

    def drop(self, partitions: set[int]) -> None:
        for p in partitions:
            self.firing.pop(p, None)


def make(spec: Spec) -> Destination:
    kinds: dict[str, type[Destination]] = {
        "webhook": SignedWebhook, "legacy-json": LegacyJson, "slack": Slack,
        "pagerduty": PagerDuty, "alertmanager": Alertmanager}
    return kinds[spec.kind](spec)
