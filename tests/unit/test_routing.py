"""Named destinations and routing rules (churnsignal.notify.routing, pure) and their
resolution from the policy and the environment (churnsignal.notify.config)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from churnsignal.app.settings import Settings
from churnsignal.errors import ConfigError
from churnsignal.notify import config
from churnsignal.notify.routing import NotifyPolicy, Router, churn_kind, matches
from churnsignal.schemas.alerts import Alert, AlertReason
from churnsignal.stream.policy import Policy, load_policy

SECRET = "whsec_" + base64.b64encode(b"r" * 24).decode()
PD_KEY = "P" * 32

ROUTING = """
notify:
  destinations:
    billing-team:
      kind: webhook
      url_env: CS_BILLING_HOOK_URL
      secret_file: {secret_file}
    cs-escalations:
      kind: pagerduty
      routing_key_env: CS_PD_KEY
    am:
      kind: alertmanager
      url: http://127.0.0.1:9093
  routes:
    - to: [cs-escalations]
      bands: [critical]
      min_mrr_at_risk: 1000
    - to: [billing-team]
      churn: involuntary
    - to: [slack]
"""

INVOLUNTARY = AlertReason(code="payment_failed_final", value=4, contribution=60,
                          kind="involuntary", play="card_update", detail="failed 4 times")
VOLUNTARY = AlertReason(code="usage_decline", value=0.8, contribution=40, kind="voluntary",
                        play="csm_check_in", detail="usage down 80%")


def alert(account: str = "acme", kind: str = "escalated", band: str = "critical",
          previous: str = "medium", mrr: int = 150_000, reasons: tuple[AlertReason, ...] = (
              VOLUNTARY,), plan: str | None = "enterprise", n: int = 1) -> Alert:
    return Alert(alert_id=f"{account}-{n}", account_id=account, kind=kind, score=80, band=band,
                 previous_band=previous, reasons=list(reasons),
                 mrr_at_risk_cents=mrr if kind == "escalated" else 0, triggered_at=1.0,
                 emitted_at=2.0, policy_version="p", plan=plan)


def notify_policy(text: str, **fmt: Any) -> NotifyPolicy:
    policy = Policy.model_validate(yaml.safe_load(text.format(**fmt)))
    assert policy.notify is not None
    return policy.notify


def test_conditions_each_and_together() -> None:
    one = NotifyPolicy.model_validate({"routes": [{"to": ["slack"]}]}).routes[0]
    assert matches(one, alert())  # no condition: everything
    route = NotifyPolicy.model_validate({"routes": [{
        "to": ["slack"], "bands": ["critical"], "min_mrr_at_risk": 1000}]}).routes[0]
    assert matches(route, alert(mrr=100_000))  # exactly $1,000
    assert not matches(route, alert(mrr=99_999))
    assert not matches(route, alert(band="high", mrr=500_000))
    plans = NotifyPolicy.model_validate({"routes": [{"to": ["slack"],
                                                      "plans": ["enterprise"]}]}).routes[0]
    assert matches(plans, alert()) and not matches(plans, alert(plan="starter"))
    assert not matches(plans, alert(plan=None))


def test_reasons_any_or_top_and_involuntary_churn() -> None:
    mixed = (VOLUNTARY, INVOLUNTARY)  # the top reason is voluntary, a billing one follows
    any_of = NotifyPolicy.model_validate({"routes": [{
        "to": ["slack"], "reasons": ["payment_failed_final"]}]}).routes[0]
    top = NotifyPolicy.model_validate({"routes": [{
        "to": ["slack"], "reasons": ["payment_failed_final"], "reason_of": "top"}]}).routes[0]
    assert matches(any_of, alert(reasons=mixed)) and not matches(top, alert(reasons=mixed))
    assert matches(top, alert(reasons=(INVOLUNTARY, VOLUNTARY)))
    assert churn_kind(alert(reasons=mixed)) == "involuntary"
    assert churn_kind(alert(reasons=mixed), "top") == "voluntary"
    assert churn_kind(alert(reasons=())) == "voluntary"
    invol = NotifyPolicy.model_validate({"routes": [{"to": ["slack"],
                                                      "churn": "involuntary"}]}).routes[0]
    assert matches(invol, alert(reasons=mixed)) and not matches(invol, alert())


def test_router_sends_deescalations_where_the_escalation_went() -> None:
    routes = NotifyPolicy.model_validate({"routes": [{
        "to": ["pagerduty"], "bands": ["critical"]}]}).routes_to("pagerduty")
    router = Router(routes, "high")
    assert not router.route(alert("a", band="high"), 0)  # escalation to high: not routed
    assert not router.route(alert("a", "deescalated", "low", "high"), 0)  # so neither its end
    assert router.route(alert("b", band="critical"), 1)
    assert router.route(alert("b", "deescalated", "high", "critical"), 1)  # still paged
    assert router.route(alert("b", "deescalated", "low", "high"), 1)  # resolved there
    assert not router.route(alert("b", "deescalated", "low", "high"), 1)  # closed now
    assert router.route(alert("c", band="critical"), 2)
    router.drop({2})  # another consumer owns partition 2 now
    assert not router.route(alert("c", "deescalated", "low", "critical"), 2)
    everything = Router(None, "high")
    assert everything.route(alert(band="high"), 0)
    assert everything.route(alert(kind="deescalated", band="low", previous="high"), 0)


def test_policy_destinations_resolve_secrets_from_env_and_files(tmp_path: Path) -> None:
    secret_file = tmp_path / "billing_whsec"
    secret_file.write_text(SECRET + "\n")
    routing = notify_policy(ROUTING, secret_file=secret_file)
    settings = Settings(app_id="cs", notify={
        "slack_webhook_url": "https://hooks.slack.com/services/T/B/X"})
    env = {"CS_BILLING_HOOK_URL": "https://billing.example.com/hooks/churn", "CS_PD_KEY": PD_KEY}
    specs = {s.name: s for s in config.specs(settings, "high", routing, env)}
    assert set(specs) == {"slack", "billing-team", "cs-escalations", "am"}
    assert specs["billing-team"].group == "cs-notify-billing-team"
    assert (specs["billing-team"].kind, specs["billing-team"].url, specs["billing-team"].secret
            ) == ("webhook", env["CS_BILLING_HOOK_URL"], SECRET)
    assert specs["cs-escalations"].routing_key == PD_KEY
    assert specs["cs-escalations"].url == "https://events.pagerduty.com/v2/enqueue"
    assert specs["am"].routes is None  # named by no route: every alert
    assert specs["slack"].routes is not None and len(specs["slack"].routes) == 1
    pd = Router(specs["cs-escalations"].routes, "high")
    billing = Router(specs["billing-team"].routes, "high")
    big_critical = alert("x", mrr=250_000)
    assert pd.route(big_critical, 0) and not billing.route(big_critical, 0)
    card = alert("y", band="high", mrr=250_000, reasons=(INVOLUNTARY,))
    assert billing.route(card, 0) and not pd.route(card, 0)
    # the default policy and the old policy files know nothing of notify: unchanged
    assert load_policy().notify is None
    assert config.specs(settings, "high", None) == config.specs(settings, "high")


@pytest.mark.parametrize(("text", "message"), [
    ("routes: [{to: [billing]}]", "unknown destination 'billing'"),
    ("routes: [{to: [slack], bands: [severe]}]", "bands"),
    ("routes: [{to: [slack], reasons: [churny]}]", "unknown reason 'churny'"),
    ("routes: [{to: [slack], churn: accidental}]", "churn"),
    ("routes: [{to: [slack], min_mrr_at_risk: -1}]", "min_mrr_at_risk"),
    ("routes: [{to: []}]", "to"),
    ("routes: [{to: [slack], band: [high]}]", "band"),  # a typo is not silently ignored
    ("destinations: {hook: {kind: webhook, url: 'https://x.example.com', secret_env: S}}",
     "a webhook URL is a secret"),
    ("destinations: {chat: {kind: slack, url: 'https://hooks.slack.com/services/T/B/X'}}",
     "a slack URL is a secret"),
    ("destinations: {hook: {kind: webhook, url_env: U}}", "needs one of secret_env"),
    ("destinations: {pd: {kind: pagerduty}}", "needs one of routing_key_env"),
    ("destinations: {am: {kind: alertmanager}}", "needs url"),
    ("destinations: {am: {kind: alertmanager, url: 'ftp://x'}}", "http"),
    ("destinations: {am: {kind: alertmanager, url_env: 'NOT-A-NAME'}}", "environment variable"),
    ("destinations: {slack: {kind: slack, url_env: U}}", "environment's default"),
    ("destinations: {Big Name: {kind: slack, url_env: U}}", "destination name"),
    ("destinations: {am: {kind: teams, url: 'http://x'}}", "kind"),
])
def test_bad_routing_is_refused_at_load_naming_the_problem(tmp_path: Path, text: str,
                                                            message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("notify:\n" + "\n".join("  " + line for line in text.splitlines()))
    with pytest.raises(ConfigError, match=message):
        load_policy(path)


def test_missing_secrets_and_unconfigured_defaults_stop_the_start(tmp_path: Path) -> None:
    secret_file = tmp_path / "whsec"
    routing = notify_policy(ROUTING, secret_file=secret_file)
    settings = Settings(notify={"slack_webhook_url": "https://hooks.slack.com/services/T/B/X"})
    env = {"CS_BILLING_HOOK_URL": "https://billing.example.com/h", "CS_PD_KEY": PD_KEY}
    with pytest.raises(ConfigError, match=r"'billing-team': cannot read .*whsec"):
        config.specs(settings, "high", routing, env)
    secret_file.write_text(SECRET)
    with pytest.raises(ConfigError, match="'cs-escalations': environment variable CS_PD_KEY"):
        config.specs(settings, "high", routing, {"CS_BILLING_HOOK_URL": "https://b.example"})
    with pytest.raises(ConfigError, match="'billing-team': url"):
        config.specs(settings, "high", routing, {**env, "CS_BILLING_HOOK_URL": "billing:80"})
    secret_file.write_text("whsec_nope")
    with pytest.raises(ConfigError, match="'billing-team': secret") as caught:
        config.specs(settings, "high", routing, env)
    assert "whsec_nope" not in str(caught.value)  # never the value
    secret_file.write_text(SECRET)
    with pytest.raises(ConfigError, match="routes name destination 'slack', which is not configured"):
        config.specs(Settings(), "high", routing, env)


def test_version_1_alerts_still_read_and_route() -> None:
    old = alert().model_dump(mode="json")
    del old["plan"]
    old["schema_version"] = 1
    read = Alert.model_validate(old)  # what churn.alerts holds from before the bump
    assert read.plan is None and read.schema_version == 1
    routes = NotifyPolicy.model_validate({"routes": [{"to": ["slack"], "plans": ["enterprise"]},
                                                     {"to": ["slack"], "bands": ["critical"]}]})
    assert Router(routes.routes_to("slack"), "high").route(read, 0)  # by its band
    assert alert().model_dump()["schema_version"] == 3
