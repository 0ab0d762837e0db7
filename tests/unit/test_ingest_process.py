"""The ingest process's metrics reach the worker's (churnsignal.app.ingest_process)."""

from __future__ import annotations

import orjson
from prometheus_client import CollectorRegistry

from churnsignal.app.ingest_process import RecordingMetrics, apply_ops
from churnsignal.app.metrics import Metrics


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_what_the_child_records_is_what_the_worker_shows() -> None:
    child = RecordingMetrics()
    m = child  # the Ingestor's way of using them
    m.events_consumed.labels(topic="usage").inc(3)
    m.events_consumed.labels(topic="usage").inc(2)
    m.events_consumed.labels(topic="billing").inc()
    m.ingest_paused_partitions.set(2)
    m.ingest_paused_partitions.set(1)  # a gauge: the last value counts
    m.consumer_lag.labels(topic="usage", partition="0").set(40)
    m.event_to_score.observe(0.5)
    m.event_to_score.observe(1.5)
    # Through the pipe as JSON, as the child sends it.
    ops = orjson.loads(orjson.dumps(child.take()))
    assert child.take() == []  # taken once

    registry = CollectorRegistry()
    apply_ops(Metrics(registry), ops)
    assert _value(registry, "churnsignal_events_consumed_total", topic="usage") == 5
    assert _value(registry, "churnsignal_events_consumed_total", topic="billing") == 1
    assert _value(registry, "churnsignal_ingest_paused_partitions") == 1
    assert _value(registry, "churnsignal_consumer_lag", topic="usage", partition="0") == 40
    assert _value(registry, "churnsignal_event_to_score_seconds_count") == 2
    assert _value(registry, "churnsignal_event_to_score_seconds_sum") == 2.0


def test_operations_the_worker_does_not_know_are_skipped() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    apply_ops(metrics, [["a_metric_of_a_newer_child", [], "inc", 1.0],
                        ["events_consumed", [["topic", "usage"]], "delete", 1.0],
                        ["events_consumed", [["topic", "usage"]], "inc", 4.0]])
    assert _value(registry, "churnsignal_events_consumed_total", topic="usage") == 4


def test_an_outage_for_a_child_that_died_ends_with_its_successors_first_report() -> None:
    # A dead child is a Kafka-ingest outage for the worker's health check (which stops
    # counting a stall meanwhile); a fresh child never reports one over, so its first
    # report must end it.
    from churnsignal.app.ingest_process import IngestProcess
    from churnsignal.app.settings import Settings

    outages: list[bool] = []
    ingest = IngestProcess(Settings(), Metrics(CollectorRegistry()))
    ingest.on_outage = outages.append
    ingest._down = True  # as run() leaves it when a child exits
    ingest._report(b'{"ops": [], "backlog": 7, "assigned": true}')
    ingest._report(b'{"ops": [], "backlog": 3, "assigned": true}')
    ingest._report(b'{"outage": true}')  # the new child's own Kafka trouble still counts
    assert outages == [False, True]
    assert ingest.backlog() == 3 and ingest.assigned
