"""HTTP endpoints on the worker's web port: metrics, health, and reads of the owned ClickHouse."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from churnsignal.sinks.ddl import TABLES

if TYPE_CHECKING:
    from churnsignal.stream.agents import Runtime


def register_views(rt: Runtime) -> None:
    app = rt.app

    @app.page("/metrics")
    async def metrics(self: Any, request: Any) -> Any:
        # aiohttp wants the charset apart from the content type.
        return self.bytes(generate_latest(rt.metrics.registry),
                          content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def healthz(self: Any, request: Any) -> Any:
        return self.json({"status": "ok"})

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
    async def account(self: Any, request: Any, account_id: str) -> Any:
        """One account's current risk as this worker holds it, explained."""
        from churnsignal.stream import packs
        from churnsignal.stream.scoring import score

        if account_id.startswith("~") or len(account_id) > 200:
            return self.json({"error": "not an account id"}, status=400)
        state = rt.store.peek(account_id)
        if state is None:
            return self.json({"error": "unknown account", "account_id": account_id},
                             status=404)
        partition = packs.partition_for(account_id, rt.settings.partitions)
        owned = any(tp.partition == partition and tp.topic == rt.settings.ingested_topic
                    for tp in app.consumer.assignment())
        try:  # ?at=UNIX_SECONDS scores the state as of then (the backtest compares with it)
            at = float(request.query.get("at", time.time()))
        except ValueError:
            return self.json({"error": "at must be Unix seconds"}, status=400)
        scored = score(state, at, rt.policy)
        return self.json({
            "account_id": account_id, "owned_here": owned, "events": state.seq,
            "score": state.score, "band": state.band, "scored_at": state.scored_at,
            "score_at": scored.score, "at": at,
            "reasons_at": [r.as_dict() for r in scored.reasons],
            "last_event": state.last_event, "last_active": state.last_active,
            "sub_status": state.sub_status, "plan": state.plan, "mrr_cents": state.mrr_cents,
            "alerts": state.alerts,
        })

    @app.page("/api/summary")
    async def summary(self: Any, request: Any) -> Any:
        # With the embedded engine only this process may open the store, so reads come here.
        counts = {}
        for table in TABLES:
            view = table.removesuffix("_data")  # from our own constant list, not from input
            result = await rt.sink.aquery(f"SELECT count() FROM {view}")  # noqa: S608
            counts[table.removesuffix("_data")] = int(result.result_rows[0][0])
        events = await rt.sink.aquery("SELECT sum(events) FROM account_daily")
        by_reason = await rt.sink.aquery(
            "SELECT reasons[1] AS reason, count() FROM alerts GROUP BY reason ORDER BY 2 DESC")
        sizes = [len(v) for k, v in list(rt.store.data.items())
                 if not k.startswith(b"~")]  # not identities
        stats = dict(rt.stats)
        stats["accounts"] = len(sizes)
        stats["state_bytes_per_account"] = sum(sizes) / len(sizes) if sizes else 0
        return self.json({
            "rows": counts,
            "events_in_clickhouse": int(events.result_rows[0][0] or 0),
            "alerts_by_reason": {r: int(n) for r, n in by_reason.result_rows},
            "stats": stats,
        })
