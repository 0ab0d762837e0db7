"""Named destinations and routing rules: the policy file's ``notify`` section (pure).

No Kafka, settings or metrics: the models validate the section when the policy loads (a bad
band, reason, kind or an unknown destination in a route is an error naming it), and
``Router`` says which alerts a destination receives. Secrets never appear in the policy:
a destination names the environment variable or the file that holds its URL, signing secret
or routing key (``churnsignal.notify.config`` reads them at start).

A destination that no route names receives every alert (as the environment's destinations
always did). One that routes name receives the escalations that match any of those routes;
a de-escalation goes where the account's escalation went (so an incident opened by a
route is also resolved there), and nowhere else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from churnsignal.schemas.alerts import Alert
from churnsignal.schemas.segment import trait_value
from churnsignal.stream.attributes import ATTRIBUTE_NAME, MAX_VALUE
from churnsignal.stream.reasons import REASONS

Band = Literal["low", "medium", "high", "critical"]
Kind = Literal["webhook", "slack", "pagerduty", "alertmanager"]
BANDS: Final = ("low", "medium", "high", "critical")
# The destinations the environment defines (CHURNSIGNAL_NOTIFY__*): routes may name them.
DEFAULT_NAMES: Final = ("webhook", "slack", "pagerduty", "alertmanager")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_SECRET_URL_KINDS: Final = ("webhook", "slack")  # their URL is the credential


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Destination(_Frozen):
    """One named destination. Where its secrets are: ``*_env`` names an environment
    variable, ``*_file`` a file (e.g. a mounted secret); never the value itself."""

    kind: Kind
    url: str | None = Field(None, description="Alertmanager's or PagerDuty's endpoint (not "
                            "a secret); a webhook's or Slack's URL is one: url_env or url_file.")
    url_env: str | None = None
    url_file: Path | None = None
    secret_env: str | None = Field(None, description="webhook: its whsec_ signing secret.")
    secret_file: Path | None = None
    routing_key_env: str | None = Field(None, description="pagerduty: the integration key.")
    routing_key_file: Path | None = None

    @field_validator("url_env", "secret_env", "routing_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        return name

    @field_validator("url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return url

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        k = self.kind
        urls = [x for x in (self.url, self.url_env, self.url_file) if x is not None]
        if k in _SECRET_URL_KINDS and self.url is not None:
            raise ValueError(f"a {k} URL is a secret: give url_env (an environment variable's "
                             "name) or url_file, never the URL in the policy")
        if len(urls) > 1:
            raise ValueError("give one of url, url_env, url_file")
        if not urls and k != "pagerduty":
            raise ValueError(f"a {k} destination needs " + (
                "url_env or url_file" if k in _SECRET_URL_KINDS else "url (or url_env/url_file)"))
        secrets = [x for x in (self.secret_env, self.secret_file) if x is not None]
        keys = [x for x in (self.routing_key_env, self.routing_key_file) if x is not None]
        if k == "webhook" and len(secrets) != 1:
            raise ValueError("a webhook destination needs one of secret_env, secret_file (its "
                             "whsec_ signing secret)")
        if k != "webhook" and secrets:
            raise ValueError(f"secret_env/secret_file are for webhooks, not {k}")
        if k == "pagerduty" and len(keys) != 1:
            raise ValueError("a pagerduty destination needs one of routing_key_env, "
                             "routing_key_file")
        if k != "pagerduty" and keys:
            raise ValueError(f"routing_key_env/routing_key_file are for pagerduty, not {k}")
        return self


class Match(_Frozen):
    """Conditions on an escalation; every one given must hold (none given: every alert)."""

    bands: list[Band] | None = Field(None, min_length=1, description="The alert's band.")
    reasons: list[str] | None = Field(None, min_length=1, description="Reason codes: any of "
                                      "the alert's reasons (reason_of: any) or its top one.")
    reason_of: Literal["any", "top"] = "any"
    churn: Literal["voluntary", "involuntary"] | None = Field(
        None, description="involuntary: a billing reason (failed payment, expiring card) is "
        "among the alert's reasons (reason_of: any) or is its top one; voluntary: not.")
    min_mrr_at_risk: float | None = Field(None, ge=0, description="MRR at risk at least this, "
                                          "in the currency's major unit (1000 = $1,000).")
    plans: list[str] | None = Field(None, min_length=1, description="The account's plan.")
    attributes: dict[str, list[str]] | None = Field(
        None, min_length=1, description="Account attributes (the policy's accounts.traits, "
        "from Segment group calls): each one named must have one of its listed values.")

    @field_validator("attributes", mode="before")
    @classmethod
    def _as_text(cls, wanted: Any) -> Any:
        """Values as the attributes hold them: ``[10, true]`` matches "10" and "true"."""
        if not isinstance(wanted, dict):
            return wanted
        return {name: [trait_value(v) if isinstance(v, bool | int | float) else v
                       for v in values] if isinstance(values, list) else values
                for name, values in wanted.items()}

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, wanted: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for name, values in (wanted or {}).items():
            if not ATTRIBUTE_NAME.fullmatch(name):
                raise ValueError(f"attribute {name!r} is not an attribute name (lower-case "
                                 "letters, digits and _)")
            if not values:
                raise ValueError(f"attribute {name!r}: list at least one value")
            for value in values:
                if not value or len(value) > MAX_VALUE:
                    raise ValueError(f"attribute {name!r}: value {value[:80]!r} can never "
                                     f"match (attribute values are 1 to {MAX_VALUE} "
                                     "characters)")
        return wanted

    @field_validator("reasons")
    @classmethod
    def _known(cls, codes: list[str] | None) -> list[str] | None:
        for code in codes or ():
            if code not in REASONS:
                raise ValueError(f"unknown reason {code!r} (known: {', '.join(sorted(REASONS))})")
        return codes


class Route(Match):
    to: list[str] = Field(min_length=1, description="Destination names.")


class NotifyPolicy(_Frozen):
    """The policy's ``notify`` section."""

    destinations: dict[str, Destination] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> NotifyPolicy:
        for name in self.destinations:
            if not _NAME.fullmatch(name):
                raise ValueError(f"destination name {name!r}: lower-case letters, digits, - and "
                                 "_ (it names the consumer group <app_id>-notify-<name>)")
            if name in DEFAULT_NAMES:
                raise ValueError(f"destination name {name!r} is the environment's default "
                                 f"{name} destination (CHURNSIGNAL_NOTIFY__*): choose another")
        known = [*self.destinations, *DEFAULT_NAMES]
        for i, route in enumerate(self.routes, 1):
            for name in route.to:
                if name not in known:
                    raise ValueError(f"route {i}: unknown destination {name!r} (known: "
                                     f"{', '.join(known)})")
        return self

    def routes_to(self, name: str) -> tuple[Route, ...] | None:
        """The routes naming ``name``; None when none does (it receives everything)."""
        found = tuple(r for r in self.routes if name in r.to)
        return found or None

    def named(self) -> set[str]:
        return {name for r in self.routes for name in r.to}


def churn_kind(alert: Alert, reason_of: str = "any") -> str:
    kinds = [r.kind for r in alert.reasons[:1]] if reason_of == "top" else [
        r.kind for r in alert.reasons]
    return "involuntary" if "involuntary" in kinds else "voluntary"


def matches(match: Match, alert: Alert) -> bool:
    if match.bands is not None and alert.band not in match.bands:
        return False
    if match.reasons is not None:
        codes = [r.code for r in alert.reasons]
        if match.reason_of == "top":
            codes = codes[:1]
        if not set(codes) & set(match.reasons):
            return False
    if match.churn is not None and churn_kind(alert, match.reason_of) != match.churn:
        return False
    if (match.min_mrr_at_risk is not None
            and alert.mrr_at_risk_cents < round(match.min_mrr_at_risk * 100)):
        return False
    if match.plans is not None and alert.plan not in match.plans:
        return False
    if match.attributes is not None:
        have = alert.attributes or {}
        return all(have.get(name) in values for name, values in match.attributes.items())
    return True


class Router:
    """Which alerts one destination receives, given its routes (None: all of them).

    Escalations go when a route matches; a de-escalation goes where the account's
    escalation went (accounts "open" here, per Kafka partition: alerts are keyed by
    account), so a destination that was paged is also told the account calmed down, and
    one that was not is not; an account falling below ``min_band`` closes."""

    def __init__(self, routes: tuple[Route, ...] | None, min_band: str) -> None:
        self.routes = routes
        self.min_band = min_band
        self.open: dict[int, set[str]] = {}

    def route(self, alert: Alert, partition: int) -> bool:
        """Whether this alert goes to the destination (and remember it; idempotent)."""
        if self.routes is None:
            return True
        accounts = self.open.setdefault(partition, set())
        if alert.kind == "escalated":
            wanted = any(matches(r, alert) for r in self.routes)
            if wanted:
                accounts.add(alert.account_id)
            return wanted
        wanted = alert.account_id in accounts
        if BANDS.index(alert.band) < BANDS.index(self.min_band):
            accounts.discard(alert.account_id)
        return wanted

    def drop(self, partitions: set[int]) -> None:
        for p in partitions:
            self.open.pop(p, None)
