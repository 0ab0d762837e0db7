"""`churnsignal forget` on the embedded defaults (no ``KAFKA_BOOTSTRAP_SERVERS``).

Without a configured broker a worker runs its own embedded broker (memory storage, on a free
loopback port no other process knows) and, without ``CHURNSIGNAL_CLICKHOUSE_DSN``, the embedded
ClickHouse (chdb, whose directory one process holds: it locks ``status`` there). So:

- while such a worker runs, nothing outside it can reach its states: the command refuses,
  naming the process that holds the store, and says what to do (stop the worker and run the
  command again, or run the workers on a broker and set ``KAFKA_BOOTSTRAP_SERVERS``);
- once it stopped, its states and identity links are gone already: they lived in the embedded
  broker's memory, and a worker on the embedded broker starts with no state at every run.
  What is left is ClickHouse: the command deletes the account's rows itself (every table with
  an ``account_id``, as a worker does), audits the deletion in ``deletions`` (phase
  ``clickhouse``: one row, with the rows deleted per table, also when there was nothing) and
  logs it. No table holds anything per user, so forgetting a user writes the audit row only.
  There is no worker to count it in ``churnsignal_forgotten_total``: the audit is the count.

A ClickHouse server (``CHURNSIGNAL_CLICKHOUSE_DSN``) with no broker configured: a worker on its
embedded broker could be running, and would write the account's rows again from the state it
holds; the command cannot tell whether one runs, so it refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from churnsignal.app.forget import ForgetError, ForgetReport, Kind
from churnsignal.app.settings import Settings
from churnsignal.schemas import identity

log = logging.getLogger("churnsignal.forget")
PHASE = "clickhouse"


def store_holder(path: Path) -> str | None:
    """The process holding the embedded ClickHouse at ``path`` (``PID: n`` from its ``status``
    file, or "another process"), or None when the store is free (or does not exist yet)."""
    status = path / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = status.read_text(errors="replace")
            pid = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                        if line.startswith("PID:")), "")
            return f"PID {pid}" if pid else "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


async def forget_embedded(settings: Settings, kind: Kind, subject: str) -> ForgetReport:
    """Forget on the embedded defaults, with no worker running (module docstring)."""
    from churnsignal.sinks.clickhouse import ClickHouseSink

    if kind == "account" and (identity.is_identity(subject) or not subject):
        raise ForgetError(f"not an account id: {subject!r}")
    dsn = settings.effective_clickhouse_dsn()
    if not dsn.startswith("chdb://"):
        raise ForgetError(
            "no KAFKA_BOOTSTRAP_SERVERS: set it to the broker the workers use. With a "
            "ClickHouse server and the embedded broker, a running worker cannot be reached "
            "nor told apart from none (stop it, or run the workers on a broker)")
    path = Path(dsn.removeprefix("chdb://"))
    holder = store_holder(path)
    if holder is not None:
        raise ForgetError(
            f"the embedded ClickHouse at {path} is held by {holder} (a worker on the embedded "
            "defaults, whose states and links nothing outside it can reach): stop it and run "
            "`churnsignal forget` again (its states and links go with its embedded broker; "
            "the rows are then deleted here), or run the workers on a broker and set "
            "KAFKA_BOOTSTRAP_SERVERS")
    requested = time.time()
    report = ForgetReport(uuid.uuid4().hex, kind, subject, embedded=True)
    sink = ClickHouseSink(dsn, views=settings.views)
    try:
        if kind == "account":
            report.rows = {t: n for t, n in (await sink.delete_account(subject)).items() if n}
        at = datetime.fromtimestamp(time.time(), tz=UTC)
        audit = [(report.request_id, PHASE, 0, kind, subject,
                  datetime.fromtimestamp(requested, tz=UTC), at, 0, 0, 0, 0, report.rows,
                  sum(report.rows.values()))]
        refused = await sink.write({"deletions_data": audit})
        if refused:
            raise ForgetError(f"deletions_data refused the audit: {refused[0].error}")
    finally:
        with contextlib.suppress(Exception):
            sink.close()
    report.confirmations = 1
    log.info("forgotten", extra={"forget": report.as_dict()})
    return report


def report_lines(report: ForgetReport) -> list[str]:
    rows = ", ".join(f"{t} {n}" for t, n in sorted(report.rows.items())) or "none"
    out = [f"forgot {report.kind} {report.subject} (request {report.request_id}, "
           "embedded defaults: no worker running)",
           "  states and links   none kept: they lived in the embedded broker's memory, gone "
           "when its worker stopped"]
    if report.kind == "account":
        out.append(f"  ClickHouse rows    {sum(report.rows.values())} deleted ({rows})")
    else:
        out.append("  ClickHouse rows    none are per user (per-day user counts are "
                   "aggregates and stay)")
    out.append(f"  audited            in the deletions table, request_id {report.request_id}")
    return out
