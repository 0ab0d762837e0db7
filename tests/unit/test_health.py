"""Liveness: a stuck agent or a blocked loop fails /healthz; waiting on an outage never does."""

from __future__ import annotations

from churnsignal.app.health import Liveness

STALL = 300.0


def test_idle_is_healthy_however_long() -> None:
    lv = Liveness(now=0.0)
    lv.beat(0.0)
    for t in range(1, 10_000):
        lv.beat(float(t))
    assert lv.check(10_000.0, STALL) == (True, "idle")


def test_waiting_work_without_progress_is_a_stall() -> None:
    lv = Liveness(now=0.0)
    lv.waiting(3, now=10.0)
    assert lv.check(10.0 + STALL, STALL)[0]  # exactly the limit: not yet
    ok, reason = lv.check(10.0 + STALL + 1, STALL)
    assert not ok and "agent stuck" in reason and "3 waiting" in reason


def test_progress_keeps_it_alive_and_the_clock_starts_when_work_starts_waiting() -> None:
    lv = Liveness(now=0.0)
    lv.waiting(1, now=0.0)
    for t in range(0, 3000, 100):  # steady progress, work always waiting
        lv.progress(float(t))
        assert lv.check(float(t) + 50, STALL)[0]
    lv.waiting(0, now=3000.0)  # idle for hours, then work arrives
    lv.waiting(5, now=20_000.0)
    assert lv.check(20_000.0 + STALL - 1, STALL)[0]  # measured from when it started waiting
    assert not lv.check(20_000.0 + STALL + 1, STALL)[0]
    lv.waiting(7, now=20_200.0)  # more work while still stuck does not restart the clock
    assert not lv.check(20_000.0 + STALL + 1, STALL)[0]


def test_an_outage_is_not_a_stall_and_catching_up_gets_a_fresh_window() -> None:
    lv = Liveness(now=0.0)
    lv.waiting(10, now=0.0)
    lv.outage("clickhouse", True, now=100.0)
    ok, reason = lv.check(5_000.0, STALL)  # an hour-long outage: the agent rightly waits
    assert ok and "clickhouse" in reason and "not a stall" in reason
    lv.outage("kafka", True, now=4_000.0)
    lv.outage("clickhouse", False, now=5_000.0)
    assert lv.check(6_000.0, STALL)[0]  # Kafka still failing
    lv.outage("kafka", False, now=6_000.0)
    assert lv.check(6_000.0 + STALL - 1, STALL)[0]  # time to catch up after the outage
    ok, reason = lv.check(6_000.0 + STALL + 1, STALL)
    assert not ok and "agent stuck" in reason


def test_repeated_failures_keep_the_first_outage_time_and_success_clears_only_its_kind() -> None:
    lv = Liveness(now=0.0)
    lv.outage("kafka", True, now=1.0)
    lv.outage("kafka", True, now=50.0)
    assert lv.snapshot(100.0)["outages"] == {"kafka": 99.0}
    lv.outage("clickhouse", False, now=60.0)  # a success elsewhere changes nothing
    assert lv.outages == {"kafka": 1.0} and lv.outage_cleared == 0.0


def test_a_blocked_event_loop_fails_even_during_an_outage() -> None:
    lv = Liveness(now=0.0)
    assert lv.check(10_000.0, STALL)[0]  # no heartbeat yet (app still starting): not judged
    lv.beat(100.0)
    assert lv.beat(101.0) == 0.0
    assert lv.check(101.0 + STALL, STALL)[0]
    lv.outage("kafka", True, now=150.0)
    ok, reason = lv.check(101.0 + STALL + 1, STALL)
    assert not ok and "event loop blocked" in reason


def test_heartbeat_measures_how_late_it_ran() -> None:
    lv = Liveness(now=0.0)
    assert lv.beat(10.0) == 0.0
    assert lv.beat(11.0) == 0.0
    assert lv.beat(19.5) == 7.5  # the loop was blocked ~7.5 s
    assert lv.beat(20.5) == 0.0
    snap = lv.snapshot(21.0)
    assert snap["loop_lag_s"] == 0.0 and snap["loop_lag_worst_s"] == 7.5
    assert snap["since_heartbeat_s"] == 0.5


def test_snapshot_is_plain_json() -> None:
    import json

    lv = Liveness(now=0.0)
    lv.waiting(2, now=5.0)
    lv.progress(7.0)
    snap = lv.snapshot(10.0)
    assert json.loads(json.dumps(snap)) == snap
    assert snap["work_waiting"] == 2 and snap["since_progress_s"] == 3.0
    assert snap["stalled_s"] == 3.0 and snap["since_heartbeat_s"] is None


def test_each_reporter_sets_its_own_waiting_count() -> None:
    lv = Liveness(now=0.0)
    lv.waiting(4, now=10.0, what="packs")
    lv.waiting(2, now=20.0, what="flush")
    assert lv.work_waiting == 6 and lv.waiting_since == 10.0
    lv.waiting(0, now=30.0, what="packs")  # the agent is done; the due flush still waits
    assert lv.work_waiting == 2 and lv.snapshot(30.0)["waiting"] == {"flush": 2}
    assert not lv.check(10.0 + STALL + 1, STALL)[0]
    lv.progress(400.0)
    lv.waiting(0, now=400.0, what="flush")
    assert lv.work_waiting == 0 and lv.check(10_000.0, STALL) == (True, "idle")


def test_a_part_that_cannot_run_fails_the_check_even_during_an_outage() -> None:
    lv = Liveness(now=0.0)
    lv.outage("kafka-ingest", True, now=1.0)
    lv.failing("ingest-process", "exited 5 times in a row")
    ok, reason = lv.check(2.0, stall_s=60)
    assert not ok and reason == "ingest-process: exited 5 times in a row"
    assert lv.snapshot(2.0)["broken"] == {"ingest-process": "exited 5 times in a row"}
    lv.failing("ingest-process", None)  # a child runs again
    ok, reason = lv.check(3.0, stall_s=60)
    assert ok and reason.startswith("waiting on an outage")
    assert lv.snapshot(3.0)["broken"] == {}
