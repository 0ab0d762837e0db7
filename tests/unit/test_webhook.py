"""Webhook delivery against a real local HTTP server: retries, permanent failures, a full queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import WebhookSettings
from churnsignal.app.webhook import WebhookNotifier, slack_payload
from churnsignal.schemas.alerts import Alert, AlertReason


def _alert(n: int = 1) -> Alert:
    return Alert(alert_id=f"a{n}", account_id="acme", kind="escalated", score=82, band="critical",
                 previous_band="medium", mrr_at_risk_cents=24_500, trigger_event_id="evt_1",
                 triggered_at=1.0, emitted_at=2.0, policy_version="default",
                 reasons=[AlertReason(code="cancellation_scheduled", value=1, contribution=60,
                                      kind="voluntary", play="offer_pause_or_plan_change",
                                      detail="Cancellation scheduled at period end")])


class Endpoint:
    """Answers each POST with the next status of ``script`` (then 200), recording bodies."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(orjson.loads(await request.read()))
        status = self.script.pop(0) if self.script else 200
        return web.Response(status=status)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Endpoint, str]]:
    endpoint = Endpoint([])
    app = web.Application()
    app.router.add_post("/hook", endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield endpoint, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def _run(notifier: WebhookNotifier, alerts: list[Alert]) -> None:
    task = asyncio.create_task(notifier.run())
    try:
        for a in alerts:
            notifier.submit(a)
        await asyncio.wait_for(notifier.queue.join(), 20)
    finally:
        task.cancel()


def _count(metrics: Metrics, outcome: str) -> float:
    return metrics.webhook_deliveries.labels(outcome=outcome)._value.get()


async def test_server_errors_are_retried_until_delivered(server: tuple[Endpoint, str]) -> None:
    endpoint, url = server
    endpoint.script = [500, 503]
    metrics = Metrics()
    notifier = WebhookNotifier(WebhookSettings(url=url, retry_max_s=0.1), metrics)
    await _run(notifier, [_alert()])
    assert len(endpoint.bodies) == 3
    assert endpoint.bodies[-1]["alert_id"] == "a1"  # format json: the alert as on the topic
    assert _count(metrics, "delivered") == 1 and _count(metrics, "failed") == 0


async def test_client_errors_are_not_retried(server: tuple[Endpoint, str]) -> None:
    endpoint, url = server
    endpoint.script = [400]
    metrics = Metrics()
    notifier = WebhookNotifier(WebhookSettings(url=url, retry_max_s=0.1), metrics)
    await _run(notifier, [_alert(1), _alert(2)])
    assert [b["alert_id"] for b in endpoint.bodies] == ["a1", "a2"]
    assert _count(metrics, "failed") == 1 and _count(metrics, "delivered") == 1


async def test_unreachable_endpoint_gives_up_after_max_attempts() -> None:
    metrics = Metrics()
    notifier = WebhookNotifier(WebhookSettings(url="http://127.0.0.1:9/hook", max_attempts=2,
                                               retry_max_s=0.05, timeout_s=1), metrics)
    await _run(notifier, [_alert()])
    assert _count(metrics, "failed") == 1


async def test_full_queue_drops_and_counts_instead_of_blocking() -> None:
    metrics = Metrics()
    notifier = WebhookNotifier(WebhookSettings(url="http://127.0.0.1:9/hook", queue_max=2), metrics)
    for n in range(5):
        notifier.submit(_alert(n))  # nobody drains: the caller must not wait
    assert notifier.queue.qsize() == 2
    assert _count(metrics, "dropped") == 3


async def test_slack_format(server: tuple[Endpoint, str]) -> None:
    endpoint, url = server
    notifier = WebhookNotifier(WebhookSettings(url=url, format="slack"), Metrics())
    await _run(notifier, [_alert()])
    body = endpoint.bodies[0]
    assert body == slack_payload(_alert())
    assert "*acme*" in body["text"] and "critical" in body["text"] and "$245.00" in body["text"]
    assert "offer_pause_or_plan_change" in body["blocks"][1]["text"]["text"]


def test_webhook_url_is_a_secret() -> None:
    from churnsignal.app.settings import Settings

    s = Settings(webhook={"url": "https://hooks.slack.com/services/T0/B0/SECRET"})
    assert "SECRET" not in str(s.masked())
