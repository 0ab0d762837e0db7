"""Per-destination delivery metrics (on the process's registry, beside the worker's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class NotifyMetrics:
    def __init__(self, registry: CollectorRegistry, legacy: Counter | None = None) -> None:
        r = registry
        self.delivered = Counter(
            "churnsignal_notify_delivered", "Alerts a destination accepted (2xx), or that it "
            "had no request for (skipped: e.g. a de-escalation PagerDuty never paged for).",
            ["destination", "outcome"], registry=r)
        self.retried = Counter(
            "churnsignal_notify_retried", "Failed delivery attempts that are retried (network "
            "errors, timeouts, 408, 429, 5xx).", ["destination"], registry=r)
        self.undeliverable = Counter(
            "churnsignal_notify_undeliverable", "Alerts a destination refused for good (4xx "
            "other than 408/429), sent to the undeliverable topic.", ["destination"], registry=r)
        self.lag = Gauge(
            "churnsignal_notify_lag", "Alerts on the alerts topic this destination has not "
            "delivered yet (its assigned partitions).", ["destination"], registry=r)
        self.oldest_age = Gauge(
            "churnsignal_notify_oldest_age_seconds", "Age of the oldest alert being delivered "
            "to this destination (0: none waiting).", ["destination"], registry=r)
        self.resent = Counter(
            "churnsignal_notify_resent", "Firing alerts re-sent to Alertmanager.",
            ["destination"], registry=r)
        self.legacy = legacy  # churnsignal_webhook_deliveries, for CHURNSIGNAL_WEBHOOK__URL
