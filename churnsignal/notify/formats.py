"""What each destination receives for an alert (pure: no I/O, no settings).

- the generic webhook: a Standard Webhooks message (``webhook-id`` = the alert id, signed
  with the ``standardwebhooks`` library), body ``{"type", "timestamp", "data": <alert>}``;
- Slack: an incoming-webhook message in Block Kit;
- PagerDuty: an Events API v2 event (trigger / resolve, ``dedup_key`` per account);
- Alertmanager: ``postableAlert`` objects for ``POST /api/v2/alerts``.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from standardwebhooks.webhooks import Webhook

from churnsignal.schemas.alerts import Alert
from churnsignal.stream.attributes import ATTRIBUTE_NAME, RESERVED

BANDS: Final = ("low", "medium", "high", "critical")
PAGERDUTY_SEVERITY: Final = {"critical": "critical", "high": "error", "medium": "warning",
                             "low": "info"}
ALERTMANAGER_SEVERITY: Final = {"critical": "critical", "high": "warning", "medium": "info",
                                "low": "info"}
ALERTNAME: Final = "ChurnRisk"
_EMOJI: Final = {"critical": ":rotating_light:", "high": ":warning:",
                 "medium": ":large_yellow_circle:", "low": ":white_check_mark:"}
# Slack Block Kit limits (https://api.slack.com/reference/block-kit/blocks)
SLACK_HEADER_MAX: Final = 150
SLACK_TEXT_MAX: Final = 3000
SLACK_FIELD_MAX: Final = 2000
PAGERDUTY_SUMMARY_MAX: Final = 1024
PAGERDUTY_DEDUP_MAX: Final = 255
# Account attributes on an alert (the policy maps at most 8, values cut to 64 characters);
# also bounded here, since a producer with another policy may have written the alert.
MAX_FACTS: Final = 8
LABEL_NAME_MAX: Final = 32
ATTRIBUTE_VALUE_MAX: Final = 64


def rank(band: str) -> int:
    return BANDS.index(band)


def iso(ts: float) -> str:
    """RFC 3339 in UTC with milliseconds, as Alertmanager, PagerDuty and Svix write them."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def money(cents: int) -> str:
    return f"${cents / 100:,.2f}"


def account_link(template: str | None, account_id: str) -> str | None:
    """The account's page, from a template with ``{account_id}`` (URL-quoted)."""
    if not template:
        return None
    from urllib.parse import quote

    return template.replace("{account_id}", quote(account_id, safe=""))


def event_type(alert: Alert) -> str:
    return f"churn.alert.{alert.kind}"


def summary(alert: Alert) -> str:
    verb = "rose to" if alert.kind == "escalated" else "fell to"
    top = f": {alert.reasons[0].detail}" if alert.reasons else ""
    text = (f"Account {alert.account_id} {verb} {alert.band} churn risk (score "
            f"{alert.score:.0f}, was {alert.previous_band}){top}")
    if alert.mrr_at_risk_cents:
        text += f"; MRR at risk {money(alert.mrr_at_risk_cents)}"
    return text


def plays(alert: Alert) -> str:
    return ", ".join(dict.fromkeys(r.play for r in alert.reasons))


def account_facts(alert: Alert) -> dict[str, str]:
    """The plan (from billing) and the attributes the policy maps from Segment group traits
    (schema versions 2 and 3), at most ``MAX_FACTS``, values cut: what the formats show
    besides the risk, and what routes may match on."""
    facts = {"plan": alert.plan} if alert.plan else {}
    for name, value in list((alert.attributes or {}).items())[:MAX_FACTS]:
        facts.setdefault(name[:LABEL_NAME_MAX], value[:ATTRIBUTE_VALUE_MAX])
    return facts


# --- the generic webhook: Standard Webhooks --------------------------------------------------

def webhook_body(alert: Alert) -> bytes:
    """The same bytes on every retry: the timestamp is the alert's, not the attempt's."""
    return orjson.dumps({"type": event_type(alert), "timestamp": iso(alert.emitted_at),
                         "data": alert.model_dump(mode="json")})


def signed_headers(secret: str, msg_id: str, body: bytes, now: float) -> dict[str, str]:
    """``webhook-id``, ``webhook-timestamp`` (this attempt's: receivers refuse old ones) and
    ``webhook-signature`` (v1, HMAC-SHA256 over ``id.timestamp.body``)."""
    at = datetime.fromtimestamp(int(now), tz=UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now)),
            "webhook-signature": Webhook(secret).sign(msg_id, at, body)}


# --- Slack -----------------------------------------------------------------------------------

def _mrkdwn(text: str) -> str:
    """Slack's three control characters, escaped (account ids and details are user data)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_message(alert: Alert, link: str | None) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` (notifications and fallback) and blocks
    with the account, band, score, MRR at risk, the reasons with their plays, and a link."""
    verb = "rose to" if alert.kind == "escalated" else "fell to"
    account = _mrkdwn(alert.account_id)
    shown = f"<{link}|{account}>" if link else f"*{account}*"
    fields = [
        {"type": "mrkdwn", "text": _cut(f"*Account*\n{shown}", SLACK_FIELD_MAX)},
        {"type": "mrkdwn", "text": f"*Band*\n{alert.band} (was {alert.previous_band})"},
        {"type": "mrkdwn", "text": f"*Score*\n{alert.score:.0f} / 100"},
        {"type": "mrkdwn", "text": f"*MRR at risk*\n{money(alert.mrr_at_risk_cents)}"},
    ]
    facts = account_facts(alert)
    if facts:
        fields.append({"type": "mrkdwn", "text": _cut("*Account*\n" + "\n".join(
            f"{_mrkdwn(name)}: {_mrkdwn(value)}" for name, value in facts.items()),
            SLACK_FIELD_MAX)})
    lines = [f"• {_mrkdwn(r.detail)} ({r.kind}) → play: `{_mrkdwn(r.play)}`"
             for r in alert.reasons]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "emoji": True, "text": _cut(
            f"{alert.account_id} {verb} {alert.band} churn risk", SLACK_HEADER_MAX)}},
        {"type": "section", "fields": fields},
    ]
    if lines:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(
            "*Reasons and plays*\n" + "\n".join(lines), SLACK_TEXT_MAX)}})
    if link:
        blocks.append({"type": "actions", "elements": [{
            "type": "button", "text": {"type": "plain_text", "text": "Open account"},
            "url": link, "action_id": "open_account"}]})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(
        f"alert {_mrkdwn(alert.alert_id)} · {alert.kind} · policy {_mrkdwn(alert.policy_version)}",
        SLACK_TEXT_MAX)}]})
    text = (f"{_EMOJI[alert.band]} {account} {verb} *{alert.band}* churn risk (score "
            f"{alert.score:.0f}, was {alert.previous_band}); MRR at risk "
            f"{money(alert.mrr_at_risk_cents)}")
    return {"text": _cut(text, SLACK_TEXT_MAX), "blocks": blocks}


# --- PagerDuty Events API v2 -------------------------------------------------------------------

def dedup_key(app_id: str, account_id: str) -> str:
    """One incident per account (and deployment)."""
    key = f"{app_id}:{account_id}"
    if len(key) <= PAGERDUTY_DEDUP_MAX:
        return key
    return f"{app_id[:100]}:sha256:{hashlib.sha256(account_id.encode()).hexdigest()}"


def pagerduty_event(alert: Alert, routing_key: str, app_id: str, min_band: str,
                    link: str | None) -> dict[str, Any] | None:
    """Trigger while the account is at or above ``min_band`` (a de-escalation that stays
    there updates the open incident), resolve when it falls below; None: nothing to send."""
    key = dedup_key(app_id, alert.account_id)
    if rank(alert.band) < rank(min_band):
        if alert.kind == "escalated":
            return None  # never pages below the alerting band
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": key}
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": key,
        "payload": {
            "summary": _cut(summary(alert), PAGERDUTY_SUMMARY_MAX),
            "source": "churnsignal",
            "severity": PAGERDUTY_SEVERITY[alert.band],
            "timestamp": iso(alert.emitted_at),
            "component": alert.account_id,
            "group": alert.band,
            "class": alert.reasons[0].code if alert.reasons else "churn_risk",
            "custom_details": {
                "account_id": alert.account_id, "band": alert.band,
                "previous_band": alert.previous_band, "score": alert.score,
                "mrr_at_risk": money(alert.mrr_at_risk_cents), "plays": plays(alert),
                "reasons": [r.detail for r in alert.reasons], "alert_id": alert.alert_id,
                **({"account": account_facts(alert)} if account_facts(alert) else {}),
            },
        },
        "client": "churnsignal",
    }
    if link:
        event["links"] = [{"href": link, "text": f"Account {alert.account_id}"}]
        event["client_url"] = link
    return event


# --- Alertmanager API v2 -------------------------------------------------------------------------

def alertmanager_labels(alert: Alert) -> dict[str, str]:
    """The fixed labels, then one per account attribute (``tier="enterprise"``): only
    attributes whose names are label names of their own (at most MAX_FACTS, values cut),
    so Alertmanager routes may match on them. The plan is an annotation: a label changes
    the alert's identity, and a plan change would resolve and re-fire it."""
    labels = {"alertname": ALERTNAME, "account_id": alert.account_id, "band": alert.band,
              "reason": alert.reasons[0].code if alert.reasons else "none",
              "severity": ALERTMANAGER_SEVERITY[alert.band]}
    for name, value in sorted((alert.attributes or {}).items())[:MAX_FACTS]:
        # the names the policy accepts: label names, never one of the fixed labels
        if ATTRIBUTE_NAME.fullmatch(name) and name not in RESERVED and value:
            labels[name] = value[:ATTRIBUTE_VALUE_MAX]
    return labels


def alertmanager_annotations(alert: Alert) -> dict[str, str]:
    return {"summary": summary(alert), "plays": plays(alert),
            "mrr_at_risk": money(alert.mrr_at_risk_cents),
            "score": f"{alert.score:.0f}",
            "reasons": "; ".join(r.detail for r in alert.reasons),
            "alert_id": alert.alert_id,
            **({"plan": alert.plan} if alert.plan else {})}


def postable_alert(labels: dict[str, str], annotations: dict[str, str], starts_at: float,
                   ends_at: float, generator_url: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"labels": labels, "annotations": annotations,
                           "startsAt": iso(starts_at), "endsAt": iso(ends_at)}
    if generator_url:
        out["generatorURL"] = generator_url
    return out
