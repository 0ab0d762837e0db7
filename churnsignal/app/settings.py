"""One validated settings model for every churnsignal process (env, .env file or defaults)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from churnsignal.errors import ConfigError


class TopicNames(BaseModel):
    """Kafka topic names; the defaults are public interface."""

    usage: str = Field("usage.events", description="Product usage events (Segment track, ...).")
    billing: str = Field("billing.events", description="Billing events (Stripe webhook Events).")
    support: str = Field("support.events", description="Support events (Zendesk tickets, ...).")
    alerts: str = Field("churn.alerts", description="Churn-risk alerts emitted by churnsignal.")
    dlq: str = Field("churn.dlq", description="Dead-letter topic for undecodable input.")
    undeliverable: str = Field(
        "churn.alerts.undeliverable", description="Alerts a notify destination refused for "
        "good (a 4xx other than 408/429): the alert as on churn.alerts, with the destination, "
        "status and response body in headers.")
    snapshots: str = Field(
        "billing.snapshots", description="Subscription snapshots `churnsignal import "
        "subscriptions` produces (canonical subscription_snapshot events, keyed by account); "
        "the ingest reads it as a source topic, exempt from the policy horizon.")

    def sources(self) -> list[str]:
        return [self.usage, self.billing, self.support]


class KafkaSettings(BaseModel):
    """How to reach Kafka and how the consumer groups behave."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when the protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: Path | None = Field(None, description="CA bundle for TLS to the brokers.")
    rebalance_timeout_s: float = Field(
        20.0,
        gt=0,
        le=600,
        description="Consumer-group rebalance timeout; a new member may wait this long to join.",
    )
    session_timeout_s: float = Field(
        20.0, gt=0, le=600, description="Consumer-group session timeout."
    )
    replication_factor: int = Field(
        1, ge=1, le=10, description="Replication factor of topics churnsignal creates."
    )
    connect_timeout_s: float = Field(
        60.0, gt=0, description="Give up with an error when the broker does not answer this long."
    )
    fetch_max_wait_ms: int = Field(
        100, ge=10, le=5000, description="How long a fetch may wait for records. Apache Kafka "
        "answers as soon as records arrive; some brokers (Tansu) hold the fetch this long, "
        "which then adds to event-to-alert latency at every hop.")


class SinkSettings(BaseModel):
    """ClickHouse writing."""

    batch_max_rows: int = Field(50_000, gt=0, description="Flush once this many rows wait.")
    flush_interval_s: float = Field(
        1.0, gt=0, le=300, description="Longest a row waits before the flush (one insert per table)."
    )
    retry_max_s: float = Field(30.0, gt=0, description="Longest back-off between write retries.")
    write_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Longest one flush waits for ClickHouse (retries of "
        "transient errors included); then the flush gives up, keeps its rows and tries again "
        "later, so no lock is held across an outage.")
    ttl_days: int = Field(400, ge=1, le=36_500, description="Days score snapshots and support "
                          "events are kept (TTL, applied when the tables are created).")


SourceName = Literal["auto", "canonical", "stripe", "segment", "zendesk", "intercom"]


class IngestSettings(BaseModel):
    """The batched consumer that decodes source topics and repartitions by account."""

    group_id: str | None = Field(
        None, description="Consumer group of the source topics; unset: '<app_id>-ingest'. "
        "A new group re-reads the topics from the start (a replay)."
    )
    batch_max_events: int = Field(20_000, gt=0, description="Largest batch taken from Kafka at once.")
    batch_max_wait_s: float = Field(
        0.5, gt=0, le=60, description="Longest wait to fill a batch (bounds alert latency)."
    )
    max_message_bytes: int = Field(256_000, gt=0, description="Larger messages are dead-lettered.")
    separate_process: bool = Field(
        False, description="Run the ingest (decode, validate, dead-letter, repartition) in a "
        "child process of the worker, so that a worker uses a second core: its metrics, "
        "health and backlog still show on the worker's endpoints.")
    max_future_skew_s: float = Field(
        86_400.0, ge=0, description="Events further in the future than this are dead-lettered."
    )
    sources: dict[str, SourceName | tuple[SourceName, ...]] = Field(
        default_factory=dict, description="Pin a topic's payload format, e.g. "
        '{"billing.events": "stripe"}, or several, e.g. {"support.events": ["zendesk", '
        '"intercom"]}; unpinned topics detect it per message from its shape.')
    identity_grace_s: float = Field(
        60.0, ge=0, description="How long an event of a Stripe customer that no metadata links "
        "waits for a link before the customer id itself is taken as its account.")
    max_parked_per_identity: int = Field(
        1000, ge=0, le=100_000, description="Events kept per unresolved identity (a Stripe charge, "
        "a Segment user) until its account is known; beyond it they are dead-lettered.")
    identity_ttl_s: float = Field(
        604_800.0, gt=0, description="Longest an event waits for its identity's account (7 days); "
        "then it is dead-lettered as unattributed_expired, and an identity left with nothing that "
        "never joined an account is deleted (a Stripe customer takes its own id instead).")
    max_parked_identities: int = Field(
        20_000, ge=1, description="Identities with events waiting for their account, per state "
        "partition (about 2 KB each with one event); beyond it, on each re-score tick, those "
        "waiting longest expire first, as with identity_ttl_s.")


class WebhookSettings(BaseModel):
    """Optional POST of each alert to an HTTP endpoint (e.g. a Slack incoming webhook)."""

    url: SecretStr | None = Field(
        None, description="http(s) URL to POST alerts to; unset: no webhook. Treated as a secret.")
    format: Literal["json", "slack"] = Field(
        "json", description="json: the alert as on the topic; slack: a Slack message (text, blocks).")
    timeout_s: float = Field(5.0, gt=0, le=120, description="Timeout of one POST.")
    max_attempts: int = Field(5, ge=1, le=50, description="POST attempts per alert (5xx, 408, 429, "
                              "network errors are retried; other 4xx are not).")
    retry_max_s: float = Field(10.0, gt=0, description="Longest back-off between attempts.")
    queue_max: int = Field(10_000, ge=1, description="Alerts waiting for the webhook; beyond it they "
                           "are not posted (still on the alerts topic) and counted as dropped.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value().strip():
            return None
        if not v.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


def _http_url(v: Any) -> Any:
    """Empty is unset; anything else must be an http(s) URL."""
    raw = v.get_secret_value() if isinstance(v, SecretStr) else v
    if raw is None or not str(raw).strip():
        return None
    if not str(raw).strip().startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v


class NotifySettings(BaseModel):
    """Alert delivery from churn.alerts (one consumer group `<app_id>-notify-<destination>`
    per destination; an alert is committed once delivered or refused for good). Runs inside
    `churnsignal worker` when a destination is set, and alone as `churnsignal notify`."""

    webhook_url: SecretStr | None = Field(
        None, description="Generic webhook, signed per Standard Webhooks (needs webhook_secret).")
    webhook_secret: SecretStr | None = Field(
        None, description="whsec_ + base64 of 24-64 random bytes; signs webhook deliveries.")
    slack_webhook_url: SecretStr | None = Field(None, description="Slack incoming webhook URL.")
    pagerduty_routing_key: SecretStr | None = Field(
        None, description="PagerDuty Events API v2 integration (routing) key.")
    pagerduty_url: str = Field("https://events.pagerduty.com/v2/enqueue",
                               description="PagerDuty Events API v2 endpoint.")
    alertmanager_url: str | None = Field(
        None, description="Alertmanager base URL (alerts go to /api/v2/alerts).")
    account_url: str | None = Field(
        None, description="Link to an account in messages: a URL with {account_id}.")
    in_worker: bool = Field(True, description="Deliver inside `churnsignal worker`; false when "
                            "`churnsignal notify` runs apart.")
    start_from: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a destination's new consumer group starts on churn.alerts.")
    timeout_s: float = Field(10.0, gt=0, le=120, description="Timeout of one POST.")
    retry_base_s: float = Field(0.5, gt=0, le=60, description="First retry delay (doubles).")
    retry_max_s: float = Field(30.0, gt=0, le=3600, description="Longest delay between retries.")
    alertmanager_resend_s: float = Field(
        60.0, ge=1, le=3600, description="Firing accounts are re-sent this often (endsAt: 4x).")

    _urls = field_validator("webhook_url", "slack_webhook_url", "pagerduty_url",
                            "alertmanager_url", "account_url", mode="before")(_http_url)

    @field_validator("webhook_secret", "pagerduty_routing_key", mode="before")
    @classmethod
    def _empty_secret(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        return None if raw is None or not str(raw).strip() else v

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, v: SecretStr | None) -> SecretStr | None:
        import base64
        import binascii

        if v is None:
            return None
        raw = v.get_secret_value().strip()  # the messages never hold the secret itself
        if not raw.startswith("whsec_"):
            raise ValueError("must start with whsec_ (then base64 of 24-64 random bytes)")
        try:
            key = base64.b64decode(raw.removeprefix("whsec_") + "==", validate=False)
        except (binascii.Error, ValueError):
            raise ValueError("the part after whsec_ must be base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError(f"must hold 24 to 64 bytes after whsec_ (base64), got {len(key)}")
        return SecretStr(raw)

    def destinations(self) -> list[str]:
        return [name for name, on in (
            ("webhook", self.webhook_url), ("slack", self.slack_webhook_url),
            ("pagerduty", self.pagerduty_routing_key), ("alertmanager", self.alertmanager_url))
            if on is not None]


class ViewSettings(BaseModel):
    """How the business views define churn (applied by `churnsignal migrate` and at start)."""

    past_due_churn_days: int | None = Field(
        None, ge=0, le=3650, description="A past-due or unpaid customer counts as churned "
        "(involuntary) after this many days of delinquency, unless it pays or recovers first; "
        "unset: churned only when the subscription is cancelled.")

    reporting_currency: str | None = Field(
        None, pattern=r"^[a-z]{3}$", description="ISO 4217 code (any case) of the one currency "
        "`mrr_monthly_reporting` converts every currency's MRR movements to, with the rates "
        "of `churnsignal import rates`; unset: that view is empty (MRR stays per currency).")

    @field_validator("past_due_churn_days", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("reporting_currency", mode="before")
    @classmethod
    def _currency_code(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v.strip().lower() or None
        return v


class HealthSettings(BaseModel):
    """When /healthz reports the worker stuck (Kubernetes restarts a pod on it)."""

    stall_s: float = Field(
        300.0, ge=10, le=86_400, description="/healthz fails (503) when the event loop is blocked "
        "this long, or the agent has made no progress this long while work waits and Kafka and "
        "ClickHouse answer. Waiting on a Kafka or ClickHouse outage is not a stall.")


class GatewaySettings(BaseModel):
    """`churnsignal gateway`: the HTTP ingest gateway (Segment-compatible tracking API and the
    Stripe, Zendesk and Intercom webhooks) into the source topics. Every secret list is JSON
    (several entries for rotation); a route whose list is empty refuses every request."""

    host: str = Field("127.0.0.1", description="Interface the gateway listens on (0.0.0.0 in "
                      "a container; TLS is terminated in front of it).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the gateway (and its "
                      "/healthz, /readyz, /metrics).")
    segment_write_keys: list[SecretStr] = Field(
        default_factory=list, description='Write keys /v1/* accept (JSON list, e.g. ["wk1"]); '
        "HTTP Basic user name or writeKey in the body. Never logged.")
    stripe_webhook_secrets: list[SecretStr] = Field(
        default_factory=list, description="Stripe endpoint signing secrets (whsec_...), JSON "
        "list. Never logged.")
    zendesk_signing_secrets: list[SecretStr] = Field(
        default_factory=list, description="Zendesk webhook signing secrets, JSON list. Never "
        "logged.")
    intercom_client_secrets: list[SecretStr] = Field(
        default_factory=list, description="Intercom app client secrets (X-Hub-Signature), JSON "
        "list. Never logged.")
    signature_tolerance_s: float = Field(
        300.0, ge=0, le=86_400, description="Stripe and Zendesk signatures older (or newer) than "
        "this are refused (replay protection).")
    max_message_bytes: int = Field(32 * 1024, ge=1024, le=1_048_576,
                                   description="Largest Segment message (Segment: 32 KB).")
    max_batch_bytes: int = Field(500 * 1024, ge=1024, le=16_777_216,
                                 description="Largest Segment request body, after gzip (500 KB).")
    max_webhook_bytes: int = Field(1_048_576, ge=1024, le=16_777_216,
                                   description="Largest webhook body.")
    max_inflight: int = Field(256, ge=1, le=100_000, description="Requests handled at once; "
                              "beyond it the gateway answers 503 with Retry-After.")
    produce_timeout_s: float = Field(10.0, gt=0, le=300, description="Longest a request waits "
                                     "for Kafka to acknowledge; then 503 with Retry-After.")
    retry_after_s: int = Field(5, ge=1, le=3600,
                               description="Retry-After of a 503 (Kafka cannot take it now).")
    idempotence: bool = Field(True, description="Idempotent producer (acks=all always). A "
                              "broker without InitProducerId (Tansu 0.6) falls back to "
                              "non-idempotent acks=all, with a warning.")


class StripeSettings(BaseModel):
    """`churnsignal sync stripe`: Stripe's API, read with a restricted key."""

    api_key: SecretStr | None = Field(
        None, description="A restricted key with read access to Customers, Subscriptions and "
        "Events (rk_live_...); or CHURNSIGNAL_STRIPE__API_KEY_FILE. Never logged.")
    api_base: str | None = Field(
        None, description="Stripe API base URL; unset: Stripe's own (https://api.stripe.com). "
        "For stripe-mock or a test server.")
    page_size: int = Field(100, ge=1, le=100, description="Objects per list request.")
    max_network_retries: int = Field(
        3, ge=0, le=20, description="Retries of connection errors, 409 and 5xx answers (the "
        "stripe library's own, with its back-off).")
    rate_limit_retries: int = Field(
        8, ge=0, le=100, description="Retries of one request answered 429 (rate limited).")
    rate_limit_backoff_s: float = Field(
        1.0, gt=0, le=60, description="First wait after a 429; doubled each retry, jittered.")
    rate_limit_backoff_max_s: float = Field(30.0, gt=0, le=600,
                                            description="Longest wait after a 429.")
    events_days: int = Field(30, ge=1, le=30, description="Days of Events to read (Stripe "
                             "keeps 30).")

    @field_validator("api_key", "api_base", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        return None if isinstance(v, str) and not v.strip() else v


# RFC 6750 b64token: what a bearer token may hold (hex, base64 and base64url all fit).
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
API_TOKEN_MIN_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts local connections: 127.0.0.0/8, ::1, localhost.

    Anything else (0.0.0.0, ::, an interface address, a host name) is reachable from outside.
    """
    import ipaddress

    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])  # fe80::1%eth0: zone id
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class Settings(BaseSettings):
    """Every setting of churnsignal. Env prefix ``CHURNSIGNAL_``; nested with ``__``."""

    model_config = SettingsConfigDict(
        env_prefix="CHURNSIGNAL_",
        env_nested_delimiter="__",
        env_file=None,
        extra="forbid",
        populate_by_name=True,
    )

    kafka_bootstrap_servers: str | None = Field(
        None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "CHURNSIGNAL_KAFKA_BOOTSTRAP_SERVERS"),
        description="host:port[,host:port]; unset means start the embedded Tansu broker.",
    )
    app_id: str = Field("churnsignal", pattern=r"^[A-Za-z0-9._-]{1,100}$",
                        description="Consumer group and prefix of internal topics.")
    state_dir: Path = Field(Path(".churnsignal"), description="Local state (tables, embedded ClickHouse).")
    clickhouse_dsn: SecretStr | None = Field(
        None, description="chdb:///path or http(s)://user:pass@host:8123/db; unset: chdb under state_dir."
    )
    partitions: int = Field(4, ge=1, le=1024, description="Partitions of topics churnsignal creates.")
    web_port: int = Field(6066, ge=0, le=65535, description="HTTP port for /metrics, /healthz, /readyz.")
    web_host: str = Field("127.0.0.1", description="Interface the HTTP endpoints listen on.")
    api_token: SecretStr | None = Field(
        None, description="Bearer token /api/* requires (Authorization: Bearer TOKEN); at least "
        f"{API_TOKEN_MIN_CHARS} characters. Unset: /api/* is open on a loopback web_host and "
        "refused (401) on any other. /healthz, /readyz, /metrics never need it. Never logged.")
    rescore_interval_s: float = Field(
        60.0, gt=0, description="Every account is re-scored this often, so silence raises risk."
    )
    policy_file: Path | None = Field(None, description="Scoring policy YAML; unset: the shipped default.")
    shadow_policy_file: Path | None = Field(
        None, description="A second policy run in shadow: its scores are written beside the "
        "live ones in account_scores (shadow_score, shadow_band, shadow_policy), it never "
        "alerts. Try a calibrated policy here before making it the live one.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["auto", "json", "text"] = Field("auto", description="json when not on a TTY.")
    topics: TopicNames = Field(default_factory=TopicNames)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    views: ViewSettings = Field(default_factory=ViewSettings)
    stripe: StripeSettings = Field(default_factory=StripeSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_servers(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        for part in v.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {part.strip()!r}")
        return v.strip()

    @field_validator("api_token")
    @classmethod
    def _check_token(cls, v: SecretStr | None) -> SecretStr | None:
        # The messages never hold the token itself.
        if v is None or not v.get_secret_value().strip():
            return None
        token = v.get_secret_value().strip()
        if len(token) < API_TOKEN_MIN_CHARS:
            raise ValueError(f"must be at least {API_TOKEN_MIN_CHARS} characters "
                             "(e.g. `openssl rand -hex 32`)")
        if not _TOKEN_CHARS.fullmatch(token):
            raise ValueError("may hold only letters, digits and -._~+/ (then = padding), "
                             "as a bearer token does")
        return SecretStr(token)

    @field_validator("clickhouse_dsn")
    @classmethod
    def _check_dsn(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value().strip():
            return None
        scheme = v.get_secret_value().split("://", 1)[0]
        if scheme not in ("chdb", "http", "https", "clickhouse", "clickhouses"):
            raise ValueError(f"scheme must be chdb://, http:// or https://, got {scheme!r}://")
        return v

    @property
    def embedded_broker(self) -> bool:
        return self.kafka_bootstrap_servers is None

    def effective_clickhouse_dsn(self) -> str:
        if self.clickhouse_dsn is not None:
            return self.clickhouse_dsn.get_secret_value()
        return f"chdb://{(self.state_dir / 'clickhouse').resolve()}"

    @property
    def web_on_loopback(self) -> bool:
        """The web endpoints only answer local connections."""
        return is_loopback(self.web_host)

    @property
    def api_open(self) -> bool:
        """/api/* answers without a token: none is configured and the web host is loopback.
        A configured token is always required, on loopback too."""
        return self.api_token is None and self.web_on_loopback

    @property
    def ingest_group(self) -> str:
        return self.ingest.group_id or f"{self.app_id}-ingest"

    @property
    def state_topic(self) -> str:
        """Internal compacted topic: each account's state, written at every checkpoint
        (the name Faust gave the table's changelog, so existing deployments keep theirs)."""
        return f"{self.app_id}-accounts-changelog"

    @property
    def ingested_topic(self) -> str:
        """Internal topic: decoded events repartitioned by account, one pack per batch."""
        return f"{self.app_id}-ingested"

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, for `config show` and logs."""
        data = self.model_dump(mode="json")
        dsn = self.effective_clickhouse_dsn()
        data["clickhouse_dsn"] = mask_dsn(dsn)
        if data["kafka"].get("sasl_password"):
            data["kafka"]["sasl_password"] = "********"  # noqa: S105 - the mask itself
        if data.get("api_token"):
            data["api_token"] = "********"  # noqa: S105 - the mask itself
        return data


def mask_dsn(dsn: str) -> str:
    """Hide the password of a DSN: http://user:***@host:8123."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest:
        return dsn
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


# Secrets may come from files (Docker/Kubernetes secrets): NAME_FILE=/path sets NAME.
SECRET_VARIABLES = ("CHURNSIGNAL_KAFKA__SASL_PASSWORD", "CHURNSIGNAL_CLICKHOUSE_DSN",
                    "CHURNSIGNAL_WEBHOOK__URL", "CHURNSIGNAL_API_TOKEN",
                    "CHURNSIGNAL_NOTIFY__WEBHOOK_URL", "CHURNSIGNAL_NOTIFY__WEBHOOK_SECRET",
                    "CHURNSIGNAL_NOTIFY__SLACK_WEBHOOK_URL",
                    "CHURNSIGNAL_NOTIFY__PAGERDUTY_ROUTING_KEY",
                    "CHURNSIGNAL_STRIPE__API_KEY",
                    "CHURNSIGNAL_GATEWAY__SEGMENT_WRITE_KEYS",
                    "CHURNSIGNAL_GATEWAY__STRIPE_WEBHOOK_SECRETS",
                    "CHURNSIGNAL_GATEWAY__ZENDESK_SIGNING_SECRETS",
                    "CHURNSIGNAL_GATEWAY__INTERCOM_CLIENT_SECRETS")


def _secrets_from_files() -> dict[str, str]:
    import os

    found = {}
    for name in SECRET_VARIABLES:
        path = os.environ.get(f"{name}_FILE")
        if path and name not in os.environ:
            try:
                found[name] = Path(path).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return found


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment; any invalid value raises one ConfigError naming it."""
    import os

    secrets = _secrets_from_files()
    os.environ.update(secrets)  # read like any other variable, then removed again
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            env = "CHURNSIGNAL_" + "__".join(str(p) for p in err["loc"]).upper()
            if loc.lower() == "kafka_bootstrap_servers":
                env = "KAFKA_BOOTSTRAP_SERVERS"
            problems.append(f"{env} ({loc}): {err['msg']}")
        raise ConfigError("invalid setting: " + "; ".join(problems)) from None
    finally:
        for name in secrets:
            os.environ.pop(name, None)
