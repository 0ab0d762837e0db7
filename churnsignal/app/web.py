"""HTTP endpoints on the worker's web port: metrics, health, and reads of the owned ClickHouse.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and Prometheus). ``/api/*`` needs
``Authorization: Bearer $CHURNSIGNAL_API_TOKEN`` when a token is configured; without one it is
open only on a loopback ``web_host`` and refused (401) on any other, so binding to 0.0.0.0
never exposes account data. Refusing the API rather than the whole worker keeps the stream,
the probes and the metrics running (the shipped container and manifest bind to 0.0.0.0):
the data is just as closed, and a missing optional secret does not stop every account's
scoring. Every /api parameter is checked first; a bad one gets a 400 with the reason.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from faust.web import View as FaustView
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from churnsignal.app.health import HEARTBEAT_S
from churnsignal.notify.ack import BadRequest
from churnsignal.sinks.ddl import TABLES

if TYPE_CHECKING:
    from churnsignal.stream.agents import Runtime

log = logging.getLogger("churnsignal")

# ?at= bounds: Unix seconds from 1970 to 2100; beyond is a unit mistake (milliseconds) or junk.
AT_MIN = 0.0
AT_MAX = 4_102_444_800.0  # 2100-01-01T00:00:00Z
ACCOUNT_ID_MAX = 200  # as schemas.events.Id
PARAM_MAX_CHARS = 64
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
LAG_WARN_S = 1.0  # a heartbeat this late is logged (at most once a minute)


class BadParameter(ValueError):
    """An /api parameter is invalid; the message says why (answered as a 400)."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(reason)
        self.parameter = parameter


def _shown(raw: str) -> str:
    return raw if len(raw) <= 40 else raw[:40] + "..."


def check_params(pairs: Iterable[tuple[str, str]], allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters as a dict: each at most once, none unknown."""
    accepted = set(allowed)
    found: dict[str, str] = {}
    for name, value in pairs:
        if name not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise BadParameter(name, f"unknown parameter {_shown(name)!r} (accepted: {known})")
        if name in found:
            raise BadParameter(name, f"{name} given more than once")
        found[name] = value
    return found


def parse_at(raw: str | None, now: float) -> float:
    """``?at=``: Unix seconds (a plain decimal number), finite, 1970 to 2100; ``now`` if absent."""
    if raw is None:
        return now
    text = raw.strip()
    if len(text) > PARAM_MAX_CHARS or not _DECIMAL.fullmatch(text):
        raise BadParameter("at", f"at must be Unix seconds as a decimal number, got {_shown(raw)!r}")
    at = float(text)
    if not math.isfinite(at) or not AT_MIN <= at <= AT_MAX:
        hint = " (milliseconds? divide by 1000)" if AT_MAX < at <= AT_MAX * 1000 else ""
        raise BadParameter("at", f"at must be between {AT_MIN:.0f} (1970-01-01) and "
                                 f"{AT_MAX:.0f} (2100-01-01) Unix seconds, got {_shown(text)}{hint}")
    return at


def check_account_id(raw: str) -> str:
    """An account id as events carry it: 1-200 characters, no control characters, valid
    Unicode, not an identity key (those start with ``~``)."""
    if not raw or len(raw) > ACCOUNT_ID_MAX:
        raise BadParameter("account_id", f"an account id has 1 to {ACCOUNT_ID_MAX} characters, "
                                         f"got {len(raw)}")
    if raw.startswith("~"):
        raise BadParameter("account_id", "not an account id (ids starting with ~ are identities)")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise BadParameter("account_id", "an account id must be valid UTF-8") from None
    if any(unicodedata.category(c) == "Cc" for c in raw):
        raise BadParameter("account_id", "an account id has no control characters")
    return raw


def bearer_problem(authorization: str | None, token: bytes | None, open_: bool) -> str | None:
    """Why a request may not use /api (None: it may). ``token`` is the configured one; a
    configured token is always required, an unset one opens /api only when ``open_``."""
    if token is None:
        if open_:
            return None
        return ("/api is disabled: the web server is not bound to loopback and no "
                "CHURNSIGNAL_API_TOKEN (or CHURNSIGNAL_API_TOKEN_FILE) is set")
    scheme, _, presented = (authorization or "").strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return "missing bearer token (Authorization: Bearer TOKEN)"
    # Constant time; "replace" cannot make a wrong token match (a token holds no "?").
    if not hmac.compare_digest(presented.encode("utf-8", "replace"), token):
        return "invalid bearer token"
    return None


View = Callable[..., Awaitable[Any]]


def register_views(rt: Runtime) -> None:
    app = rt.app
    settings = rt.settings
    token = (settings.api_token.get_secret_value().encode()
             if settings.api_token is not None else None)  # never logged
    api_open = settings.api_open
    if token is not None:
        log.info("/api/* requires a bearer token (CHURNSIGNAL_API_TOKEN)")
    elif not api_open:
        log.warning("/api/* refuses every request (401): the web server listens on %s, not "
                    "loopback, and no CHURNSIGNAL_API_TOKEN or CHURNSIGNAL_API_TOKEN_FILE is set; "
                    "/healthz, /readyz and /metrics stay open", settings.web_host)

    def api(handler: View) -> View:
        """Bearer token first, then the handler; a BadParameter becomes a 400."""

        @functools.wraps(handler)
        async def guarded(self: Any, request: Any, **kwargs: Any) -> Any:
            problem = bearer_problem(request.headers.get("Authorization"), token, api_open)
            if problem is not None:
                challenge = 'Bearer realm="churnsignal"'
                if problem == "invalid bearer token":
                    challenge += ', error="invalid_token"'
                return self.json({"error": problem}, status=401,
                                 headers={"WWW-Authenticate": challenge})
            try:
                return await handler(self, request, **kwargs)
            except (BadParameter, BadRequest) as exc:
                return self.json({"error": str(exc), "parameter": exc.parameter}, status=400)

        return guarded

    @app.page("/metrics")
    async def metrics(self: Any, request: Any) -> Any:
        # aiohttp wants the charset apart from the content type.
        return self.bytes(generate_latest(rt.metrics.registry),
                          content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def healthz(self: Any, request: Any) -> Any:
        liveness = getattr(rt, "liveness", None)
        if liveness is None:  # not wired: the process answers, that is all we know
            return self.json({"status": "ok"})
        now = time.monotonic()
        ok, reason = liveness.check(now, settings.health.stall_s)
        if not ok:
            log.warning("/healthz fails: %s", reason)
        return self.json({"status": "ok" if ok else "stalled", "reason": reason,
                          **liveness.snapshot(now)}, status=200 if ok else 503)

    warned = {"lag": -math.inf}

    @app.timer(HEARTBEAT_S)
    async def loop_heartbeat() -> None:
        # The event loop's heartbeat for /healthz (see churnsignal.app.health).
        liveness = getattr(rt, "liveness", None)
        if liveness is None:
            return
        now = time.monotonic()
        lag = liveness.beat(now)
        if lag >= LAG_WARN_S and now - warned["lag"] >= 60:
            warned["lag"] = now
            log.warning("event loop was blocked for %.1fs (heartbeat late)", lag)

    @app.page("/readyz")
    async def readyz(self: Any, request: Any) -> Any:
        checks = {
            "states_loaded": not app.rebalancing and bool(rt.store.loads.assigned)
            and rt.store.loads.all_loaded(),
            "ingest_assigned": rt.ingestor.assigned,
            "sink_writable": rt.sink.writable,
        }
        ready = all(checks.values())
        return self.json({"ready": ready, **checks}, status=200 if ready else 503)

    @app.page("/api/accounts/{account_id}")
    @api
    async def account(self: Any, request: Any, account_id: str) -> Any:
        """One account's current risk as this worker holds it, explained."""
        from churnsignal.stream import packs
        from churnsignal.stream.scoring import score

        # Every parameter before any lookup. ?at=UNIX_SECONDS scores the state as of then
        # (the backtest compares with it).
        params = check_params(request.query.items(), {"at"})
        at = parse_at(params.get("at"), time.time())
        account_id = check_account_id(account_id)
        state = rt.store.peek(account_id)
        if state is None:
            return self.json({"error": "unknown account", "account_id": account_id},
                             status=404)
        partition = packs.partition_for(account_id, settings.partitions)
        owned = any(tp.partition == partition and tp.topic == settings.ingested_topic
                    for tp in app.consumer.assignment())
        scored = score(state, at, rt.policy)
        return self.json({
            "account_id": account_id, "owned_here": owned, "events": state.seq,
            "score": state.score, "band": state.band, "scored_at": state.scored_at,
            "score_at": scored.score, "at": at,
            "reasons_at": [r.as_dict() for r in scored.reasons],
            "last_event": state.last_event, "last_active": state.last_active,
            "sub_status": state.sub_status, "plan": state.plan, "mrr_cents": state.mrr_cents,
            "attributes": state.attributes or None,
            "alerts": state.alerts, "ack_band": state.ack_band or None,
            "ack_until": state.ack_until or None,
        })

    async def act(view: Any, request: Any, account_id: str, action: str) -> Any:
        """Ack or snooze: an ACK item to the account's partition of the ingested topic,
        folded by the worker that owns it (churnsignal.notify.ack); 202 once Kafka has it."""
        from churnsignal.notify.ack import iso, parse_until, request_body
        from churnsignal.stream import packs

        allowed = {"alert_id", "by", "note"} | ({"until"} if action == "snooze" else set())
        params = check_params(request.query.items(), allowed)
        account_id = check_account_id(account_id)
        now = time.time()
        until = parse_until(params.get("until"), now) if action == "snooze" else None
        body = request_body(account_id, action, now, until=until,
                            alert_id=params.get("alert_id"), by=params.get("by"),
                            note=params.get("note"))
        if not body["alert_id"] and rt.checkpoint is not None:
            # decided here and published, its row not written yet (flushed with the interval)
            body["alert_id"] = rt.checkpoint.latest_alert(account_id) or ""
        if not body["alert_id"]:  # the account's latest alert, when ClickHouse has it
            try:
                found = await rt.sink.aquery(
                    "SELECT alert_id FROM alerts_data WHERE account_id = {a:String} "
                    "ORDER BY emitted_at DESC LIMIT 1", {"a": account_id})
                body["alert_id"] = str(found.result_rows[0][0]) if found.result_rows else ""
            except Exception as exc:  # recorded without it
                log.info("%s of %s: latest alert unknown (%s)", action, account_id,
                         type(exc).__name__)
        partition = packs.partition_for(account_id, settings.partitions)
        value = packs.encode(now, [packs.control_item(packs.ACK, body)])
        try:
            await app.producer.send_and_wait(settings.ingested_topic, None, value, partition,
                                             None, None)
        except Exception as exc:
            log.warning("%s of %s not sent (%s)", action, account_id, type(exc).__name__)
            return view.json({"error": f"Kafka unavailable ({type(exc).__name__})"},
                             status=503)
        log.info("%s of account %s requested", action, account_id,
                 extra={"account_id": account_id, "action_id": body["action_id"]})
        return view.json({
            "account_id": account_id, "action": action, "action_id": body["action_id"],
            "alert_id": body["alert_id"] or None,
            "until": iso(until) if until is not None else None, "partition": partition,
            "status": "accepted: the worker owning the account applies it in order with its "
                      "events"}, status=202)

    class AckView(FaustView):
        @api
        async def post(self: Any, request: Any, account_id: str) -> Any:
            """POST /api/accounts/ID/ack: no more escalations up to the account's current
            band until it rises above it or falls to low."""
            return await act(self, request, account_id, "ack")

    class SnoozeView(FaustView):
        @api
        async def post(self: Any, request: Any, account_id: str) -> Any:
            """POST /api/accounts/ID/snooze?until=ISO: as ack, until then."""
            return await act(self, request, account_id, "snooze")

    app.page("/api/accounts/{account_id}/ack")(AckView)
    app.page("/api/accounts/{account_id}/snooze")(SnoozeView)

    @app.page("/api/summary")
    @api
    async def summary(self: Any, request: Any) -> Any:
        check_params(request.query.items(), ())
        # With the embedded engine only this process may open the store, so reads come here.
        counts = {}
        try:
            for table in TABLES:
                view = table.removesuffix("_data")  # from our own constant list, not from input
                result = await rt.sink.aquery(f"SELECT count() FROM {view}")  # noqa: S608
                counts[table.removesuffix("_data")] = int(result.result_rows[0][0])
            events = await rt.sink.aquery("SELECT sum(events) FROM account_daily")
            by_reason = await rt.sink.aquery(
                "SELECT reasons[1] AS reason, count() FROM alerts GROUP BY reason ORDER BY 2 DESC")
        except Exception as exc:  # an outage is an answer, not a traceback
            log.warning("/api/summary: ClickHouse query failed (%s)", type(exc).__name__)
            return self.json({"error": f"ClickHouse unavailable ({type(exc).__name__})"},
                             status=503)
        sizes = rt.store.account_sizes()
        stats = dict(rt.stats)
        stats["accounts"] = len(sizes)
        stats["state_bytes_per_account"] = sum(sizes) / len(sizes) if sizes else 0
        return self.json({
            "rows": counts,
            "events_in_clickhouse": int(events.result_rows[0][0] or 0),
            "alerts_by_reason": {r: int(n) for r, n in by_reason.result_rows},
            "stats": stats,
        })
