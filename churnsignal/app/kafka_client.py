"""Kafka connection options, topic creation and the start-up check shared by every process."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from churnsignal.app.settings import Settings
from churnsignal.errors import BrokerUnavailable

log = logging.getLogger(__name__)


def connection_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured security protocol."""
    k = settings.kafka
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = ssl.create_default_context(
            cafile=str(k.ssl_cafile) if k.ssl_cafile else None
        )
    if k.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = k.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = k.sasl_username
        opts["sasl_plain_password"] = (
            k.sasl_password.get_secret_value() if k.sasl_password else None
        )
    return opts


def faust_credentials(settings: Settings) -> Any:
    """The same options in Faust's terms (None for PLAINTEXT)."""
    import faust

    k = settings.kafka
    context = None
    if k.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
    if k.security_protocol.startswith("SASL"):
        password = k.sasl_password.get_secret_value() if k.sasl_password else ""
        return faust.SASLCredentials(
            username=k.sasl_username or "", password=password,
            mechanism=k.sasl_mechanism or "PLAIN", ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


async def read_to_end(consumer: Any, ends: dict[Any, int], *, todo: set[Any] | None = None,
                      idle_ms: int = 300, max_records: int = 50_000
                      ) -> AsyncIterator[tuple[Any, list[Any]]]:
    """Yield ``(partition, records)`` from the consumer's positions until every partition in
    ``todo`` (default: all of ``ends``) has reached its end offset *and* a fetch of
    ``idle_ms`` brings nothing: Tansu 0.6 reports a partition's end as its last batch's first
    offset + 1, so the end offset alone would stop short of that batch's tail. A caller may
    remove a partition from ``todo`` to stop reading it early."""
    todo = set(ends) if todo is None else todo
    while todo:
        batch = await consumer.getmany(*todo, timeout_ms=idle_ms, max_records=max_records)
        for tp, records in batch.items():
            yield tp, records
        if not batch:  # nothing more from any partition within the wait: caught up
            todo -= {tp for tp in todo if await consumer.position(tp) >= ends[tp]}


def topic_plan(settings: Settings) -> dict[str, int]:
    """Every topic churnsignal reads or writes, with its partition count."""
    t = settings.topics
    names = [*t.sources(), t.snapshots, t.alerts, t.dlq, settings.ingested_topic, settings.state_topic]
    return dict.fromkeys(names, settings.partitions)


def topic_configs(settings: Settings, name: str, configs: dict[str, str]) -> dict[str, str]:
    """The state topic keeps the newest state per account: compacted, never expired."""
    if name == settings.state_topic:
        return {**configs, "cleanup.policy": "compact", "retention.ms": "-1"}
    return configs


async def ensure_topics(settings: Settings, configs: dict[str, str] | None = None) -> None:
    """Check the broker answers (bounded by kafka.connect_timeout_s) and create missing topics.

    ``configs`` are topic configs for the topics created (the benchmark keeps its data).
    """
    admin = AIOKafkaAdminClient(request_timeout_ms=15_000, **connection_options(settings))
    try:
        await asyncio.wait_for(admin.start(), timeout=settings.kafka.connect_timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        raise BrokerUnavailable(
            f"Kafka at {settings.kafka_bootstrap_servers} did not answer within "
            f"{settings.kafka.connect_timeout_s:.0f}s (KAFKA_BOOTSTRAP_SERVERS, "
            f"CHURNSIGNAL_KAFKA__CONNECT_TIMEOUT_S): {type(exc).__name__} {exc}".strip()
        ) from None
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, num_partitions=n,
                            replication_factor=settings.kafka.replication_factor,
                            topic_configs=topic_configs(settings, name, configs or {}))
                   for name, n in topic_plan(settings).items() if name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another worker created it first
            log.info("created topics %s", [m.name for m in missing])
    finally:
        await admin.close()
