"""Liveness of a worker: is it stuck, or only waiting for Kafka or ClickHouse to come back?

``/healthz`` is what Kubernetes restarts a pod on, so it must fail only when a restart helps:

- the **agent is stuck**: work is waiting (packs taken but not yet folded, a flush that is
  due), Kafka and ClickHouse are reachable, and the agent has not finished a step or a flush
  for ``stall_s``;
- the **event loop is blocked**: the heartbeat (a 1 s timer on the loop, see ``beat``) has not
  run for ``stall_s``;
- a **part of the worker cannot run** (``broken``): e.g. its ingest process exits again each
  time it is started. Nothing is being waited out then, and a healthy-looking worker that
  reads nothing would be a silent outage.

Waiting on an outage is not a stall: while a Kafka or ClickHouse call keeps failing
(``outage(kind, True, now)``) the agent holds its packs unacknowledged and retries, which is
exactly what the outage guarantees need; a restart would only repeat the wait. After the
outage clears, the agent gets a whole ``stall_s`` again to catch up. Work that starts waiting
after an idle spell is measured from when it started waiting, not from the last progress.

Why a heartbeat task and not a watchdog thread: the web server runs on the same event loop, so
while the loop is blocked no probe is answered anyway (Kubernetes counts the timeout as a
failure); what the loop can report is how late its own heartbeat is, once it runs again (a
loop starved by long callbacks answers, late, and shows it). A task needs no locks and no
thread, and this class stays pure: every time is an argument (``time.monotonic()`` in the
worker), so the tests run in milliseconds.
"""

from __future__ import annotations

from typing import Any

HEARTBEAT_S = 1.0  # how often the event-loop heartbeat runs


class Liveness:
    """What the agent reports (``progress``, ``waiting``, ``outage``) and the loop heartbeat
    (``beat``), judged by ``check``. All times are ``time.monotonic()`` seconds."""

    def __init__(self, now: float = 0.0) -> None:
        self.last_progress = now
        self.queued: dict[str, int] = {}  # what -> units of work waiting
        self.waiting_since = now
        self.outages: dict[str, float] = {}  # kind -> failing since
        self.outage_cleared = now  # when the last outage ended
        self.broken: dict[str, str] = {}  # part -> why it cannot run
        self.last_beat: float | None = None  # None until the heartbeat first runs
        self.loop_lag = 0.0  # how late the last heartbeat ran
        self.worst_lag = 0.0

    def progress(self, now: float) -> None:
        """The agent finished a step (a group of packs folded) or a flush."""
        self.last_progress = max(self.last_progress, now)

    @property
    def work_waiting(self) -> int:
        return sum(self.queued.values())

    def waiting(self, n: int, now: float, what: str = "packs") -> None:
        """``n`` units of ``what`` wait for the agent now (e.g. "packs": taken, not yet
        folded; "flush": packs whose flush is due). Each ``what`` is set on its own, so two
        reporters do not overwrite each other; the total is ``work_waiting``."""
        if n > 0 and self.work_waiting <= 0:
            self.waiting_since = now  # the stall clock starts when work starts waiting
        if n > 0:
            self.queued[what] = n
        else:
            self.queued.pop(what, None)

    def outage(self, kind: str, failing: bool, now: float) -> None:
        """A ``kind`` ("kafka", "clickhouse") call failed (True) or succeeded again (False)."""
        if failing:
            self.outages.setdefault(kind, now)
        elif self.outages.pop(kind, None) is not None:
            self.outage_cleared = now

    def failing(self, part: str, reason: str | None) -> None:
        """``part`` cannot run (``reason``), or runs again (None)."""
        if reason is None:
            self.broken.pop(part, None)
        else:
            self.broken[part] = reason

    def beat(self, now: float, interval: float = HEARTBEAT_S) -> float:
        """The event loop ran its heartbeat; returns how late it ran (seconds)."""
        lag = 0.0 if self.last_beat is None else max(0.0, now - self.last_beat - interval)
        self.last_beat = now
        self.loop_lag = lag
        self.worst_lag = max(self.worst_lag, lag)
        return lag

    def stalled_for(self, now: float) -> float:
        """Seconds the agent has had waiting work, no outage, and no progress."""
        if self.work_waiting <= 0 or self.outages:
            return 0.0
        since = max(self.last_progress, self.waiting_since, self.outage_cleared)
        return max(0.0, now - since)

    def check(self, now: float, stall_s: float) -> tuple[bool, str]:
        """``(ok, reason)``: not ok when the loop or the agent is stuck for ``stall_s``."""
        if self.last_beat is not None and now - self.last_beat > stall_s:
            return False, (f"event loop blocked: no heartbeat for {now - self.last_beat:.0f}s "
                           f"(limit {stall_s:g}s)")
        if self.broken:
            return False, "; ".join(f"{part}: {why}" for part, why in sorted(self.broken.items()))
        if self.outages:
            kinds = ", ".join(f"{kind} for {now - since:.0f}s"
                              for kind, since in sorted(self.outages.items()))
            return True, f"waiting on an outage ({kinds}), not a stall"
        stalled = self.stalled_for(now)
        if stalled > stall_s:
            return False, (f"agent stuck: {self.work_waiting} waiting, no progress for "
                           f"{stalled:.0f}s while Kafka and ClickHouse answer "
                           f"(limit {stall_s:g}s)")
        if self.work_waiting:
            return True, "working"
        return True, "idle"

    def snapshot(self, now: float) -> dict[str, Any]:
        """The figures behind ``check``, for the /healthz body."""
        return {
            "work_waiting": self.work_waiting,
            "waiting": dict(sorted(self.queued.items())),
            "since_progress_s": round(now - self.last_progress, 3),
            "stalled_s": round(self.stalled_for(now), 3),
            "outages": {kind: round(now - since, 3) for kind, since in sorted(self.outages.items())},
            "broken": dict(sorted(self.broken.items())),
            "loop_lag_s": round(self.loop_lag, 3),
            "loop_lag_worst_s": round(self.worst_lag, 3),
            "since_heartbeat_s": None if self.last_beat is None else round(now - self.last_beat, 3),
        }
