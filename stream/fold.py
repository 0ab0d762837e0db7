"""Folding packs into states: packs in, state changes, rows, alerts and failures out (pure).

The agent hands ``fold_step`` the packs of one partition it took together; the result says
what to write (rows per table, the days whose daily totals changed), what to publish
(alerts), what to send on (identity forwards), and which records could not be folded. No
Kafka, no ClickHouse: unit-tested in milliseconds.

A record that cannot be folded (an exception anywhere in its account's fold, score or rows)
is isolated: the account's batch is undone (``StateStore.snapshot``/``restore``), folded
again one record at a time, and only the records that fail alone are returned as failures,
with the account's state exactly as if they had never been seen.

A FORGET item (``churnsignal forget``) splits the pack: what came before it is folded, then
forgotten, and what comes after starts afresh (``_forget``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from churnsignal.schemas.identity import fallback_account, is_identity
from churnsignal.stream import packs
from churnsignal.stream.alerts import acknowledge
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.engine import Item, Outcome, apply_batch, rescore
from churnsignal.stream.identity import DEFAULT_GRACE_S, Resolution, resolve, sweep
from churnsignal.stream.policy import Policy
from churnsignal.stream.rows import (
    action_row,
    alert_row,
    fact_rows,
    history_row,
    score_row,
    snapshot_of,
)
from churnsignal.stream.scoring import score
from churnsignal.stream.state import event_ts, id_hash
from churnsignal.stream.store import StateStore

SCORES = "account_scores_data"
ALERTS = "alerts_data"
BILLING = "billing_events_data"
SUPPORT = "support_events_data"
DAILY = "account_daily_data"
ACTIONS = "alert_actions_data"


def account_column(table: str) -> int:
    """Where a pending row of ``table`` names its account: alerts are keyed by alert_id
    first, every other table by the account."""
    return 1 if table == ALERTS else 0


@dataclass(frozen=True, slots=True)
class IdentityLimits:
    """How long and how many events may wait for their account (see stream.identity)."""

    max_parked: int = 1000  # per identity
    grace_s: float = DEFAULT_GRACE_S  # before a Stripe customer becomes its own account
    ttl_s: float = 7 * 86_400.0  # before a waiting event expires (dead-lettered)
    max_identities: int = 20_000  # waiting identities per partition


@dataclass(slots=True)
class PendingAlert:
    alert: Any  # schemas.alerts.Alert
    wall: float  # when its pack was read (ingest-to-alert latency)
    partition: int
    offset: int


@dataclass(slots=True)
class Failure:
    """A record that could not be folded: dead-lettered alone, with where it came from."""

    reason: str  # processing_error | unattributed_history
    detail: str
    source: str | None  # "topic/partition" of the source record
    offset: int
    data: dict[str, Any]  # the canonical event


@dataclass(slots=True)
class Forgotten:
    """What one partition did for one phase of a forget request (``_forget``); the
    checkpoint adds the ClickHouse rows it deleted, audits and confirms it."""

    request: dict[str, Any]  # request_id, kind, subject, phase, requested_at
    partition: int
    account: str | None = None  # whose ClickHouse rows go (the account's home partition)
    states: int = 0  # account states deleted
    identities: int = 0  # identity keys deleted (links and waiting events)
    parked: int = 0  # events that waited under those identities, deleted with them
    scrubbed: int = 0  # account states a forgotten user's traces were removed from
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows deleted
    deleted: bool = False  # ClickHouse rows deleted (once per request and flush attempt)

    def summary(self) -> dict[str, Any]:
        return {**self.request, "partition": self.partition, "account": self.account,
                "states": self.states, "identities": self.identities, "parked": self.parked,
                "scrubbed": self.scrubbed, "rows": self.rows}


@dataclass
class StepResult:
    rows: dict[str, list[Any]] = field(default_factory=lambda: {
        SCORES: [], ALERTS: [], BILLING: [], SUPPORT: []})
    alerts: list[PendingAlert] = field(default_factory=list)
    touched: dict[str, set[int]] = field(default_factory=dict)  # account -> changed days
    identities: list[Resolution] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    late: int = 0
    batches: int = 0  # account batches folded and scored (re-scores of a tick included)
    history: int = 0  # too-old billing/support events written as rows only
    errors: int = 0  # accounts whose re-score raised (nothing to dead-letter: no record)
    waiting_identities: int | None = None  # after a tick's sweep: identities still waiting
    newest: float = 0.0  # newest event time applied
    forgotten: list[Forgotten] = field(default_factory=list)


def steps(batch: list[Any], partition_of: Any, is_tick: Any,
          max_packs: int | None = None) -> list[list[Any]]:
    """Packs grouped for folding: per partition, in order; a tick stays on its own (it
    re-scores at its own time), so it splits the packs around it; a group holds at most
    ``max_packs`` packs (the next ones of its partition start another, after it)."""
    groups: list[list[Any]] = []
    open_group: dict[int, list[Any]] = {}
    for event in batch:
        partition = partition_of(event)
        if is_tick(event):
            open_group.pop(partition, None)
            groups.append([event])
            continue
        group = open_group.get(partition)
        if group is None or (max_packs is not None and len(group) >= max_packs):
            group = open_group[partition] = []
            groups.append(group)
        group.append(event)
    return groups


def _collect(out: Outcome, wall: float, partition: int, offset: int,
             shadow: Policy | None) -> tuple[dict[str, list[Any]], list[PendingAlert]]:
    """The rows and alerts of one account's outcome (built before anything is committed
    to the result, so a failure here undoes the fold too)."""
    rows: dict[str, list[Any]] = {}
    # A score snapshot when what it says changes (the score in whole points, band, reasons,
    # MRR, status, plan, policy, and a shadow policy's score and band), not for every batch:
    # live, most batches move the score by a fraction of a point. Duplicates (a redelivered
    # pack) write it again from the state: if the worker died after storing the state but
    # before the flush, this restores it. A state read back does not know its last row: its
    # next batch writes one, and a re-score tick only where the score or band moved (as
    # before snapshots). ``account_risk`` takes the row of the highest (version, as_of):
    # the last written, even where late events scored it before a tick's row.
    state = out.state
    shadowed = score(state, state.scored_at, shadow) if shadow is not None else None
    said = snapshot_of(out, shadowed)
    last = state.last_row
    if out.duplicates or (said != last and (
            last is not None or out.applied or out.score_changed)):
        state.last_row = said
        rows[SCORES] = [score_row(out, shadowed, shadow.version if shadow is not None else "")]
    if out.facts:
        billing, support = fact_rows(out)
        rows[BILLING], rows[SUPPORT] = billing, support
    alerts = []
    if out.alert is not None:
        alerts.append(PendingAlert(out.alert, wall, partition, offset))
        rows[ALERTS] = [alert_row(out.alert)]
    return rows, alerts


def _commit(store: StateStore, out: Outcome, rows: dict[str, list[Any]],
            alerts: list[PendingAlert], result: StepResult) -> None:
    for table, data in rows.items():
        result.rows[table].extend(data)
    result.alerts.extend(alerts)
    if out.days:
        result.touched.setdefault(out.state.account_id, set()).update(out.days)
    if out.applied or out.score_changed or out.alert is not None:
        store.put(out.state)
    result.batches += 1
    result.applied += out.applied
    result.duplicates += out.duplicates
    result.late += out.late


def _try_fold(store: StateStore, account_id: str, items: list[Item], wall: float,
              policy: Policy, partition: int, offset: int, keep: bool,
              result: StepResult, shadow: Policy | None = None) -> Exception | None:
    """Fold ``items`` as one batch; undo it when it fails (or when ``keep`` is False)."""
    snapshot = store.snapshot(account_id)
    try:
        out = apply_batch(store.get(account_id), account_id, items, wall, policy)
        rows, alerts = _collect(out, wall, partition, offset, shadow)
    except Exception as exc:
        store.restore(account_id, snapshot)
        return exc
    if keep:
        _commit(store, out, rows, alerts, result)
    else:
        store.restore(account_id, snapshot)
    return None


def _fold_account(store: StateStore, account_id: str, items: list[Item], wall: float,
                  policy: Policy, partition: int, offset: int, result: StepResult,
                  shadow: Policy | None = None) -> None:
    """Fold an account's items as one batch. When that fails, find the records that make
    it fail (the shortest failing prefix, by bisection, one record at a time), leave them
    out, and fold the others as one batch again: the state then is exactly what the batch
    without them gives (a batch folds differently from its records one by one)."""
    good = list(items)
    while good:
        if _try_fold(store, account_id, good, wall, policy, partition, offset, True,
                     result, shadow) is None:
            return
        low, high = 1, len(good)  # the shortest prefix that fails is good[:high]
        error: Exception | None = None
        while low < high:
            middle = (low + high) // 2
            failed = _try_fold(store, account_id, good[:middle], wall, policy, partition,
                               offset, False, result, shadow)
            if failed is None:
                low = middle + 1
            else:
                high, error = middle, failed
        if error is None:
            error = _try_fold(store, account_id, good[:high], wall, policy, partition,
                              offset, False, result, shadow)
        source, item_offset, event = good.pop(high - 1)
        result.failures.append(Failure(
            "processing_error", f"{type(error).__name__}: {error}", source, item_offset,
            _as_dict(event)))


def _as_dict(event: Any) -> dict[str, Any]:
    if isinstance(event, dict):
        return event
    dump = getattr(event, "model_dump", None)
    if dump is not None:
        return dump(mode="json", exclude_none=True)  # type: ignore[no-any-return]
    return {"event_id": getattr(event, "event_id", None),
            "account_id": getattr(event, "account_id", None),
            "type": getattr(event, "type", None)}


def _history(store: StateStore, source: str | None, offset: int, data: dict[str, Any],
             result: StepResult) -> None:
    """A billing or support event older than the horizon: its row, never the state."""
    account = data["account_id"]
    if is_identity(account):
        identity = store.peek_identity(account)
        link = identity.link if identity is not None else None
        if link is None or is_identity(link):
            link = fallback_account(account)
        if link is None:
            result.failures.append(Failure(
                "unattributed_history", f"{account} is not linked to an account yet; an event "
                "older than the horizon does not wait for one", source, offset, data))
            return
        account = link
    try:
        table, row = history_row(account, packs.event_of(data))
    except Exception as exc:
        result.failures.append(Failure("processing_error", f"{type(exc).__name__}: {exc}",
                                       source, offset, data))
        return
    result.rows[table].append(row)
    result.history += 1


def _sweep(store: StateStore, partition: int, wall: float, identity: IdentityLimits,
           result: StepResult) -> list[str]:
    """A tick's identity sweep; returns the partition's keys."""
    keys = store.keys_in(partition)
    # Identities that may still wait (joined ones, most of them, are not even decoded):
    # the grace, the time-to-live and the count bound.
    waiting = [store.identity(k) for k in keys if is_identity(k) and store.may_wait(k)]
    swept = sweep(waiting, wall, identity.grace_s, identity.ttl_s, identity.max_identities)
    for res in swept.resolutions:
        store.put_identity(store.identity(res.key))  # a tombstoned one is blank: a deletion
    result.identities.extend(swept.resolutions)
    result.waiting_identities = swept.waiting
    return keys


def _rescore(store: StateStore, accounts: list[str], partition: int, wall: float,
             policy: Policy, result: StepResult, shadow: Policy | None) -> None:
    for account_id in accounts:
        snapshot = store.snapshot(account_id)
        state = store.get(account_id)
        if state is None:
            continue
        try:
            out = rescore(state, wall, policy)
            rows, alerts = _collect(out, wall, partition, -1, shadow)
        except Exception:
            store.restore(account_id, snapshot)
            result.errors += 1
            continue
        _commit(store, out, rows, alerts, result)


def tick_steps(store: StateStore, pack: dict[str, Any], partition: int, policy: Policy,
               clock: PartitionClock, identity: IdentityLimits = IdentityLimits(),
               shadow: Policy | None = None, size: int = 1000) -> Iterator[StepResult]:
    """A re-score tick in slices of ``size`` accounts, a result per slice (the first also
    carries the identity sweep): the agent lets other work run between slices, so a
    partition of many accounts does not hold the worker for the whole re-scoring."""
    wall = float(pack["now"])
    result = StepResult()
    keys = _sweep(store, partition, wall, identity, result)
    if clock.catching_up(wall):  # re-scoring at the wall clock now would be premature
        yield result
        return
    accounts = [k for k in keys if not is_identity(k)]
    for start in range(0, len(accounts), size):
        _rescore(store, accounts[start:start + size], partition, wall, policy, result, shadow)
        yield result
        result = StepResult()
    if not accounts:
        yield result


def fold_step(store: StateStore, pack: dict[str, Any], partition: int, offset: int,
              policy: Policy, clock: PartitionClock,
              identity: IdentityLimits = IdentityLimits(),
              shadow: Policy | None = None) -> StepResult:
    """Fold one (merged) pack, or a re-score tick, into the states of ``store``.

    ``offset`` is the pack's own offset on the ingested topic (alerts name it); ``shadow``,
    a policy whose scores are written beside the live ones and never alert (fold with
    ``policy.tracking(shadow)``, so the states count what it reads)."""
    wall = float(pack["now"])
    result = StepResult()
    if pack.get("tick"):  # whole: the agent goes through tick_steps
        for part in tick_steps(store, pack, partition, policy, clock, identity, shadow):
            _merge(result, part)
        return result
    segment: list[Any] = []
    folded = False
    for item in pack["items"]:
        if not packs.is_control(item):
            segment.append(item)
            continue
        if segment:  # what came before the request is folded, then forgotten with it
            _fold_items(store, segment, wall, partition, offset, policy, clock, identity,
                        result, shadow)
            segment, folded = [], True
        if item[3] == packs.FORGET:
            _forget(store, item[2], partition, result)
        elif item[3] == packs.ACK:
            _acknowledge(store, item[2], result)
    if segment or not folded:
        _fold_items(store, segment, wall, partition, offset, policy, clock, identity, result,
                    shadow)
    return result


def _merge(into: StepResult, part: StepResult) -> None:
    for table, rows in part.rows.items():
        into.rows.setdefault(table, []).extend(rows)
    into.alerts.extend(part.alerts)
    for account, days in part.touched.items():
        into.touched.setdefault(account, set()).update(days)
    into.identities.extend(part.identities)
    into.errors += part.errors
    into.batches += part.batches
    if part.waiting_identities is not None:
        into.waiting_identities = part.waiting_identities


def _fold_items(store: StateStore, items: list[Any], wall: float, partition: int,
                offset: int, policy: Policy, clock: PartitionClock, identity: IdentityLimits,
                result: StepResult, shadow: Policy | None) -> None:
    grouped: dict[str, list[Item]] = defaultdict(list)
    identities: dict[str, list[Any]] = defaultdict(list)
    newest: dict[str, float] = {}
    for item in items:
        source, item_offset, data = item[0], item[1], item[2]
        if len(item) > 3 and item[3] == packs.HISTORY:
            _history(store, source, item_offset, data, result)
            continue
        if is_identity(data["account_id"]):  # not an account yet: its identity decides
            identities[data["account_id"]].append((source, item_offset, data))
            continue
        try:
            event = packs.event_of(data)
        except Exception as exc:
            result.failures.append(Failure("processing_error", f"{type(exc).__name__}: {exc}",
                                           source, item_offset, data))
            continue
        grouped[event.account_id].append((source, item_offset, event))
        ts = event_ts(event)
        if ts > newest.get(source or "", 0.0):
            newest[source or ""] = ts
    clock.on_pack(wall, newest)
    for account_id, batch in grouped.items():
        _fold_account(store, account_id, batch, wall, policy, partition, offset, result,
                      shadow)
    for key, waiting in identities.items():
        snapshot = store.snapshot(key)
        state = store.identity(key)
        try:
            resolution = resolve(state, waiting, identity.max_parked, wall)
        except Exception as exc:
            store.restore(key, snapshot)
            for source, item_offset, data in waiting:
                result.failures.append(Failure(
                    "processing_error", f"{type(exc).__name__}: {exc}", source, item_offset,
                    data))
            continue
        if resolution.changed:
            store.put_identity(state)
        result.identities.append(resolution)
    result.newest = max(result.newest, *newest.values(), 0.0)


def _forget(store: StateStore, request: dict[str, Any], partition: int,
            result: StepResult) -> None:
    """Carry out one phase of a forget request in this partition (``churnsignal forget``).

    Phase ``identities`` (every partition): delete the identity keys named (a user's) and
    those linking to a forgotten target (an account, or a user's keys), with the events
    waiting under them. Phase ``states``, sent only once every partition confirmed the
    first, so no forward of an old link is still on its way: an account's state (in its
    home partition), or a user's traces in every account state (its forwarding high-waters,
    so the user's new identity may restart its sequence at 0, and its hash among each day's
    distinct users; the day's count is an aggregate and stays)."""
    done = Forgotten(request, partition)
    phase, kind, subject = request["phase"], request["kind"], str(request["subject"])
    keys = set(request.get("keys", ()))
    if phase == "identities":
        links = set(request.get("links", ()))
        for key in store.keys_in(partition):
            if not is_identity(key):
                continue
            state = store.peek_identity(key)
            if state is None or (key not in keys and state.link not in links):
                continue
            done.identities += 1
            done.parked += len(state.parked)
            store.delete(key)
    elif kind == "account" and partition == request.get("home"):
        done.account = subject
        if store.peek(subject) is not None:
            done.states += 1
        store.delete(subject)
        _drop_pending(result, subject)
    elif kind == "user":
        user = id_hash(subject) & 0xFFFFFFFF  # as state._count_user keeps it
        for key in store.keys_in(partition):
            if is_identity(key):
                continue
            seen = store.peek(key)
            if seen is None or not (keys & seen.hw.keys() or any(
                    user in users for users in seen.day_users.values())):
                continue
            account = store.get(key)
            assert account is not None
            for k in keys:
                account.hw.pop(k, None)
            for users in account.day_users.values():
                if user in users:
                    users.remove(user)
            store.put(account)
            done.scrubbed += 1
    result.forgotten.append(done)


def _acknowledge(store: StateStore, request: dict[str, Any], result: StepResult) -> None:
    """An ack or snooze (``stream.alerts.acknowledge``) of an account this partition holds,
    and its row in ``alert_actions_data`` (with the band it was taken at; "" for an account
    without state, which is left without one)."""
    account = str(request["account_id"])
    band = ""
    if store.peek(account) is not None:
        state = store.get(account)
        assert state is not None
        acknowledge(state, str(request["action"]), float(request.get("until") or 0.0))
        store.put(state)
        band = state.band
    result.rows.setdefault(ACTIONS, []).append(action_row(request, band))


def _drop_pending(result: StepResult, account: str) -> None:
    """Rows and alerts of a forgotten account folded earlier in this step are not written."""
    for table, rows in result.rows.items():
        at = account_column(table)
        rows[:] = [row for row in rows if row[at] != account]
    result.touched.pop(account, None)
    result.alerts = [a for a in result.alerts if a.alert.account_id != account]
