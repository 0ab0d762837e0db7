"""The pure parts of alert delivery: retry classes and delays, bodies, signatures, what each
destination sends, Alertmanager's firing set; and settings to destinations."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from churnsignal.app.settings import Settings
from churnsignal.errors import ConfigError
from churnsignal.notify import backoff, config, formats
from churnsignal.notify.destinations import Alertmanager, Spec, make
from churnsignal.schemas.alerts import Alert, AlertReason

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


def alert(n: int = 1, account: str = "acme", kind: str = "escalated", band: str = "critical",
          previous: str = "medium", code: str = "cancellation_scheduled") -> Alert:
    return Alert(alert_id=f"a{n}", account_id=account, kind=kind, score=82, band=band,
                 previous_band=previous, mrr_at_risk_cents=24_500 if kind == "escalated" else 0,
                 trigger_event_id="evt_1", triggered_at=1.0, emitted_at=1_760_000_000.25,
                 policy_version="default",
                 reasons=[AlertReason(code=code, value=1, contribution=60, kind="voluntary",
                                      play="offer_pause_or_plan_change",
                                      detail="Cancellation scheduled <at> period end & more")])


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "accepted"), (202, "accepted"), (204, "accepted"), (408, "retry"), (429, "retry"),
    (500, "retry"), (503, "retry"), (400, "refused"), (401, "refused"), (404, "refused"),
    (410, "refused"), (422, "refused"), (301, "refused"), (100, "retry")])
def test_status_classes(status: int, outcome: str) -> None:
    assert backoff.classify(status) == outcome


def test_delay_is_exponential_capped_and_jittered() -> None:
    assert backoff.delay(0, 0.5, 30) == 0
    assert backoff.delay(1, 0.5, 30, lambda: 0.0) == 0.25
    assert backoff.delay(1, 0.5, 30, lambda: 1.0) == 0.5
    assert backoff.delay(4, 0.5, 30, lambda: 1.0) == 4.0
    assert backoff.delay(50, 0.5, 30, lambda: 1.0) == 30.0  # the cap
    assert backoff.delay(10_000, 0.5, 30, lambda: 0.0) == 15.0  # no overflow, half at least
    import random

    rng = random.Random(7)
    waits = {backoff.delay(6, 0.5, 30, rng.random) for _ in range(50)}
    assert len(waits) > 40 and all(8 <= w <= 16 for w in waits)  # jitter spreads them


def test_retry_after() -> None:
    now = time.time()
    assert backoff.retry_after("7", now, 30) == 7
    assert backoff.retry_after("3600", now, 30) == 30
    assert backoff.retry_after(None, now, 30) is None
    assert backoff.retry_after("soon", now, 30) is None
    from email.utils import formatdate

    assert 8 <= backoff.retry_after(formatdate(now + 10, usegmt=True), now, 30) <= 10  # type: ignore[operator]


def test_webhook_body_is_stable_and_signature_verifies_with_the_library() -> None:
    a = alert()
    body = formats.webhook_body(a)
    assert body == formats.webhook_body(a)  # the same bytes on every retry
    doc = orjson.loads(body)
    assert doc["type"] == "churn.alert.escalated"
    assert doc["timestamp"] == "2025-10-09T08:53:20.250Z"
    assert doc["data"] == a.model_dump(mode="json")
    assert orjson.loads(formats.webhook_body(alert(kind="deescalated")))["type"] == \
        "churn.alert.deescalated"
    now = time.time()
    headers = formats.signed_headers(SECRET, a.alert_id, body, now)
    assert headers["webhook-id"] == "a1" and headers["webhook-timestamp"] == str(int(now))
    assert Webhook(SECRET).verify(body, headers) == doc
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 24).decode()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", headers)


def test_slack_message_blocks() -> None:
    msg = formats.slack_message(alert(account="a<b>&c"), "https://crm.example/acc/a%3Cb%3E%26c")
    assert "a&lt;b&gt;&amp;c" in msg["text"] and "*critical*" in msg["text"]
    kinds = [b["type"] for b in msg["blocks"]]
    assert kinds == ["header", "section", "section", "actions", "context"]
    fields = " ".join(f["text"] for f in msg["blocks"][1]["fields"])
    for part in ("*Account*", "*Band*\ncritical (was medium)", "*Score*\n82", "$245.00"):
        assert part in fields
    reasons = msg["blocks"][2]["text"]["text"]
    assert "offer_pause_or_plan_change" in reasons and "&lt;at&gt;" in reasons
    assert msg["blocks"][3]["elements"][0]["url"] == "https://crm.example/acc/a%3Cb%3E%26c"
    long = formats.slack_message(alert(account="x" * 400), None)
    assert len(long["blocks"][0]["text"]["text"]) <= formats.SLACK_HEADER_MAX
    assert "actions" not in [b["type"] for b in long["blocks"]]


def test_pagerduty_trigger_update_resolve() -> None:
    def event(a: Alert) -> dict[str, Any] | None:
        return formats.pagerduty_event(a, "R" * 32, "app", "high", None)

    up = event(alert())
    assert up is not None and up["event_action"] == "trigger" and up["dedup_key"] == "app:acme"
    assert up["payload"]["severity"] == "critical" and up["payload"]["source"] == "churnsignal"
    assert len(up["payload"]["summary"]) <= 1024
    still = event(alert(kind="deescalated", band="high", previous="critical"))
    assert still is not None and still["event_action"] == "trigger"
    assert still["payload"]["severity"] == "error"
    down = event(alert(kind="deescalated", band="low", previous="high"))
    assert down == {"routing_key": "R" * 32, "event_action": "resolve", "dedup_key": "app:acme"}
    assert event(alert(kind="escalated", band="medium", previous="low")) is None
    assert len(formats.dedup_key("a" * 100, "b" * 200)) <= 255


def test_alertmanager_fires_relabels_and_resolves() -> None:
    am = make(Spec("alertmanager", "alertmanager", "http://127.0.0.1:9093", min_band="high",
                   resend_s=60))
    assert isinstance(am, Alertmanager)
    assert am.endpoint == "http://127.0.0.1:9093/api/v2/alerts"
    now = 1_760_000_100.0
    first = am.request(alert(1, band="high", previous="medium"), 2, now)
    assert first is not None
    [fire] = orjson.loads(first.body)
    assert fire["labels"] == {"alertname": "ChurnRisk", "account_id": "acme", "band": "high",
                              "reason": "cancellation_scheduled", "severity": "warning"}
    assert fire["annotations"]["mrr_at_risk"] == "$245.00"
    assert "offer_pause_or_plan_change" in fire["annotations"]["plays"]
    assert fire["endsAt"] == formats.iso(now + 240)
    assert am.firing_accounts() == {}  # not before the destination took it
    am.accepted(alert(1, band="high", previous="medium"), 2)
    assert set(am.firing_accounts()) == {"acme"}
    # critical: a new label set; the old one is resolved in the same request
    up = am.request(alert(2, band="critical", previous="high"), 2, now)
    assert up is not None
    old, new = orjson.loads(up.body)
    assert old["labels"]["band"] == "high" and old["endsAt"] == formats.iso(now)
    assert new["labels"]["band"] == "critical" and new["labels"]["severity"] == "critical"
    am.accepted(alert(2, band="critical", previous="high"), 2)
    [resent] = [orjson.loads(r.body) for r in am.resend(now + 60)]
    assert [a["labels"]["band"] for a in resent] == ["critical"]
    assert resent[0]["endsAt"] == formats.iso(now + 300)
    # below min_band: resolved, and no longer re-sent
    down = alert(3, kind="deescalated", band="medium", previous="critical")
    [resolved] = orjson.loads(am.request(down, 2, now).body)  # type: ignore[union-attr]
    assert resolved["labels"]["band"] == "critical" and resolved["endsAt"] == formats.iso(now)
    am.accepted(down, 2)
    assert am.firing_accounts() == {} and am.resend(now) == []
    # an account never seen firing and below the band: nothing to send
    assert am.request(alert(4, account="other", kind="deescalated", band="low",
                            previous="medium"), 1, now) is None
    am.accepted(alert(5, account="b"), 3)
    am.drop({3})  # another consumer owns partition 3 now
    assert am.firing_accounts() == {}


def test_signed_webhook_and_legacy_bodies() -> None:
    hook = make(Spec("webhook", "webhook", "http://h", secret=SECRET))
    req = hook.request(alert(), 0, 0.0)
    assert req is not None and req.sign_id == "a1" and req.body == formats.webhook_body(alert())
    legacy = make(Spec("webhook", "legacy-json", "http://h")).request(alert(), 0, 0.0)
    assert legacy is not None and legacy.sign_id is None
    assert orjson.loads(legacy.body)["alert_id"] == "a1"


def settings(**env: Any) -> Settings:
    return Settings(**env)


def test_specs_from_settings() -> None:
    s = settings(app_id="cs", notify={
        "webhook_url": "http://127.0.0.1:1/h", "webhook_secret": SECRET,
        "slack_webhook_url": "https://hooks.slack.com/services/T/B/X",
        "pagerduty_routing_key": "k" * 32, "alertmanager_url": "http://127.0.0.1:9093",
        "retry_max_s": 7})
    specs = config.specs(s, "high")
    assert [(x.name, x.kind, x.group) for x in specs] == [
        ("webhook", "webhook", "cs-notify-webhook"), ("slack", "slack", "cs-notify-slack"),
        ("pagerduty", "pagerduty", "cs-notify-pagerduty"),
        ("alertmanager", "alertmanager", "cs-notify-alertmanager")]
    assert specs[2].url == "https://events.pagerduty.com/v2/enqueue"
    assert all(x.retry_max_s == 7 for x in specs)
    assert config.specs(settings(), "high") == []
    masked = str(s.masked())
    assert SECRET not in masked and "/T/B/X" not in masked and "k" * 32 not in masked


def test_misconfigured_destinations_are_refused_with_clear_errors() -> None:
    with pytest.raises(ConfigError, match="needs CHURNSIGNAL_NOTIFY__WEBHOOK_SECRET"):
        config.specs(settings(notify={"webhook_url": "http://h"}), "high")
    with pytest.raises(ConfigError, match="without CHURNSIGNAL_NOTIFY__WEBHOOK_URL"):
        config.specs(settings(notify={"webhook_secret": SECRET}), "high")
    from pydantic import ValidationError

    for bad in ("nope", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValidationError, match="whsec_"):
            settings(notify={"webhook_secret": bad})
    with pytest.raises(ValidationError, match="http"):
        settings(notify={"alertmanager_url": "127.0.0.1:9093"})
    both = settings(webhook={"url": "http://old"}, notify={"webhook_url": "http://new",
                                                           "webhook_secret": SECRET})
    with pytest.raises(ConfigError, match="older form"):
        config.specs(both, "high")


def test_older_webhook_settings_become_durable_destinations(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    [json_spec] = config.specs(settings(webhook={"url": "http://old", "retry_max_s": 2}), "high")
    assert (json_spec.name, json_spec.kind, json_spec.retry_max_s) == ("webhook", "legacy-json", 2)
    assert "older form" in caplog.text and "http://old" not in caplog.text
    [slack] = config.specs(settings(webhook={"url": "http://old", "format": "slack"}), "high")
    assert (slack.name, slack.kind) == ("slack", "slack")
