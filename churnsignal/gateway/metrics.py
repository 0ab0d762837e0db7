"""The gateway's Prometheus metrics (its own registry; bounded labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "churnsignal_gateway_requests", "HTTP requests answered, by route and status.",
            ["route", "status"], registry=r)
        self.records = Counter(
            "churnsignal_gateway_records", "Records Kafka acknowledged, by topic.", ["topic"],
            registry=r)
        self.dead_lettered = Counter(
            "churnsignal_gateway_dead_lettered", "Messages written to the dead-letter topic "
            "instead of a source topic, by route and reason.", ["route", "reason"], registry=r)
        self.refused = Counter(
            "churnsignal_gateway_refused", "Requests refused, by route and code (bad "
            "credentials, not JSON, too large, Kafka unavailable, overloaded).",
            ["route", "code"], registry=r)
        self.latency = Histogram(
            "churnsignal_gateway_request_seconds", "Request handling time, Kafka ack included.",
            ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                5, 10, 30), registry=r)
        self.inflight = Gauge(
            "churnsignal_gateway_inflight", "Requests being handled now.", registry=r)
        self.kafka_up = Gauge(
            "churnsignal_gateway_kafka_up", "1 while the producer is connected.", registry=r)
