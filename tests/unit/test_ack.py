"""Acknowledge and snooze, the pure parts: the request's checks (churnsignal.notify.ack),
what an ack does to the alert decisions (stream.alerts), the ACK item through fold_step
and its alert_actions row."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from churnsignal.notify.ack import BadRequest, parse_until, request_body
from churnsignal.schemas.alerts import Alert
from churnsignal.stream import packs
from churnsignal.stream.alerts import acknowledge, decide
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.fold import ACTIONS, fold_step
from churnsignal.stream.policy import Alerting, Policy
from churnsignal.stream.reasons import Reason, Score
from churnsignal.stream.state import AccountState
from churnsignal.stream.store import MemoryStateStore

NOW = 1_760_000_000.0
POLICY = Policy(alerting=Alerting(cooldown_hours=0))
BURDEN = Reason("support_burden", 6, 60, "voluntary", "support_escalation", "6 open tickets")


def scored(points: float) -> Score:
    return Score(points, POLICY.band_of(points), (BURDEN,))


def run(state: AccountState, points: list[float], start: float = NOW) -> list[Alert | None]:
    return [decide(state, scored(p), start + i, None, start + i, POLICY)
            for i, p in enumerate(points)]


def kinds(alerts: list[Alert | None]) -> list[str | None]:
    return [None if a is None else f"{a.kind}:{a.band}" for a in alerts]


def test_without_ack_a_dip_and_return_alerts_again() -> None:
    state = AccountState("acme", plan="enterprise")
    got = run(state, [60, 40, 60])
    assert kinds(got) == ["escalated:high", "deescalated:medium", "escalated:high"]
    assert got[0] is not None and got[0].plan == "enterprise" and got[0].schema_version == 3


def test_ack_quiets_the_same_band_until_the_band_rises() -> None:
    state = AccountState("acme")
    assert kinds(run(state, [60])) == ["escalated:high"]
    acknowledge(state, "ack")
    assert (state.ack_band, state.ack_until) == ("high", 0.0)
    got = run(state, [40, 60, 62, 40, 60], NOW + 10)
    # the dip is told (it resolves incidents); the return to high is not, nor its dip
    assert kinds(got) == ["deescalated:medium", None, None, None, None]
    assert kinds(run(state, [80], NOW + 20)) == ["escalated:critical"]  # above: alerts
    assert state.ack_band == ""  # and the ack is over
    assert kinds(run(state, [60, 80], NOW + 30)) == ["deescalated:high", "escalated:critical"]


def test_ack_ends_when_the_account_recovers_to_low() -> None:
    state = AccountState("acme")
    run(state, [60])
    acknowledge(state, "ack")
    assert kinds(run(state, [10], NOW + 10)) == ["deescalated:low"]
    assert state.ack_band == ""
    assert kinds(run(state, [60], NOW + 20)) == ["escalated:high"]


def test_snooze_quiets_until_it_ends_then_the_account_alerts_if_still_at_risk() -> None:
    state = AccountState("acme")
    run(state, [80])
    acknowledge(state, "snooze", until=NOW + 100)
    assert (state.ack_band, state.ack_until) == ("critical", NOW + 100)
    assert kinds(run(state, [60, 80, 80], NOW + 10)) == ["deescalated:high", None, None]
    # the snooze ended: the next score (an event or the re-score tick) alerts
    assert kinds(run(state, [80], NOW + 100)) == ["escalated:critical"]
    assert (state.ack_band, state.ack_until) == ("", 0.0)


def test_state_keeps_the_ack_through_its_bytes() -> None:
    state = AccountState("acme", band="high")
    acknowledge(state, "snooze", until=NOW + 5)
    again = AccountState.from_bytes(state.to_bytes())
    assert (again.ack_band, again.ack_until) == ("high", NOW + 5)
    assert again.clone().ack_until == NOW + 5
    with pytest.raises(ValueError, match="unknown action"):
        acknowledge(state, "mute")


def test_request_checks() -> None:
    assert parse_until("2025-10-09T09:00:00Z", NOW) == datetime(
        2025, 10, 9, 9, tzinfo=UTC).timestamp()
    assert parse_until("2025-10-09T11:00:00+02:00", NOW) == parse_until(
        "2025-10-09T09:00:00Z", NOW)
    for bad, why in [(None, "needs until"), ("tomorrow", "not an ISO 8601"),
                     ("2025-10-09T09:00:00", "time zone"), ("2020-01-01T00:00:00Z", "future"),
                     ("2030-01-01T00:00:00Z", "within a year")]:
        with pytest.raises(BadRequest, match=why) as caught:
            parse_until(bad, NOW)
        assert caught.value.parameter == "until"
    body = request_body("acme", "snooze", NOW, until=NOW + 60, by="ana@example.com",
                        note="  on a call Tuesday ", action_id="r1")
    assert body == {"action_id": "r1", "account_id": "acme", "action": "snooze",
                    "until": NOW + 60, "alert_id": "", "by": "ana@example.com",
                    "note": "on a call Tuesday", "at": NOW}
    with pytest.raises(BadRequest, match="until is for snooze"):
        request_body("acme", "ack", NOW, until=NOW + 60)
    with pytest.raises(BadRequest, match="control characters"):
        request_body("acme", "ack", NOW, note="a\x00b")
    with pytest.raises(BadRequest, match="at most 500"):
        request_body("acme", "ack", NOW, by="x" * 501)


def test_an_ack_item_folds_into_the_state_and_leaves_its_row() -> None:
    store = MemoryStateStore(4)
    partition = packs.partition_for("acme", 4)
    state = AccountState("acme", band="high", score=60, alert_band="high")
    store.put(state)
    ack = request_body("acme", "ack", NOW, alert_id="al1", by="ana", action_id="r1")
    unknown = request_body("nobody", "snooze", NOW, until=NOW + 60, action_id="r2")
    pack = {"now": NOW, "items": [packs.control_item(packs.ACK, ack),
                                  packs.control_item(packs.ACK, unknown)]}
    result = fold_step(store, pack, partition, 7, POLICY, PartitionClock())
    held = store.peek("acme")
    assert held is not None and held.ack_band == "high"
    assert store.peek("nobody") is None  # no state is made for an unknown account
    rows = result.rows[ACTIONS]
    assert [(r[0], r[1], r[2], r[3], r[4], r[7]) for r in rows] == [
        ("acme", "r1", "al1", "ack", "high", "ana"), ("nobody", "r2", "", "snooze", "", "")]
    assert rows[0][5] is None and rows[1][5] == datetime.fromtimestamp(NOW + 60, tz=UTC)
