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


TOKEN = "0123456789abcdef0123456789abcdef"


def test_api_token_from_env_or_file_is_masked(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CHURNSIGNAL_API_TOKEN", TOKEN)
    settings = load_settings()
    assert settings.api_token is not None and settings.api_token.get_secret_value() == TOKEN
    assert TOKEN not in str(settings.masked()) and TOKEN not in repr(settings)
    assert not settings.api_open  # a configured token is required on loopback too

    monkeypatch.delenv("CHURNSIGNAL_API_TOKEN")
    secret = tmp_path / "api_token"
    secret.write_text(TOKEN + "\n")
    monkeypatch.setenv("CHURNSIGNAL_API_TOKEN_FILE", str(secret))
    settings = load_settings()
    assert settings.api_token is not None and settings.api_token.get_secret_value() == TOKEN
    import os

    assert "CHURNSIGNAL_API_TOKEN" not in os.environ  # read, then removed again
    monkeypatch.setenv("CHURNSIGNAL_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="CHURNSIGNAL_API_TOKEN_FILE"):
        load_settings()


@pytest.mark.parametrize("bad", ["short", "0123456789abcdef 0123", "0123456789abcdef\u00e9",
                                 "0123456789abcdef=x"])
def test_a_weak_or_malformed_api_token_names_the_setting(monkeypatch: pytest.MonkeyPatch,
                                                         bad: str) -> None:
    monkeypatch.setenv("CHURNSIGNAL_API_TOKEN", bad)
    with pytest.raises(ConfigError, match="CHURNSIGNAL_API_TOKEN") as err:
        load_settings()
    assert bad not in str(err.value)  # the message never holds the token


def test_an_empty_api_token_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNSIGNAL_API_TOKEN", "  ")
    assert load_settings().api_token is None


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost.", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False),
    ("192.168.0.1", False), ("fe80::1%eth0", False), ("example.com", False),
    ("localhost.example.com", False), ("128.0.0.1", False)])
def test_loopback_detection(monkeypatch: pytest.MonkeyPatch, host: str, loopback: bool) -> None:
    from churnsignal.app.settings import is_loopback

    assert is_loopback(host) is loopback
    monkeypatch.setenv("CHURNSIGNAL_WEB_HOST", host)
    settings = load_settings()
    assert settings.web_on_loopback is loopback
    assert settings.api_open is loopback  # no token: /api open on loopback only


def test_health_stall_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().health.stall_s == 300.0
    monkeypatch.setenv("CHURNSIGNAL_HEALTH__STALL_S", "60")
    assert load_settings().health.stall_s == 60.0
    monkeypatch.setenv("CHURNSIGNAL_HEALTH__STALL_S", "5")
    with pytest.raises(ConfigError, match="CHURNSIGNAL_HEALTH__STALL_S"):
        load_settings()
