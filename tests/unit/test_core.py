"""State, score and alerts through the same engine the worker runs, with hand-checked numbers."""

from __future__ import annotations

import sys
from array import array
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.stream.engine import apply_batch, rescore
from churnsignal.stream.policy import Policy
from churnsignal.stream.state import DAY, AccountState, in_ring

POLICY = Policy()
NOW = 1_764_000_000.0


def usage(n: int, ts: float, user: str = "u1", feature: str | None = "api") -> object:
    return EVENT_ADAPTER.validate_python({
        "event_id": f"e{n}", "account_id": "acme", "type": "feature_used", "user_id": user,
        "occurred_at": datetime.fromtimestamp(ts, tz=UTC).isoformat(),
        "data": {"feature": feature}})


def history(per_day_by_age: dict[int, int]) -> list[tuple[str, int, object]]:
    items = []
    n = 0
    for age in sorted(per_day_by_age, reverse=True):
        for i in range(per_day_by_age[age]):
            n += 1
            items.append(("usage/0", n, usage(n, NOW - age * DAY + i * 60, feature=f"f{i % 4}")))
    return items


def test_usage_decline_scores_by_the_policy_formula_and_alerts_once() -> None:
    # baseline: 10/day for days 34..8 ago (27 active days of the 28-day window) ; recent: 1/day
    per_day = {age: 10 for age in range(8, 35)}
    per_day.update({age: 1 for age in range(0, 7)})
    out = apply_batch(None, "acme", history(per_day), NOW, POLICY)
    recent = 7 / 7
    baseline = 270 / 28
    decline = 1 - recent / baseline
    expected = 55 * min(1.0, (decline - 0.3) / 0.6)
    reason = out.scored.reasons[0]
    assert reason.code == "usage_decline"
    assert abs(reason.contribution - round(expected, 1)) < 0.06
    assert out.alert is not None and out.alert.band == "high"
    assert out.alert.reasons[0].play == "csm_check_in"
    # the same batch again changes nothing: redelivered offsets are skipped
    again = apply_batch(out.state, "acme", history(per_day), NOW, POLICY)
    assert (again.applied, again.duplicates, again.alert) == (0, len(history(per_day)), None)


def test_silence_raises_risk_on_the_timer_alone() -> None:
    per_day = {age: 5 for age in range(0, 40)}
    out = apply_batch(None, "acme", history(per_day), NOW, POLICY)
    assert out.alert is None and out.state.band == "low"
    later = rescore(out.state, NOW + 15 * DAY, POLICY)
    codes = [r.code for r in later.scored.reasons]
    assert "inactivity" in codes and later.alert is not None
    assert later.alert.band == "critical" and later.alert.trigger_event_id is None


def test_back_fill_does_not_alert_until_live() -> None:
    per_day = {age: 10 for age in range(20, 50)}  # history that ended 20 days ago
    out = apply_batch(None, "acme", history(per_day), NOW, POLICY)
    assert out.alert is None  # scored at its own newest event time: not inactive then
    assert rescore(out.state, NOW, POLICY).alert is not None


def test_hysteresis_holds_the_band_just_below_the_threshold() -> None:
    from churnsignal.stream.alerts import held_band
    from churnsignal.stream.reasons import Score

    assert held_band("high", Score(47.0, "medium", ()), POLICY) == "high"  # 50 - 5 < 47
    assert held_band("high", Score(44.0, "medium", ()), POLICY) == "medium"
    assert held_band("medium", Score(80.0, "critical", ()), POLICY) == "critical"


def test_same_event_id_from_another_offset_is_a_duplicate() -> None:
    e = usage(1, NOW - 60)
    out = apply_batch(None, "acme", [("usage/0", 1, e), ("usage/1", 9, e)], NOW, POLICY)
    assert (out.applied, out.duplicates) == (1, 1)


def test_state_stays_small_with_a_full_horizon_of_activity() -> None:
    per_day = {age: 40 for age in range(0, 120)}
    items = []
    n = 0
    for age in sorted(per_day, reverse=True):
        for i in range(per_day[age]):
            n += 1
            items.append(("usage/0", n, usage(n, NOW - age * DAY + i * 60, user=f"u{i % 12}",
                                              feature=f"f{i % 10}")))
    out = apply_batch(None, "acme", items, NOW, POLICY)
    raw = out.state.to_bytes()
    assert len(raw) < 4096, len(raw)
    assert len(out.state.days) <= POLICY.windows.horizon_days + 1
    assert AccountState.from_bytes(raw) == out.state


def payment(n: int, kind: str, ts: float, retry: bool) -> object:
    data = {"attempt_count": n}
    if retry:
        data["next_attempt_at"] = datetime.fromtimestamp(ts + 3 * DAY, tz=UTC).isoformat()
    return EVENT_ADAPTER.validate_python({
        "event_id": f"p{n}{kind}", "account_id": "acme", "type": kind,
        "occurred_at": datetime.fromtimestamp(ts, tz=UTC).isoformat(), "data": data})


def test_payment_events_out_of_order_keep_the_newest_retry_state() -> None:
    first = payment(1, "payment_failed", NOW - 300, retry=True)
    final = payment(4, "payment_failed", NOW - 200, retry=False)
    out = apply_batch(None, "acme", [("b/1", 1, final), ("b/0", 1, first)], NOW, POLICY)
    assert out.scored.reasons[0].code == "payment_failed_final"
    assert out.alert is not None and out.alert.reasons[0].kind == "involuntary"
    paid = payment(5, "invoice_paid", NOW - 100, retry=False)
    later = apply_batch(out.state, "acme", [("b/2", 1, paid)], NOW, POLICY)
    assert later.alert is not None and later.alert.kind == "deescalated"
    assert later.state.band == "low"


def test_out_of_order_events_are_applied_to_their_day_and_counted_late() -> None:
    # no source offsets: a producer sent them out of order, nothing was redelivered
    items = [(None, 0, event) for _, _, event in history({age: 2 for age in range(0, 10)})]
    in_order = apply_batch(None, "acme", items, NOW, POLICY)
    shuffled = apply_batch(None, "acme", list(reversed(items)), NOW, POLICY)
    assert in_order.late == 0
    assert shuffled.late == len(items) - 1  # each is older than the newest before it
    # at the same time as the newest before it: not late, and the newer trigger
    twin = usage(999, items[-1][2].occurred_at.timestamp())
    same = apply_batch(None, "acme", [*items, (None, 0, twin)], NOW, POLICY)
    assert same.late == 0 and same.newest is twin
    assert shuffled.state.days == in_order.state.days  # same windows either way
    # days stay in day order (the windows read the newest, prune drops the oldest first)
    assert list(shuffled.state.days) == sorted(shuffled.state.days)
    # States written by the previous version (1: a row per day, trailing zeros cut, in any
    # order) still load, in day order, equal to what they held.
    data = orjson.loads(AccountState.json_of(shuffled.state.to_bytes()))
    del data["cols"]

    def cut(bucket: list[int]) -> list[int]:  # format 1 left out each bucket's zero tail
        while bucket and not bucket[-1]:
            bucket = bucket[:-1]
        return bucket

    rows = [[d - data["d0"], *cut(b)] for d, b in reversed(shuffled.state.days.items())]
    assert all(len(row) < 1 + len(b) for row, b in zip(rows, shuffled.state.days.values(),
                                                        strict=False))
    data.update(v=1, days=rows)
    restored = AccountState.from_bytes(orjson.dumps(data))
    assert list(restored.days) == sorted(restored.days)
    assert restored == shuffled.state
    assert shuffled.scored.score == in_order.scored.score


def test_endpoint_reads_never_become_the_agents_working_copy() -> None:
    # A read while the table recovers (a rebalance) must not pin a stale state: the agent
    # would fold new events into it and write it back over the recovered one.
    from churnsignal.stream.store import MemoryStateStore as StateStore

    stale = apply_batch(None, "acme", history({3: 2}), NOW, POLICY).state
    fresh = apply_batch(None, "acme", history({3: 2, 2: 2}), NOW, POLICY).state

    store = StateStore(partitions=4)
    store.data[b"acme"] = stale.to_bytes()
    peeked = store.peek("acme")
    assert peeked is not None and peeked.seq == stale.seq
    store.data[b"acme"] = fresh.to_bytes()  # the partition's states are still being read
    got = store.get("acme")
    assert got is not None and got.seq == fresh.seq == stale.seq + 2


def test_a_key_event_declining_is_its_own_reason_while_total_usage_holds() -> None:
    # 4/day for four weeks, then the key event stops while other use doubles: usage_decline
    # sees no drop, key_event_decline sees all of it.
    policy = POLICY.model_copy(update={
        "usage": POLICY.usage.model_validate({"key_events": ["Report Exported"]}),
        "signals": POLICY.signals.model_copy(update={
            "key_event_decline": POLICY.signals.key_event_decline.model_copy(
                update={"weight": 40})})})
    items, n = [], 0
    for age in range(34, 0, -1):
        names = ["report exported", "Dashboard"] * 2 if age > 7 else ["Dashboard"] * 4
        for i, name in enumerate(names):
            n += 1
            event = EVENT_ADAPTER.validate_python({
                "event_id": f"k{n}", "account_id": "acme", "type": "track", "user_id": "u1",
                "occurred_at": datetime.fromtimestamp(NOW - age * DAY + i * 60,
                                                      tz=UTC).isoformat(),
                "data": {"name": name}})
            items.append(("usage/0", n, event))
    state = apply_batch(None, "acme", items, NOW, policy).state
    reasons = {r.code: r for r in rescore(state, NOW, policy).scored.reasons}
    assert "usage_decline" not in reasons
    assert reasons["key_event_decline"].value == 1.0
    assert reasons["key_event_decline"].contribution == 40
    assert state.from_bytes(state.to_bytes()) == state


def test_partition_loads_keep_what_stays_and_reload_after_a_missed_generation() -> None:
    from churnsignal.stream.store import PartitionLoads

    loads = PartitionLoads()
    assert loads.plan({0, 1, 2, 3}, generation=1) == (set(), {0, 1, 2, 3})
    loads.loaded = {0, 1, 2, 3}
    # a second worker joins: 2 and 3 go, 0 and 1 stay loaded
    assert loads.plan({0, 1}, generation=2) == ({2, 3}, set())
    # it leaves: 2 and 3 come back, written by the other worker meanwhile: read again
    assert loads.plan({0, 1, 2, 3}, generation=3) == (set(), {2, 3})
    loads.loaded = {0, 1, 2, 3}
    # a generation this worker never saw: nothing it holds can be trusted
    assert loads.plan({0, 1}, generation=5) == ({0, 1, 2, 3}, {0, 1})
    assert not loads.all_loaded()
    loads.loaded = {0, 1}
    # an outbox left undelivered at a revoke: kept partitions are read back too, once
    loads.reload_all()
    assert loads.plan({0, 1}, generation=6) == ({0, 1}, {0, 1})
    loads.loaded = {0, 1}
    assert loads.plan({0, 1}, generation=7) == (set(), set())


def test_usage_events_read_back_from_packs_fold_like_their_models() -> None:
    # The agent rebuilds usage events from packs without validating them again (the ingest
    # did): the state must come out byte for byte as from the validated models.
    from churnsignal.schemas.usage_lite import UsageLite
    from churnsignal.stream.packs import event_of

    models = [EVENT_ADAPTER.validate_python({
        "event_id": f"e{i}", "account_id": "acme", "type": kind, "user_id": user,
        "occurred_at": f"2026-11-2{i % 3}T1{i % 10}:00:00.25{i % 10}+0{i % 3}:00",
        "data": data}) for i, (kind, user, data) in enumerate([
            ("feature_used", "u1", {"name": "Report Exported", "feature": "reports"}),
            ("session", None, {}),
            ("track", "u2", {"name": "Dashboard Viewed", "count": 4}),
            ("activation", "u1", {"name": "Project Created"}),
            ("seat_activity", "u3", {"feature": "seats"})])]
    billing = EVENT_ADAPTER.validate_python({
        "event_id": "b1", "account_id": "acme", "type": "payment_failed",
        "occurred_at": "2026-11-21T10:00:00Z", "data": {"next_attempt_at": None}})
    dicts = [m.model_dump(mode="json") for m in [*models, billing]]
    packed = [event_of(d) for d in dicts]
    assert all(isinstance(p, UsageLite) for p in packed[:-1])
    assert type(packed[-1]) is type(billing)  # billing and support are validated again
    for model, fast in zip(models, packed[:-1], strict=True):
        assert (fast.event_id, fast.account_id, fast.type, fast.user_id, fast.occurred_at,
                fast.data.name, fast.data.feature, fast.data.count) == (
            model.event_id, model.account_id, model.type, model.user_id, model.occurred_at,
            model.data.name, model.data.feature, model.data.count)
    policy = Policy.model_validate({"usage": {"key_events": ["report exported"]},
                                    "onboarding": {"activation_events": ["project created"]}})
    wall = datetime(2026, 11, 25, tzinfo=UTC).timestamp()
    slow = apply_batch(None, "acme", [("u/0", i, e) for i, e in enumerate([*models, billing])],
                       wall, policy)
    fast = apply_batch(None, "acme", [("u/0", i, e) for i, e in enumerate(packed)], wall, policy)
    assert fast.state.to_bytes() == slow.state.to_bytes()
    assert len(fast.facts) == len(slow.facts) == 1


def test_usage_windows_sum_the_recent_and_baseline_days_only() -> None:
    # Days are read newest first and the scan stops below the baseline: a day ahead of the
    # scoring time (a producer's clock running fast) and one before the baseline count for
    # nothing; users are the most of a recent day.
    from churnsignal.stream.scoring import usage_windows
    from churnsignal.stream.state import KEY, USAGE, USERS

    state = AccountState("acme")
    for day, usage, key, users in [(70, 50, 5, 9), (80, 4, 1, 3), (95, 6, 2, 2), (99, 1, 0, 1),
                                   (100, 2, 1, 5), (103, 70, 7, 8)]:
        bucket = [0] * 7
        bucket[USAGE], bucket[KEY], bucket[USERS] = usage, key, users
        state.days[day] = bucket
    # today 100, recent window 94..100, baseline 72..93
    assert usage_windows(state, 94, 72, 100) == (6 + 1 + 2, 4, 2 + 0 + 1, 1, 5)


def test_state_stays_under_4_kb_at_worst_with_tracked_types_users_tickets_and_failures() -> None:
    """The worst case of the defaults: a model tracking 8 event types, 400 events a day by 25
    users over the whole horizon, a failed payment every 9 days and a ticket every 5. Its
    JSON is ~7 KB; stored LZ4-compressed it stays under 4 KB and reads back equal. A typical
    state stays plain JSON."""
    from churnsignal.stream.policy import Model
    from churnsignal.stream.state import COMPRESS_ABOVE

    names = [f"f{i}" for i in range(10)]
    model = Model(horizon_days=30, event_types=names[:8], features=["events_28d"],
                  transforms=["log1p"], means=[0.0], scales=[1.0], coefficients=[-1.0],
                  intercept=0.0, calibration=(1.0, 0.0))
    policy = Policy(model=model)

    def event(n: int, ts: float, kind: str, data: dict[str, object],
              user: str | None) -> object:
        return EVENT_ADAPTER.validate_python({
            "event_id": f"evt_{n:024d}", "account_id": "acme", "type": kind, "user_id": user,
            "occurred_at": datetime.fromtimestamp(ts, tz=UTC).isoformat(), "data": data})

    items: list[tuple[str, int, object]] = []
    n = 0
    for age in range(120, -1, -1):
        for i in range(400):
            n += 1
            items.append(("usage/0", n, event(n, NOW - age * DAY + i * 60, "feature_used",
                                              {"feature": names[i % 10]}, f"user-{i % 25}")))
        if age % 9 == 0:
            n += 1
            items.append(("billing/0", n, event(n, NOW - age * DAY + 3600, "payment_failed", {
                "invoice_id": f"in_{n}", "amount_cents": 4900, "next_attempt_at": None},
                None)))
        if age % 5 == 0:
            n += 1
            items.append(("support/0", n, event(n, NOW - age * DAY + 7200, "ticket_opened", {
                "ticket_id": f"t{n}", "priority": "high"}, "user-1")))
    out = apply_batch(None, "acme", items, NOW, policy)
    raw = out.state.to_bytes()
    assert len(out.state.types) == 8 and len(out.state.failed_payments) > 5
    assert len(raw) < 4096 and not raw.startswith(b"{"), len(raw)
    assert AccountState.from_bytes(raw) == out.state
    small = apply_batch(None, "acme", history({age: 10 for age in range(0, 20)}), NOW,
                        POLICY).state.to_bytes()
    assert small.startswith(b"{") and len(small) <= COMPRESS_ABOVE
    assert AccountState.from_bytes(small).seq == 200


_KINDS = ("feature_used", "session", "track", "activation", "seat_activity")
_NAMES = (None, "Report Exported", "dashboard viewed", "Project Created", "Export")
_FEATURES = (None, "reports", "Seats", "api", "billing")


_ZONES = (UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(_KINDS),
                          st.sampled_from(_NAMES), st.sampled_from(_FEATURES),
                          st.sampled_from((None, "u1", "u2", "u3")), st.integers(1, 5),
                          st.integers(0, 40 * 24), st.integers(0, 2), st.integers(0, 12),
                          st.sampled_from(_ZONES), st.sampled_from((0, 250_000))),
                min_size=1, max_size=60),
       st.integers(1, 7))
def test_pack_usage_events_fold_like_their_models_through_any_batches(
        events: list[tuple[Any, ...]], batch: int) -> None:
    # The typed path for pack usage events (UsageLite, its time read once) against the
    # validated models: repeated event ids, offsets redelivered or not, times out of order
    # in several zones, payments among them, tracked types, key and activation events and
    # small limits. The same states, byte for byte, and the same outcomes.
    from churnsignal.stream.packs import event_of

    policy = Policy.model_validate({
        "usage": {"key_events": ["report exported", "seats"], "track_types": ["export"]},
        "onboarding": {"activation_events": ["project created"]},
        "limits": {"features": 2, "day_users": 2, "dedup_ids": 9}})
    wall = NOW
    models = []
    for n, kind, name, feature, user, count, hours, source, offset, zone, micros in events:
        at = datetime.fromtimestamp(wall - hours * 3600, tz=zone).replace(microsecond=micros)
        if n % 7 == 3:  # a payment now and then: validated again on both paths
            body = {"event_id": f"e{n}", "account_id": "acme", "type": "payment_failed",
                    "occurred_at": at.isoformat(), "data": {"next_attempt_at": None}}
        else:
            body = {"event_id": f"e{n}", "account_id": "acme", "type": kind, "user_id": user,
                    "occurred_at": at.isoformat(),
                    "data": {k: v for k, v in (("name", name), ("feature", feature),
                                               ("count", count)) if v is not None}}
        models.append((f"u/{source}", offset, EVENT_ADAPTER.validate_python(body)))
    packed = [(s, o, event_of(e.model_dump(mode="json"))) for s, o, e in models]
    slow_state = fast_state = None
    for start in range(0, len(models), batch):
        slow = apply_batch(slow_state, "acme", models[start:start + batch], wall, policy)
        fast = apply_batch(fast_state, "acme", packed[start:start + batch], wall, policy)
        slow_state, fast_state = slow.state, fast.state
        assert fast.state.to_bytes() == slow.state.to_bytes()
        assert (fast.applied, fast.duplicates, fast.late, fast.days) == (
            slow.applied, slow.duplicates, slow.late, slow.days)
        assert (fast.newest and fast.newest.event_id) == (slow.newest and slow.newest.event_id)
        assert len(fast.facts) == len(slow.facts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, (1 << 48) - 1), max_size=70), st.integers(0, (1 << 48) - 1))
def test_the_dedup_ring_finds_exactly_its_words(words: list[int], probe: int) -> None:
    ring = array("Q", words)
    for value in (probe, *words[:3]):
        assert in_ring(ring, value) == (value in words)


def test_the_dedup_ring_ignores_bytes_that_span_two_words() -> None:
    key = 0x1122334455667788
    raw = bytes(4) + key.to_bytes(8, sys.byteorder) + bytes(4)
    ring = array("Q", raw * 8)  # 16 words, the key's bytes across each pair of them
    assert key not in ring
    assert not in_ring(ring, key)
    ring.append(key)
    assert in_ring(ring, key)
