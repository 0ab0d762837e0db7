"""Settings: wrong values fail with one message naming the setting; secrets stay masked."""

from __future__ import annotations

import pytest

from churnsignal.app.settings import load_settings, mask_dsn
from churnsignal.errors import ConfigError
from churnsignal.stream.packs import partition_for


def test_bad_values_name_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNSIGNAL_PARTITIONS", "0")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "nohostport")
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    assert "CHURNSIGNAL_PARTITIONS" in text and "KAFKA_BOOTSTRAP_SERVERS" in text
    assert "\n" not in text


def test_defaults_are_the_public_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    s = load_settings()
    assert s.topics.sources() == ["usage.events", "billing.events", "support.events"]
    assert (s.topics.alerts, s.topics.dlq, s.web_port) == ("churn.alerts", "churn.dlq", 6066)
    assert s.embedded_broker and s.effective_clickhouse_dsn().startswith("chdb://")


def test_dsn_password_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNSIGNAL_CLICKHOUSE_DSN", "https://bob:s3cret@ch.example:8443/db")
    shown = load_settings().masked()
    assert "s3cret" not in str(shown)
    assert mask_dsn("http://u:p@h:8123") == "http://u:***@h:8123"


def test_partitioning_is_stable() -> None:
    assert partition_for("acme", 4) == partition_for("acme", 4)
    assert {partition_for(f"a{i}", 4) for i in range(100)} == {0, 1, 2, 3}


def test_a_topic_can_pin_its_payload_format(monkeypatch: pytest.MonkeyPatch) -> None:
    from churnsignal.schemas.decode import DecodeOptions, decode
    from churnsignal.schemas.results import Rejected

    monkeypatch.setenv("CHURNSIGNAL_INGEST__SOURCES", '{"billing.events": "stripe"}')
    settings = load_settings()
    assert settings.ingest.sources == {"billing.events": "stripe"}
    canonical = (b'{"event_id":"e1","account_id":"a","type":"session",'
                 b'"occurred_at":"2026-11-25T00:00:00Z"}')
    pinned = decode(canonical, DecodeOptions(), 1_795_600_000.0,
                    settings.ingest.sources["billing.events"])
    assert isinstance(pinned, Rejected) and pinned.reason == "source_mismatch"
    monkeypatch.setenv("CHURNSIGNAL_INGEST__SOURCES", '{"billing.events": "paypal"}')
    with pytest.raises(ConfigError, match="CHURNSIGNAL_INGEST__SOURCES"):
        load_settings()


def test_secrets_can_come_from_files(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    secret = tmp_path / "sasl_password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("CHURNSIGNAL_KAFKA__SASL_PASSWORD_FILE", str(secret))
    settings = load_settings()
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "s3cret"
    assert "s3cret" not in str(settings.masked())
    monkeypatch.setenv("CHURNSIGNAL_KAFKA__SASL_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="CHURNSIGNAL_KAFKA__SASL_PASSWORD_FILE"):
        load_settings()


def test_a_kafka_topic_range_is_parsed_with_its_time_bounds() -> None:
    from churnsignal.offline.history import HistoryError
    from churnsignal.offline.history_kafka import KafkaRange

    r = KafkaRange.parse("kafka:usage.events,billing.events?from=2026-01-01&to=2026-02-01T12:00+01:00")
    assert r.topics == ("usage.events", "billing.events")
    assert r.start == 1_767_225_600.0  # 2026-01-01 00:00 UTC
    assert r.end == 1_769_943_600.0  # 2026-02-01 11:00 UTC
    assert KafkaRange.parse("kafka://usage").topics == ("usage",)
    for bad in ("kafka:", "kafka:usage?since=2026-01-01", "kafka:u?from=2026-02-01&to=2026-01-01",
                "kafka:u?from=yesterday"):
        with pytest.raises(HistoryError):
            KafkaRange.parse(bad)
