"""The older, in-memory alert webhook (Slack-compatible or the alert JSON as is).

No longer used by the worker: ``CHURNSIGNAL_WEBHOOK__URL`` is now delivered durably from the
alerts topic by ``churnsignal.notify`` (see ``churnsignal.notify.config``). Kept for callers
of this module; what follows describes how it behaves.

Alerts are durable on ``churn.alerts`` first; the webhook is a convenience on top. So the
stream never waits for it: alerts go into a bounded queue that one background task drains,
with a timeout and retries per POST. When the queue is full the alert is not posted (it is
still on the topic) and that is counted and logged, never silently.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import WebhookSettings
from churnsignal.schemas.alerts import Alert

log = logging.getLogger("churnsignal.app.webhook")

_EMOJI = {"critical": ":rotating_light:", "high": ":warning:", "medium": ":large_yellow_circle:",
          "low": ":white_check_mark:"}


class PermanentFailure(Exception):
    """The endpoint refused the payload (a 4xx other than 408/429): retrying cannot help."""


def slack_payload(alert: Alert) -> dict[str, Any]:
    """A Slack incoming-webhook message (``text`` plus a section block per reason)."""
    mrr = alert.mrr_at_risk_cents / 100
    verb = "rose to" if alert.kind == "escalated" else "fell to"
    head = (f"{_EMOJI[alert.band]} Account *{alert.account_id}* {verb} *{alert.band}* churn "
            f"risk (score {alert.score:.0f}, was {alert.previous_band}); MRR at risk ${mrr:,.2f}")
    lines = [f"• {r.detail} ({r.kind}) → play: `{r.play}`" for r in alert.reasons[:3]]
    return {
        "text": head,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": head}},
            *([{"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}}]
              if lines else []),
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": f"alert_id {alert.alert_id}"}]},
        ],
    }


def payload(alert: Alert, fmt: str) -> bytes:
    if fmt == "slack":
        return orjson.dumps(slack_payload(alert))
    return alert.model_dump_json().encode()


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, PermanentFailure)


class WebhookNotifier:
    """Posts alerts from a bounded queue; ``submit`` never blocks the caller."""

    def __init__(self, settings: WebhookSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=settings.queue_max)
        self._session: aiohttp.ClientSession | None = None

    def submit(self, alert: Alert) -> None:
        try:
            self.queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.metrics.webhook_deliveries.labels(outcome="dropped").inc()
            log.warning("webhook queue full; alert not posted (it is on the alerts topic)",
                        extra={"alert_id": alert.alert_id, "account_id": alert.account_id})

    async def run(self) -> None:
        """Drain the queue until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            while True:
                alert = await self.queue.get()
                try:
                    await self.deliver(alert)
                finally:
                    self.queue.task_done()

    async def deliver(self, alert: Alert) -> bool:
        """POST one alert with retries; True when the endpoint took it."""
        assert self._session is not None
        body = payload(alert, self.settings.format)
        url = self.settings.url.get_secret_value() if self.settings.url else ""
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.settings.max_attempts),
                    wait=wait_exponential_jitter(multiplier=0.2, max=self.settings.retry_max_s),
                    retry=retry_if_exception(_retryable), reraise=True):
                with attempt:
                    await self._post(url, body)
        except Exception as exc:
            self.metrics.webhook_deliveries.labels(outcome="failed").inc()
            # The URL is a secret (Slack embeds a token in it): log the reason only.
            log.warning("webhook delivery failed: %s", type(exc).__name__ if not isinstance(
                exc, PermanentFailure) else exc, extra={"alert_id": alert.alert_id,
                                                        "account_id": alert.account_id})
            return False
        self.metrics.webhook_deliveries.labels(outcome="delivered").inc()
        return True

    async def _post(self, url: str, body: bytes) -> None:
        assert self._session is not None
        async with self._session.post(url, data=body,
                                      headers={"Content-Type": "application/json"}) as resp:
            if resp.status < 300:
                return
            if resp.status in (408, 429) or resp.status >= 500:
                raise RuntimeError(f"HTTP {resp.status}")  # retried
            raise PermanentFailure(f"HTTP {resp.status}")

    async def drain(self, timeout: float) -> None:
        """At shutdown: give queued alerts a bounded chance to go out."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except TimeoutError:
            log.warning("%d alerts not posted to the webhook at shutdown (they are on the "
                        "alerts topic)", self.queue.qsize())
