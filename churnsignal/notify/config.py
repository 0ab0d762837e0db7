"""The configured destinations, from the settings (and the older CHURNSIGNAL_WEBHOOK__*)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from churnsignal.app.settings import NotifySettings, Settings
from churnsignal.errors import ConfigError
from churnsignal.notify.destinations import Spec
from churnsignal.notify.routing import Destination as Named
from churnsignal.notify.routing import NotifyPolicy

log = logging.getLogger("churnsignal.notify")


def specs(settings: Settings, min_band: str, routing: NotifyPolicy | None = None,
          environ: Mapping[str, str] | None = None) -> list[Spec]:
    """One Spec per configured destination: the environment's defaults, then the policy's
    named ones (``routing``), each with the routes that name it; a ConfigError names what
    is wrong."""
    out = _defaults(settings, min_band)
    if routing is None:
        return out
    env = os.environ if environ is None else environ
    common = _common(settings, min_band)
    for name, dest in routing.destinations.items():
        out.append(_named(name, dest, common, settings, env))
    configured = {s.name for s in out}
    for name in sorted(routing.named() - configured):
        variable = {"webhook": "CHURNSIGNAL_NOTIFY__WEBHOOK_URL (and __WEBHOOK_SECRET)",
                    "slack": "CHURNSIGNAL_NOTIFY__SLACK_WEBHOOK_URL",
                    "pagerduty": "CHURNSIGNAL_NOTIFY__PAGERDUTY_ROUTING_KEY",
                    "alertmanager": "CHURNSIGNAL_NOTIFY__ALERTMANAGER_URL"}[name]
        raise ConfigError(f"the policy's notify routes name destination {name!r}, which is "
                          f"not configured: set {variable}, or route to a destination "
                          "defined under notify.destinations")
    return [replace(s, routes=routing.routes_to(s.name)) for s in out]


def _secret(name: str, what: str, variable: str | None, path: Path | None,
            env: Mapping[str, str]) -> str:
    if variable is not None:
        value = env.get(variable, "").strip()
        if not value:
            raise ConfigError(f"notify destination {name!r}: environment variable {variable} "
                              f"(its {what}) is not set")
        return value
    assert path is not None
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"notify destination {name!r}: cannot read {path} (its {what}): "
                          f"{exc.strerror}") from None
    if not value:
        raise ConfigError(f"notify destination {name!r}: {path} (its {what}) is empty")
    return value


def _named(name: str, d: Named, common: Spec, settings: Settings,
           env: Mapping[str, str]) -> Spec:
    """A policy destination, its secrets read from the environment or files."""
    if d.url is not None:
        url = d.url
    elif d.url_env is not None or d.url_file is not None:
        url = _secret(name, "url", d.url_env, d.url_file, env)
    else:  # pagerduty without a url: the settings' endpoint
        url = settings.notify.pagerduty_url
    field = {"webhook": "webhook_url", "slack": "slack_webhook_url",
             "pagerduty": "pagerduty_url", "alertmanager": "alertmanager_url"}[d.kind]
    secret = key = None
    if d.kind == "webhook":
        secret = _secret(name, "signing secret", d.secret_env, d.secret_file, env)
    if d.kind == "pagerduty":
        key = _secret(name, "routing key", d.routing_key_env, d.routing_key_file, env)
    try:  # the same checks as the environment's destinations
        NotifySettings.model_validate({field: url, "webhook_secret": secret})
    except ValidationError as exc:
        problems = "; ".join(f"{'secret' if 'secret' in str(e['loc']) else 'url'}: {e['msg']}"
                             for e in exc.errors())  # never the values
        raise ConfigError(f"notify destination {name!r}: {problems}") from None
    return replace(common, name=name, kind=d.kind, url=url, secret=secret, routing_key=key)


def _common(settings: Settings, min_band: str) -> Spec:
    n = settings.notify
    return Spec("", "webhook", "", app_id=settings.app_id, min_band=min_band,
                account_url=n.account_url, timeout_s=n.timeout_s,
                retry_base_s=n.retry_base_s, retry_max_s=n.retry_max_s,
                resend_s=n.alertmanager_resend_s)


def _defaults(settings: Settings, min_band: str) -> list[Spec]:
    """The environment's destinations (CHURNSIGNAL_NOTIFY__*, CHURNSIGNAL_WEBHOOK__*)."""
    n = settings.notify
    common = _common(settings, min_band)
    out: list[Spec] = []
    if n.webhook_url is not None:
        if n.webhook_secret is None:
            raise ConfigError(
                "CHURNSIGNAL_NOTIFY__WEBHOOK_URL needs CHURNSIGNAL_NOTIFY__WEBHOOK_SECRET (or its "
                "_FILE): deliveries are signed per Standard Webhooks; make one with: python -c "
                "\"import base64,os; print('whsec_' + base64.b64encode(os.urandom(24)).decode())\"")
        out.append(replace(common, name="webhook", kind="webhook",
                           url=n.webhook_url.get_secret_value(),
                           secret=n.webhook_secret.get_secret_value()))
    elif n.webhook_secret is not None:
        raise ConfigError("CHURNSIGNAL_NOTIFY__WEBHOOK_SECRET is set without "
                          "CHURNSIGNAL_NOTIFY__WEBHOOK_URL")
    if n.slack_webhook_url is not None:
        out.append(replace(common, name="slack", kind="slack",
                           url=n.slack_webhook_url.get_secret_value()))
    if n.pagerduty_routing_key is not None:
        out.append(replace(common, name="pagerduty", kind="pagerduty", url=n.pagerduty_url,
                           routing_key=n.pagerduty_routing_key.get_secret_value()))
    if n.alertmanager_url is not None:
        out.append(replace(common, name="alertmanager", kind="alertmanager",
                           url=n.alertmanager_url))
    legacy = _legacy(settings, common)
    if legacy is not None:
        if any(s.name == legacy.name for s in out):
            raise ConfigError(
                f"CHURNSIGNAL_WEBHOOK__URL (the older form) and the destination "
                f"{legacy.name!r} of CHURNSIGNAL_NOTIFY__* are both set: keep only the "
                f"CHURNSIGNAL_NOTIFY__ one")
        out.append(legacy)
    return out


def _legacy(settings: Settings, common: Spec) -> Spec | None:
    """CHURNSIGNAL_WEBHOOK__URL keeps working, now delivered like the others: from the
    alerts topic, retried until the endpoint takes it, nothing dropped."""
    w = settings.webhook
    if w.url is None:
        return None
    slack = w.format == "slack"
    name = "slack" if slack else "webhook"
    newer = ("CHURNSIGNAL_NOTIFY__SLACK_WEBHOOK_URL" if slack else
             "CHURNSIGNAL_NOTIFY__WEBHOOK_URL with __WEBHOOK_SECRET (signed, Standard Webhooks)")
    log.warning(
        "CHURNSIGNAL_WEBHOOK__URL is the older form of %s; it is delivered as destination %r "
        "(consumer group %s-notify-%s on %s): retried until the endpoint takes it, so "
        "CHURNSIGNAL_WEBHOOK__MAX_ATTEMPTS and __QUEUE_MAX no longer apply; the body is %s as "
        "before", newer, name, settings.app_id, name, settings.topics.alerts,
        "a Slack message" if slack else "the alert JSON, unsigned,")
    return replace(common, name=name, kind="slack" if slack else "legacy-json",
                   url=w.url.get_secret_value(), timeout_s=w.timeout_s,
                   retry_max_s=w.retry_max_s)
