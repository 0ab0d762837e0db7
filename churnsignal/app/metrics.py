"""Every Prometheus metric churnsignal exports, declared once (labels stay bounded)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)


class Metrics:
    """Built from one registry, so tests and several apps in one process stay apart."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "churnsignal_events_consumed", "Messages read from source topics.", ["topic"],
            registry=r)
        self.events_accepted = Counter(
            "churnsignal_events_accepted", "Valid events accepted, by canonical type.",
            ["topic", "type"], registry=r)
        self.events_skipped = Counter(
            "churnsignal_events_skipped",
            "Valid input churnsignal does not use (unused provider types, unattributed).",
            ["topic", "reason"], registry=r)
        self.events_dead_lettered = Counter(
            "churnsignal_events_dead_lettered", "Messages sent to the dead-letter topic, by the "
            "step that refused them (decode and ingest: instead of being accepted; state, "
            "identity, sink: events accepted earlier).",
            ["topic", "reason", "step"], registry=r)
        self.duplicates = Counter(
            "churnsignal_duplicates_skipped", "Events already applied (redelivery or same id).",
            registry=r)
        self.events_late = Counter(
            "churnsignal_events_late", "Events applied out of order: older than their "
            "account's newest event (applied to their own day; older than the horizon are "
            "dead-lettered as too_old).", registry=r)
        self.events_applied = Counter(
            "churnsignal_events_applied", "Events folded into account state.", registry=r)
        self.alerts = Counter(
            "churnsignal_alerts", "Alerts emitted.", ["band", "kind", "reason"], registry=r)
        self.event_to_score = Histogram(
            "churnsignal_event_to_score_seconds", "Event time to score time.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.ingest_to_alert = Histogram(
            "churnsignal_ingest_to_alert_seconds", "Ingest (batch read) to alert produced.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.clickhouse_batches = Counter(
            "churnsignal_clickhouse_batches", "Successful ClickHouse flushes.", registry=r)
        self.clickhouse_rows = Counter(
            "churnsignal_clickhouse_rows", "Rows written to ClickHouse.", ["table"], registry=r)
        self.clickhouse_errors = Counter(
            "churnsignal_clickhouse_errors", "Failed ClickHouse writes (retried).", registry=r)
        self.clickhouse_flush_seconds = Histogram(
            "churnsignal_clickhouse_flush_seconds", "Duration of one ClickHouse flush.",
            registry=r)
        self.sink_retries = Counter(
            "churnsignal_sink_retries", "Failed ClickHouse inserts by kind: transient (retried "
            "after a back-off) or permanent (the table refused the data: the batch is split).",
            ["table", "kind"], registry=r)
        self.sink_rows_refused = Counter(
            "churnsignal_sink_rows_refused", "Rows a ClickHouse table refused for good, "
            "isolated from their batch and dead-lettered (sink_rejected).", ["table"],
            registry=r)
        self.sink_unavailable = Counter(
            "churnsignal_sink_unavailable", "ClickHouse writes that gave up after "
            "sink.write_timeout_s; their rows are kept and written at a later flush.",
            registry=r)
        self.consumer_lag = Gauge(
            "churnsignal_consumer_lag", "Records behind the end of each source partition.",
            ["topic", "partition"], registry=r)
        self.accounts_tracked = Gauge(
            "churnsignal_accounts_tracked", "Accounts with state on this worker.", registry=r)
        self.webhook_deliveries = Counter(
            "churnsignal_webhook_deliveries", "Alerts posted to the webhook, by outcome "
            "(delivered, failed after retries, dropped because the queue was full).",
            ["outcome"], registry=r)
        self.identity_events = Counter(
            "churnsignal_identity_events",
            "Events that did not name their account: parked (kept until an identity link is "
            "learned), joined (forwarded once it was), overflow (dead-lettered: too many wait).",
            ["outcome"], registry=r)
        self.packs = Counter(
            "churnsignal_packs", "Repartitioned event packs processed by the state agent.",
            registry=r)
        self.ingest_unreadable_batches = Counter(
            "churnsignal_ingest_unreadable_batches",
            "Record batches of a source topic that could not be read (a codec without its "
            "library or unknown, a CRC mismatch): skipped and their offsets dead-lettered as "
            "unreadable_batch, or, when the batch's end is unknown, its partition paused.",
            ["topic"], registry=r)
        self.ingest_kafka_retries = Counter(
            "churnsignal_ingest_kafka_retries",
            "Ingest operations retried after a Kafka error, by operation (fetch, produce, "
            "commit); nothing is dead-lettered for them.", ["operation"], registry=r)
        self.ingest_paused_partitions = Gauge(
            "churnsignal_ingest_paused_partitions",
            "Source partitions the ingest paused at records it cannot read and cannot skip "
            "safely (a corrupt batch header); they resume when reassigned.", registry=r)
        self.forget_requests = Counter(
            "churnsignal_forget_requests", "Forget requests (`churnsignal forget`) carried "
            "out, by kind (account, user); a repeat is counted again.", ["kind"], registry=r)
        self.forgotten = Counter(
            "churnsignal_forgotten", "What forget requests deleted: account states, identity "
            "keys, events waiting under them, account states a user was removed from "
            "(user_traces), ClickHouse rows.", ["what"], registry=r)
