"""The gateway's aiohttp application: thin handlers around the pure checks, one producer.

Every POST: a request id (``X-Request-Id`` when sane, else a new one, echoed back); a slot
among ``max_inflight`` (else 503); the body read in chunks up to its route's limit (else 413,
without reading further); credentials before anything else; then the records, sent and
awaited to Kafka's acknowledgement before the 2xx. Secrets are never logged.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import ClientPayloadError, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from churnsignal.app.settings import Settings
from churnsignal.gateway import segment_api, verify, webhooks
from churnsignal.gateway.body import BodyError, decode_content, json_object
from churnsignal.gateway.metrics import GatewayMetrics
from churnsignal.gateway.openapi import document
from churnsignal.gateway.producer import KafkaUnavailable, Out, Producer
from churnsignal.schemas.decode import DecodeOptions
from churnsignal.stream.deadletter import DeadLetter

log = logging.getLogger("churnsignal.gateway")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")
READ_CHUNK = 64 * 1024
WARN_EVERY_S = 10


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


class Gateway:
    def __init__(self, settings: Settings, producer: Producer,
                 metrics: GatewayMetrics | None = None) -> None:
        g = settings.gateway
        self.settings = settings
        self.g = g
        self.producer = producer
        self.metrics = metrics or GatewayMetrics()
        self.topics = settings.topics
        self.write_keys = [k.get_secret_value().encode() for k in g.segment_write_keys]
        self.stripe_secrets = [k.get_secret_value().encode() for k in g.stripe_webhook_secrets]
        self.zendesk_secrets = [k.get_secret_value().encode() for k in g.zendesk_signing_secrets]
        self.intercom_secrets = [k.get_secret_value().encode()
                                 for k in g.intercom_client_secrets]
        self.slots = asyncio.Semaphore(g.max_inflight)
        self._warned = -float("inf")
        self.options = DecodeOptions(max_bytes=settings.ingest.max_message_bytes,
                                     max_future_s=settings.ingest.max_future_skew_s,
                                     max_age_s=float("inf"))

    # -- plumbing ---------------------------------------------------------------------------

    def _answer(self, route: str, status: int, body: dict[str, Any], rid: str,
                headers: dict[str, str] | None = None) -> web.Response:
        self.metrics.requests.labels(route, str(status)).inc()
        return web.Response(status=status, body=orjson.dumps(body),
                            content_type="application/json",
                            headers={"X-Request-Id": rid, **(headers or {})})

    async def _read(self, request: web.Request, limit: int) -> bytes:
        """At most ``limit`` bytes as sent (a longer body: 413 without reading it all)."""
        if request.content_length is not None and request.content_length > limit:
            raise Refused(413, "too_large", f"body is {request.content_length} bytes; limit "
                          f"{limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await request.content.read(READ_CHUNK)
            except (ClientPayloadError, ConnectionError) as exc:
                raise Refused(400, "incomplete_body", f"the body did not arrive whole "
                              f"({type(exc).__name__})") from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise Refused(413, "too_large", f"body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def _unavailable(self, message: str) -> Refused:
        return Refused(503, "unavailable", message, {"Retry-After": str(self.g.retry_after_s)})

    def route(self, name: str, handler: Callable[[web.Request, str], Awaitable[dict[str, Any]]]
              ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def wrapped(request: web.Request) -> web.Response:
            presented = request.headers.get("X-Request-Id", "")
            rid = presented if _REQUEST_ID.fullmatch(presented) else uuid.uuid4().hex
            started = time.perf_counter()
            if self.slots.locked():
                self.metrics.refused.labels(name, "overloaded").inc()
                return self._answer(name, 503, _error("overloaded", "too many requests in "
                                                      "flight; retry later", rid), rid,
                                    {"Retry-After": str(self.g.retry_after_s)})
            async with self.slots:
                self.metrics.inflight.inc()
                try:
                    body = await handler(request, rid)
                    return self._answer(name, 200, body, rid)
                except Refused as exc:
                    self.metrics.refused.labels(name, exc.code).inc()
                    if exc.status >= 500 and time.monotonic() - self._warned >= WARN_EVERY_S:
                        self._warned = time.monotonic()  # an outage is logged, not flooded
                        log.warning("%s %s: 503 %s (request %s; next such warning in %ds at "
                                    "the earliest)", request.method, name, exc, rid,
                                    WARN_EVERY_S)
                    return self._answer(name, exc.status, _error(exc.code, str(exc), rid), rid,
                                        exc.headers)
                finally:
                    self.metrics.inflight.dec()
                    self.metrics.latency.labels(name).observe(time.perf_counter() - started)

        return wrapped

    async def _send(self, records: list[Out]) -> None:
        try:
            await self.producer.send_all(records)
        except KafkaUnavailable as exc:
            raise self._unavailable(f"Kafka cannot take it now: {exc}") from None
        written: dict[str, int] = {}
        for r in records:
            written[r.topic] = written.get(r.topic, 0) + 1
            if r.topic == self.topics.dlq:  # counted once Kafka has it
                h = dict(r.headers)
                self.metrics.dead_lettered.labels(h["dlq_topic"].decode(),
                                                  h["dlq_reason"].decode()).inc()
        for topic, n in written.items():  # once per topic, not per record
            self.metrics.records.labels(topic).inc(n)

    def _dead(self, route: str, rid: str, source: str, reason: str, detail: str,
              key: bytes | None, value: bytes, received: float) -> Out:
        letter = DeadLetter(reason, detail, "gateway", route, None, None, int(received * 1000),
                            key, value, extra=(("dlq_request_id", rid.encode()),
                                               ("dlq_source", source.encode())))
        return Out(self.topics.dlq, key, value, letter.headers())

    @staticmethod
    def _headers(source: str, received: float, rid: str) -> list[tuple[str, bytes]]:
        return [("source", source.encode()),
                ("received-at", segment_api.iso(received).encode()),
                ("request-id", rid.encode())]

    # -- Segment ----------------------------------------------------------------------------

    def segment(self, call: str | None) -> Callable[[web.Request, str],
                                                    Awaitable[dict[str, Any]]]:
        route = f"/v1/{call or 'batch'}"

        async def handle(request: web.Request, rid: str) -> dict[str, Any]:
            limit = self.g.max_batch_bytes if call is None else self.g.max_message_bytes
            authorization = request.headers.get("Authorization")
            if verify.basic_user(authorization):  # check the key before reading the body
                self._check(verify.segment_write_key(authorization, None, self.write_keys))
            try:
                raw = decode_content(await self._read(request, limit),
                                     request.headers.get("Content-Encoding"), limit)
                payload = json_object(raw)
            except BodyError as exc:
                raise Refused(exc.status, exc.code, str(exc)) from None
            if not verify.basic_user(authorization):
                self._check(verify.segment_write_key(None, payload.get("writeKey"),
                                                     self.write_keys))
            try:
                messages, sent_at = segment_api.messages_of(payload, call)
            except ValueError as exc:
                raise Refused(400, "invalid", str(exc)) from None
            received = time.time()
            out: list[Out] = []
            dead = 0
            headers = self._headers("segment", received, rid)
            for message in messages:
                checked = segment_api.check(message, self.g.max_message_bytes, received,
                                            sent_at, self.options, call)
                if isinstance(checked, segment_api.Record):
                    out.append(Out(self.topics.usage, checked.key, checked.value, headers))
                elif call is not None:
                    status = 413 if checked.reason == "too_large" else 400
                    raise Refused(status, checked.reason, checked.detail)
                else:
                    dead += 1
                    out.append(self._dead(route, rid, "segment", checked.reason, checked.detail,
                                          None, checked.value, received))
            await self._send(out)
            return {"success": True} if not dead else {"success": True, "dead_lettered": dead}

        return handle

    @staticmethod
    def _check(refusal: verify.Refusal | None) -> None:
        if refusal is not None:
            raise Refused(refusal.status, refusal.code, refusal.message)

    # -- webhooks ---------------------------------------------------------------------------

    def webhook(self, provider: webhooks.Provider) -> Callable[[web.Request, str],
                                                               Awaitable[dict[str, Any]]]:
        route = f"/webhooks/{provider}"
        topic = self.topics.billing if provider == "stripe" else self.topics.support

        async def handle(request: web.Request, rid: str) -> dict[str, Any]:
            limit = self.g.max_webhook_bytes
            try:
                raw = decode_content(await self._read(request, limit),
                                     request.headers.get("Content-Encoding"), limit)
            except BodyError as exc:
                raise Refused(exc.status, exc.code, str(exc)) from None
            now = time.time()
            h = request.headers
            if provider == "stripe":
                refusal = verify.stripe_signature(h.get("Stripe-Signature"), raw,
                                                  self.stripe_secrets, now,
                                                  self.g.signature_tolerance_s)
            elif provider == "zendesk":
                refusal = verify.zendesk_signature(
                    h.get("X-Zendesk-Webhook-Signature"),
                    h.get("X-Zendesk-Webhook-Signature-Timestamp"), raw, self.zendesk_secrets,
                    now, self.g.signature_tolerance_s)
            else:
                refusal = verify.intercom_signature(h.get("X-Hub-Signature"), raw,
                                                    self.intercom_secrets)
            self._check(refusal)
            try:
                payload = json_object(raw)
            except BodyError as exc:
                raise Refused(exc.status, exc.code, str(exc)) from None
            if provider == "stripe" and webhooks.thin_stripe_event(payload):
                raise Refused(400, "thin_event_unsupported", webhooks.THIN_EVENT)
            verdict = webhooks.verdict(provider, payload, raw, self.options, now)
            if verdict.rejected is not None:
                await self._send([self._dead(route, rid, provider, verdict.rejected.reason,
                                             verdict.rejected.detail, verdict.key, raw, now)])
                return {"received": True, "dead_lettered": verdict.rejected.reason}
            await self._send([Out(topic, verdict.key, raw, self._headers(provider, now, rid))])
            return {"received": True}

        return handle

    # -- probes -----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "kafka_connected": self.producer.connected})

    async def readyz(self, request: web.Request) -> web.Response:
        needed = [self.topics.usage, self.topics.billing, self.topics.support, self.topics.dlq]
        ready, detail = await self.producer.topics_present(needed)
        self.metrics.kafka_up.set(1 if ready else 0)
        return web.json_response({"ready": ready, "kafka": detail}, status=200 if ready else 503)

    async def metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            content_type=CONTENT_TYPE_LATEST.split(";")[0])

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    def app(self) -> web.Application:
        # The body limit is enforced per route by _read; aiohttp's own is set above all of them.
        biggest = max(self.g.max_batch_bytes, self.g.max_webhook_bytes) + 1
        app = web.Application(client_max_size=biggest)
        app.router.add_post("/v1/batch", self.route("/v1/batch", self.segment(None)))
        for call in segment_api.ROUTES:
            app.router.add_post(f"/v1/{call}", self.route(f"/v1/{call}", self.segment(call)))
        for provider in ("stripe", "zendesk", "intercom"):
            app.router.add_post(f"/webhooks/{provider}",
                                self.route(f"/webhooks/{provider}", self.webhook(provider)))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_view)
        app.router.add_get("/openapi.json", self.openapi)
        return app


def _error(code: str, message: str, rid: str) -> dict[str, Any]:
    # code and message: what Segment's and RudderStack's SDKs read from an error answer.
    return {"success": False, "code": code, "message": message, "request_id": rid}


def build(settings: Settings) -> tuple[Gateway, Producer]:
    from churnsignal.app.kafka_client import connection_options

    g = settings.gateway
    producer = Producer(connection_options(settings), idempotence=g.idempotence,
                        timeout_s=g.produce_timeout_s,
                        max_request_size=max(g.max_webhook_bytes, g.max_batch_bytes) + 65_536)
    return Gateway(settings, producer), producer


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then stop taking requests, finish those in flight and
    close the producer (which flushes)."""
    gateway, producer = build(settings)
    producer.start()
    # auto_decompress off: gzip is inflated by decode_content, within the route's limit.
    runner = web.AppRunner(gateway.app(), auto_decompress=False, access_log=None,
                           handle_signals=False)
    await runner.setup()
    # What start-up made (modules, settings, the app) lives as long as the process: kept out
    # of the collector's full passes, which then only walk what requests leave behind.
    gc.freeze()
    site = web.TCPSite(runner, settings.gateway.host, settings.gateway.port)
    await site.start()
    log.info("gateway listening on http://%s:%s (Kafka %s)", settings.gateway.host,
             settings.gateway.port, settings.kafka_bootstrap_servers)
    try:
        await stop.wait()
    finally:
        log.info("gateway stopping: no new requests; finishing those in flight")
        await runner.cleanup()
        await producer.close()
        log.info("gateway stopped")


def run(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
