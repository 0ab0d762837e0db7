"""Every configured destination's delivery loop: inside the worker, or as `churnsignal notify`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from churnsignal.app.kafka_client import connection_options
from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings
from churnsignal.errors import ConfigError
from churnsignal.notify import backoff, config
from churnsignal.notify.delivery import DeliveryLoop
from churnsignal.notify.destinations import Spec, make
from churnsignal.notify.metrics import NotifyMetrics
from churnsignal.notify.routing import NotifyPolicy

log = logging.getLogger("churnsignal.notify")

NO_DESTINATION = ("no alert destination is configured: set CHURNSIGNAL_NOTIFY__WEBHOOK_URL (and "
                  "__WEBHOOK_SECRET), __SLACK_WEBHOOK_URL, __PAGERDUTY_ROUTING_KEY or "
                  "__ALERTMANAGER_URL")


class Notifier:
    """One delivery loop per destination, one producer for the undeliverable topic."""

    def __init__(self, settings: Settings, metrics: Metrics, specs: list[Spec]) -> None:
        self.s = settings
        self.specs = specs
        self.metrics = NotifyMetrics(metrics.registry, legacy=metrics.webhook_deliveries)
        self.loops: list[DeliveryLoop] = []
        self.started = False

    @property
    def ready(self) -> bool:
        """Every destination's consumer has joined its group."""
        return self.started and all(loop.joined for loop in self.loops)

    async def run(self) -> None:
        """Until cancelled."""
        producer = await self._start()
        try:
            self.loops = [DeliveryLoop(make(spec), self.s, self.metrics, producer)
                          for spec in self.specs]
            self.started = True
            log.info("delivering alerts from %s to %s", self.s.topics.alerts,
                     ", ".join(f"{s.name} (group {s.group}{', routed' if s.routes else ''})"
                               for s in self.specs))
            await asyncio.gather(*(loop.run() for loop in self.loops))
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _start(self) -> AIOKafkaProducer:
        """The undeliverable topic exists and a producer for it runs (retried while the
        broker does not answer: the rest of the worker goes on meanwhile)."""
        attempt = 0
        while True:
            producer = AIOKafkaProducer(acks="all", **connection_options(self.s))
            try:
                await self._ensure_topics()
                await producer.start()
                return producer
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                with contextlib.suppress(Exception):
                    await producer.stop()
                wait = backoff.delay(attempt, 1.0, 30.0)
                log.warning("notify: Kafka not ready (%s: %s); retrying in %.0fs",
                            type(exc).__name__, exc, wait)
                await asyncio.sleep(wait)

    async def _ensure_topics(self) -> None:
        admin = AIOKafkaAdminClient(request_timeout_ms=15_000, **connection_options(self.s))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [NewTopic(name, num_partitions=self.s.partitions,
                                replication_factor=self.s.kafka.replication_factor)
                       for name in (self.s.topics.alerts, self.s.topics.undeliverable)
                       if name not in existing]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(missing)
        finally:
            await admin.close()


def destinations(settings: Settings, policy_file: Any = None) -> list[Spec]:
    from churnsignal.stream.policy import load_policy

    policy = load_policy(policy_file if policy_file is not None else settings.policy_file)
    return config.specs(settings, policy.alerting.min_band, policy.notify)


def worker_notifier(settings: Settings, metrics: Metrics, min_band: str,
                    routing: NotifyPolicy | None = None) -> Notifier | None:
    """The worker's delivery, when a destination is configured and notify.in_worker is on;
    a ConfigError (checked at start) when a destination is misconfigured. ``routing``: the
    policy's notify section (named destinations and routes)."""
    specs = config.specs(settings, min_band, routing)
    if not specs:
        return None
    if not settings.notify.in_worker:
        log.info("alert delivery is off in the worker (CHURNSIGNAL_NOTIFY__IN_WORKER=false); "
                 "`churnsignal notify` delivers")
        return None
    return Notifier(settings, metrics, specs)


async def run_standalone(settings: Settings) -> None:
    """`churnsignal notify`: the delivery loops, /metrics, /healthz and /readyz on the web
    port, until SIGTERM or SIGINT."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    specs = destinations(settings)
    if not specs:
        raise ConfigError(NO_DESTINATION)
    metrics = Metrics()
    notifier = Notifier(settings, metrics, specs)
    started = time.monotonic()

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            content_type=CONTENT_TYPE_LATEST.split(";")[0])

    async def healthz(request: web.Request) -> web.Response:
        # The loop answers: delivery waits on receivers and Kafka by design, never a stall.
        return web.json_response({"status": "ok", "uptime_s": round(time.monotonic() - started)})

    async def readyz(request: web.Request) -> web.Response:
        joined = {loop.name: loop.joined for loop in notifier.loops}
        ready = notifier.ready
        return web.json_response({"ready": ready, "joined": joined}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.web_host, settings.web_port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(notifier.run())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped it
    finally:
        for t in (task, stopper):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await runner.cleanup()
    log.info("notify stopped")
