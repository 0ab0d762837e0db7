"""One destination's delivery: a Kafka consumer group on the alerts topic that commits an
alert's offset only after the destination took it (2xx) or refused it for good.

Partitions are delivered independently (a partition waits on its head alert, retried with
capped exponential back-off, while the others go on: alerts are keyed by account, so each
account's alerts stay in order), and the fetch loop keeps polling (paused partitions) so the
group membership holds through a receiver outage of any length. Every destination has its
own consumer, HTTP session and tasks: a slow one never slows the stream or the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from churnsignal.app.kafka_client import connection_options
from churnsignal.app.settings import Settings
from churnsignal.notify import backoff, formats
from churnsignal.notify.destinations import Destination, Request
from churnsignal.notify.metrics import NotifyMetrics
from churnsignal.notify.routing import Router
from churnsignal.schemas.alerts import Alert

log = logging.getLogger("churnsignal.notify")

BODY_MAX = 4096  # bytes of a refusing response kept with the undeliverable alert
REBUILD_TIMEOUT_S = 120.0


class DeliveryLoop:
    def __init__(self, dest: Destination, settings: Settings, metrics: NotifyMetrics,
                 producer: AIOKafkaProducer, rand: Callable[[], float] = random.random) -> None:
        self.dest = dest
        self.spec = dest.spec
        self.name = dest.name
        self.s = settings
        self.m = metrics
        self.producer = producer
        self.rand = rand
        self.topic = settings.topics.alerts
        self.tasks: dict[TopicPartition, asyncio.Task[None]] = {}
        self.done: dict[TopicPartition, int] = {}  # next offset to deliver, per partition
        self.heads: dict[TopicPartition, float] = {}  # timestamp (s) of the alert in delivery
        self.commit_lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.joined = False
        self._resending: asyncio.Task[None] | None = None
        # the policy's routes for this destination (None: every alert goes)
        self.router = (Router(self.spec.routes, self.spec.min_band)
                       if self.spec.routes is not None else None)

    # --- the consumer -------------------------------------------------------------------

    def _new_consumer(self, group: bool = True) -> AIOKafkaConsumer:
        k = self.s.kafka
        session_ms = int(k.session_timeout_s * 1000)
        return AIOKafkaConsumer(
            group_id=self.spec.group if group else None,
            client_id=f"{self.spec.group}",
            enable_auto_commit=False,
            auto_offset_reset=self.s.notify.start_from if group else "earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=int(min(3.0, k.session_timeout_s / 3) * 1000),
            rebalance_timeout_ms=int(k.rebalance_timeout_s * 1000),
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            **connection_options(self.s))

    async def run(self) -> None:
        """Deliver until cancelled; a broker that does not answer is retried."""
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout_s)
        failures = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.session = session
            while True:
                consumer = self._new_consumer()
                try:
                    await consumer.start()
                    self.consumer = consumer
                    consumer.subscribe([self.topic], listener=_Listener(self))
                    failures = 0
                    await self._loop(consumer)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    log.warning("notify %s: Kafka consumer failed (%s: %s); restarting",
                                self.name, type(exc).__name__, exc)
                    await asyncio.sleep(backoff.delay(failures, 1.0, 30.0, self.rand))
                finally:
                    self.joined = False
                    await self._release(set(self.tasks))
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    self.consumer = None

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        gauges_at = 0.0
        resend_at = time.monotonic() + self.spec.resend_s
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=500)
            for tp, records in batch.items():
                if records:
                    consumer.pause(tp)  # until this batch is delivered: in order
                    self.tasks[tp] = asyncio.create_task(self._partition(tp, records))
            for tp, task in list(self.tasks.items()):
                if not task.done():
                    continue
                del self.tasks[tp]
                if not task.cancelled() and task.exception() is not None:
                    log.error("notify %s: delivery of %s failed unexpectedly; re-reading from "
                              "offset %s", self.name, tp, self.done.get(tp),
                              exc_info=task.exception())
                    if tp in self.done and tp in consumer.assignment():
                        consumer.seek(tp, self.done[tp])
                if tp in consumer.assignment():
                    consumer.resume(tp)
            now = time.monotonic()
            if now >= gauges_at:
                gauges_at = now + 1.0
                self._gauges(consumer)
            if self.dest.remembers and now >= resend_at:
                resend_at = now + self.spec.resend_s
                if self._resending is None or self._resending.done():
                    self._resending = asyncio.create_task(self._resend())

    def _gauges(self, consumer: AIOKafkaConsumer) -> None:
        lag = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None and tp in self.done:
                lag += max(0, high - self.done[tp])
        self.m.lag.labels(destination=self.name).set(lag)
        oldest = min(self.heads.values(), default=None)
        self.m.oldest_age.labels(destination=self.name).set(
            0.0 if oldest is None else max(0.0, time.time() - oldest))

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self.consumer
        assert consumer is not None
        ends: dict[TopicPartition, int] = {}
        for tp in assigned:
            committed = await consumer.committed(tp)
            if committed is not None:
                self.done[tp] = committed
                ends[tp] = committed
        if (self.dest.remembers or self.router is not None) and ends:
            await self._rebuild(ends)
        if self.dest.remembers and ends:
            if self._resending is None or self._resending.done():  # at once, not in a while
                self._resending = asyncio.create_task(self._resend())
        self.joined = True
        log.info("notify %s: partitions %s assigned", self.name,
                 sorted(tp.partition for tp in assigned))

    async def _release(self, revoked: set[TopicPartition]) -> None:
        tasks = [self.tasks.pop(tp) for tp in revoked if tp in self.tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for tp in revoked:
            self.done.pop(tp, None)
            self.heads.pop(tp, None)
        self.dest.drop({tp.partition for tp in revoked})
        if self.router is not None:
            self.router.drop({tp.partition for tp in revoked})

    async def _rebuild(self, ends: dict[TopicPartition, int]) -> None:
        """What the destination remembers (Alertmanager: the firing accounts), from the
        alerts it was already given: the topic from its start up to the committed offsets."""
        reader = self._new_consumer(group=False)
        await reader.start()
        n = 0
        try:
            reader.assign(list(ends))
            await reader.seek_to_beginning(*ends)
            todo = {tp for tp, end in ends.items() if end > 0}
            deadline = time.monotonic() + REBUILD_TIMEOUT_S
            while todo and time.monotonic() < deadline:
                batch = await reader.getmany(*todo, timeout_ms=500, max_records=5000)
                for tp, records in batch.items():
                    for rec in records:
                        if rec.offset >= ends[tp]:
                            break
                        alert = _alert(rec.value)
                        if alert is not None and self._routed(alert, tp.partition):
                            self.dest.accepted(alert, tp.partition)
                            n += 1
                for tp in list(todo):
                    if await reader.position(tp) >= ends[tp]:
                        todo.discard(tp)
            if todo:
                log.warning("notify %s: rebuilding state of %s timed out", self.name, todo)
        finally:
            await reader.stop()
        log.info("notify %s: state rebuilt from %d delivered alerts", self.name, n)

    # --- delivery -----------------------------------------------------------------------

    async def _partition(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]
                         ) -> None:
        self.done.setdefault(tp, records[0].offset)  # a new group: where it started
        for rec in records:
            self.heads[tp] = rec.timestamp / 1000.0
            await self._deliver(tp, rec)
            await self._commit(tp, rec.offset + 1)
            self.done[tp] = rec.offset + 1
        self.heads.pop(tp, None)

    async def _deliver(self, tp: TopicPartition, rec: ConsumerRecord[Any, Any]) -> None:
        alert = _alert(rec.value)
        if alert is None:
            await self._undeliverable(rec, 0, "not an alert (does not match the alert schema)")
            return
        if not self._routed(alert, tp.partition):  # the policy's routes send it elsewhere
            self.m.delivered.labels(destination=self.name, outcome="skipped").inc()
            return
        try:
            request = self.dest.request(alert, tp.partition, time.time())
        except Exception as exc:  # a bug with this alert: it alone goes aside
            log.exception("notify %s: could not format alert %s", self.name, alert.alert_id)
            await self._undeliverable(rec, 0, f"could not format: {type(exc).__name__}")
            return
        if request is None:
            self.dest.accepted(alert, tp.partition)
            self.m.delivered.labels(destination=self.name, outcome="skipped").inc()
            return
        attempt = 0
        while True:
            status, text, after = await self._post(request)
            outcome = backoff.classify(status) if status > 0 else "retry"
            if outcome == "accepted":
                self.dest.accepted(alert, tp.partition)
                self.m.delivered.labels(destination=self.name, outcome="delivered").inc()
                if self.m.legacy is not None and self.spec.kind == "legacy-json":
                    self.m.legacy.labels(outcome="delivered").inc()
                if attempt:
                    log.info("notify %s: alert %s delivered after %d retries", self.name,
                             alert.alert_id, attempt)
                return
            if outcome == "refused":
                await self._undeliverable(rec, status, text)
                return
            attempt += 1
            self.m.retried.labels(destination=self.name).inc()
            wait = backoff.retry_after(after, time.time(), self.spec.retry_max_s)
            if wait is None:
                wait = backoff.delay(attempt, self.spec.retry_base_s, self.spec.retry_max_s,
                                     self.rand)
            if attempt == 1 or attempt % 10 == 0:
                # never the URL: Slack's and others' hold a token
                log.warning("notify %s: alert %s not accepted (%s), attempt %d; retrying in "
                            "%.1fs", self.name, alert.alert_id,
                            f"HTTP {status}" if status > 0 else text, attempt, wait,
                            extra={"alert_id": alert.alert_id, "account_id": alert.account_id})
            await asyncio.sleep(wait)

    def _routed(self, alert: Alert, partition: int) -> bool:
        return self.router is None or self.router.route(alert, partition)

    async def _post(self, request: Request) -> tuple[int, str, str | None]:
        """(status, body or error name, Retry-After); status 0: no answer."""
        assert self.session is not None
        headers = dict(request.headers)
        if request.sign_id is not None and self.spec.secret:
            headers.update(formats.signed_headers(self.spec.secret, request.sign_id,
                                                  request.body, time.time()))
        try:
            async with self.session.post(request.url or self.spec.url, data=request.body,
                                         headers=headers, allow_redirects=False) as resp:
                text = (await resp.content.read(BODY_MAX)).decode("utf-8", "replace")
                return resp.status, text, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return 0, type(exc).__name__, None

    async def _undeliverable(self, rec: ConsumerRecord[Any, Any], status: int, body: str
                             ) -> None:
        """The alert as it was, with why, on the undeliverable topic (retried until Kafka
        takes it: only then is the alert committed)."""
        headers = [
            ("undeliverable_destination", self.name.encode()),
            ("undeliverable_status", str(status).encode()),
            ("undeliverable_body", body.encode("utf-8", "replace")[:BODY_MAX]),
            ("undeliverable_topic", rec.topic.encode()),
            ("undeliverable_partition", str(rec.partition).encode()),
            ("undeliverable_offset", str(rec.offset).encode()),
            ("undeliverable_at", formats.iso(time.time()).encode()),
        ]
        attempt = 0
        while True:
            try:
                await self.producer.send_and_wait(self.s.topics.undeliverable, rec.value,
                                                  key=rec.key, headers=headers)
                break
            except Exception as exc:
                attempt += 1
                log.warning("notify %s: cannot write to %s (%s); retrying", self.name,
                            self.s.topics.undeliverable, type(exc).__name__)
                await asyncio.sleep(backoff.delay(attempt, 0.5, 10.0, self.rand))
        self.m.undeliverable.labels(destination=self.name).inc()
        if self.m.legacy is not None and self.spec.kind == "legacy-json":
            self.m.legacy.labels(outcome="failed").inc()
        log.warning("notify %s: alert at %s/%d@%d refused for good (HTTP %d); sent to %s",
                    self.name, rec.topic, rec.partition, rec.offset, status,
                    self.s.topics.undeliverable)

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        async with self.commit_lock:
            try:
                await consumer.commit({tp: offset})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a later commit covers it; a new owner re-delivers
                log.warning("notify %s: commit of %s at %d failed (%s); it may be delivered "
                            "again", self.name, tp, offset, type(exc).__name__)

    async def _resend(self) -> None:
        for request in self.dest.resend(time.time()):
            status, text, _ = await self._post(request)
            if status > 0 and backoff.classify(status) == "accepted":
                self.m.resent.labels(destination=self.name).inc(request.body.count(b'"labels"'))
            else:
                log.warning("notify %s: re-sending firing alerts failed (%s); next in %.0fs",
                            self.name, f"HTTP {status}" if status > 0 else text,
                            self.spec.resend_s)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, loop: DeliveryLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.loop._release(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.loop._assigned(set(assigned))


def _alert(value: bytes | None) -> Alert | None:
    if not value:
        return None
    try:
        return Alert.model_validate_json(value)
    except ValueError:
        return None
