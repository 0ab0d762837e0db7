"""The synthetic history's churn mechanisms: each leaves in the files it writes the dependence
it promises (and noise leaves none), today's output is unchanged, and the real readers take
the files."""

from __future__ import annotations

import csv
import hashlib
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest

from churnsignal.offline import history
from churnsignal.offline.history_native import NativeHistory
from churnsignal.offline.synthetic_history import HURTFUL, START, Truth, generate, main
from churnsignal.stream.policy import Policy

ACCOUNTS, DAYS, SEED = 300, 200, 7


@dataclass
class History:
    truth: Truth
    directory: Path
    usage: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    types: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    plans: dict[str, str] = field(default_factory=dict)
    last_report: dict[str, int] = field(default_factory=dict)  # day of the last Report Exported
    other: dict[str, list[tuple[int, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(list))  # billing and support, from events.jsonl

    def start(self, account: str) -> int:
        return (self.truth.started[account] - START).days

    def end(self, account: str) -> int:
        churned = self.truth.churned.get(account)
        return (churned - START).days if churned else DAYS

    @property
    def churners(self) -> list[str]:
        return sorted(self.truth.churned)

    @property
    def survivors(self) -> list[str]:
        return sorted(set(self.plans) - set(self.truth.churned))

    def rate(self, accounts: Iterable[str]) -> float:
        """Mean over accounts of events per day over their whole life."""
        return statistics.mean(sum(self.usage[a].values()) / (self.end(a) - self.start(a))
                               for a in accounts)

    def trend(self, accounts: Iterable[str]) -> float:
        """Events in the last 30 days of life over the 30 before, pooled."""
        last = prev = 0
        for a in accounts:
            end = self.end(a)
            if end - self.start(a) >= 60:
                last += sum(self.usage[a][d] for d in range(end - 30, end))
                prev += sum(self.usage[a][d] for d in range(end - 60, end - 30))
        return last / prev

    def share(self, accounts: Iterable[str], names: Iterable[str]) -> float:
        accounts, names = list(accounts), list(names)
        total = sum(sum(self.types[a].values()) for a in accounts)
        return sum(self.types[a][n] for a in accounts for n in names) / total

    def days_of(self, account: str, kind: str) -> list[int]:
        return [d for d, e in self.other[account] if e["type"] == kind]


def _read(directory: Path, truth: Truth) -> History:
    out = History(truth, directory)
    day_of: dict[str, int] = {}
    with (directory / "events.csv").open() as fh:
        for account, at, name, _ in csv.reader(fh.readlines()[1:]):
            day = day_of.get(at[:10])
            if day is None:
                day = day_of[at[:10]] = (date.fromisoformat(at[:10]) - START.date()).days
            out.usage[account][day] += 1
            out.types[account][name] += 1
            if name == "Report Exported":
                out.last_report[account] = day
    with (directory / "subscriptions.csv").open() as fh:
        out.plans = {row["account_id"]: row["plan"] for row in csv.DictReader(fh)}
    if (directory / "events.jsonl").exists():
        with (directory / "events.jsonl").open("rb") as fh:
            for line in fh:
                if b'"type":"track"' not in line:
                    event = orjson.loads(line)
                    day = (date.fromisoformat(event["occurred_at"][:10]) - START.date()).days
                    out.other[event["account_id"]].append((day, event))
    return out


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., History]:
    """A history per set of mechanisms (300 accounts, 200 days), made once per module."""
    made: dict[str, History] = {}

    def history_of(noise: float | None = None, native: bool = False,
                   **mechanisms: float) -> History:
        key = f"{sorted(mechanisms.items())}-{noise}-{native}"
        if key not in made:
            directory = tmp_path_factory.mktemp("history")
            truth = generate(directory, ACCOUNTS, DAYS, SEED, mechanisms=mechanisms or None,
                             noise=noise, native=native)
            made[key] = _read(directory, truth)
        return made[key]

    return history_of


def _digest(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()[:16]
            for name in ("events.csv", "subscriptions.csv")}


def test_default_output_is_byte_for_byte_the_previous_generators(tmp_path: Path) -> None:
    # Digests of the generator before mechanisms (which held every row in memory to sort).
    truth = generate(tmp_path / "a", accounts=20, days=120, seed=3)
    assert _digest(tmp_path / "a") == {"events.csv": "2587ad686d8bb1ba",
                                       "subscriptions.csv": "f1019ed290908da1"}
    assert len(truth.churned) == 5 and not truth.cause
    generate(tmp_path / "b", accounts=40, days=150, seed=11)
    assert _digest(tmp_path / "b") == {"events.csv": "37dba18df8ba38d2",
                                       "subscriptions.csv": "3a70889e860b0647"}
    assert not (tmp_path / "a" / "events.jsonl").exists()


def test_level_churners_were_always_light_users_and_did_not_decline(
        make: Callable[..., History]) -> None:
    h = make(level=1.0)
    assert set(h.truth.cause.values()) == {"level"}
    assert 0.2 * ACCOUNTS <= len(h.churners) <= 0.4 * ACCOUNTS
    assert h.rate(h.churners) < 0.6 * h.rate(h.survivors)
    assert h.trend(h.churners) == pytest.approx(h.trend(h.survivors), rel=0.12)


def test_type_churners_see_more_errors_and_export_fewer_reports(
        make: Callable[..., History]) -> None:
    h = make(types=1.0)
    assert h.share(h.churners, HURTFUL) > 1.4 * h.share(h.survivors, HURTFUL)
    assert h.share(h.churners, ["Report Exported"]) < 0.8 * h.share(h.survivors,
                                                                     ["Report Exported"])
    # the mix, not the volume, tells them apart
    assert h.rate(h.churners) == pytest.approx(h.rate(h.survivors), rel=0.3)
    assert h.trend(h.churners) == pytest.approx(h.trend(h.survivors), rel=0.12)


def _young_over_old(h: History) -> float:
    """Churn per account-day at ages 30-89 days over that at 120 days and more."""
    young, old = [0.5, 0], [0.5, 0]  # half a churn each: no division by zero
    for a in h.plans:
        life = h.end(a) - h.start(a)
        young[1] += max(0, min(life, 90) - 30)
        old[1] += max(0, life - 120)
        if a in h.truth.churned:
            young[0] += 30 <= life < 90
            old[0] += life >= 120
    return (young[0] / young[1]) / (old[0] / old[1])


def test_tenure_churners_leave_young(make: Callable[..., History]) -> None:
    tenure, noise = make(tenure=1.0), make(noise=1.0, native=True)
    assert _young_over_old(tenure) > max(3.0, 2 * _young_over_old(noise))

    def median_age(h: History) -> float:
        return statistics.median(h.end(a) - h.start(a) for a in h.churners)

    assert median_age(tenure) < median_age(noise) - 15
    assert min(h.end(a) - h.start(a) for h in (tenure, noise) for a in h.churners) >= 30


def _churn_share_by_plan(h: History) -> dict[str, float]:
    plans = Counter(h.plans.values())
    churned = Counter(h.plans[a] for a in h.churners)
    return {plan: churned[plan] / n for plan, n in plans.items()}


def test_price_churners_pay_more_per_seat(make: Callable[..., History]) -> None:
    shares = _churn_share_by_plan(make(price=1.0))
    assert shares["business"] > shares["pro"] > shares["starter"]
    assert shares["business"] > 3 * shares["starter"]


def test_billing_churners_leave_after_failed_payments(make: Callable[..., History]) -> None:
    h, noise = make(billing=1.0, native=True), make(noise=1.0, native=True)

    def after_failure(h: History) -> float:
        return statistics.mean(any(h.end(a) - 15 <= d < h.end(a)
                                   for d in h.days_of(a, "payment_failed")) for a in h.churners)

    assert after_failure(h) > 0.9
    assert after_failure(noise) < 0.3
    # failed payments are there whatever the mechanism: only their effect is switched
    assert sum(len(noise.days_of(a, "payment_failed")) for a in noise.plans) > 50
    assert h.truth.involuntary
    for a in h.truth.involuntary:
        deleted = [e for _, e in h.other[a] if e["type"] == "subscription_deleted"]
        assert [e["data"]["cancellation_reason"] for e in deleted] == ["payment_failed"]
        final = [e for _, e in h.other[a] if e["type"] == "payment_failed"
                 and e["data"]["next_attempt_at"] is None]
        assert final and final[-1]["data"]["attempt_count"] == 4
    for a in h.churners:  # one cancellation, on the churn date, and nothing after it
        assert h.days_of(a, "subscription_deleted") == [h.end(a)]
        assert max(d for d, _ in h.other[a]) == h.end(a)
        assert max(h.usage[a], default=0) < h.end(a)


def test_support_churners_had_tickets_in_their_last_month(
        make: Callable[..., History]) -> None:
    h = make(support=1.0, native=True)

    def before_end(a: str) -> int:
        return sum(h.end(a) - 30 <= d < h.end(a) for d in h.days_of(a, "ticket_opened"))

    per_month = statistics.mean(30 * len(h.days_of(a, "ticket_opened"))
                                / (h.end(a) - h.start(a)) for a in h.survivors)
    assert statistics.mean(before_end(a) for a in h.churners) > 3 * per_month
    kinds = Counter(e["type"] for a in h.plans for _, e in h.other[a])
    assert kinds["ticket_solved"] > 0.8 * kinds["ticket_opened"] > 0
    assert kinds["satisfaction_rating"] > 0


def test_decline_is_todays_visible_change(make: Callable[..., History]) -> None:
    h = make(decline=1.0)
    assert set(h.truth.cause.values()) == {"decline"}
    assert h.truth.decliners and h.truth.narrowing and h.truth.key_droppers
    assert h.trend(h.churners) < 0.8 * h.trend(h.survivors)
    assert h.trend(h.truth.decliners) < 0.5 * h.trend(h.survivors)
    # key droppers stop exporting reports six weeks before they leave
    assert all(h.last_report[a] <= h.end(a) - 42 for a in h.truth.key_droppers)
    assert statistics.mean(h.last_report[a] > h.end(a) - 42 for a in h.truth.decliners) > 0.8
    assert min(h.end(a) - h.start(a) for a in h.churners) >= 70


def test_mixture_follows_its_weights(make: Callable[..., History]) -> None:
    h = make(noise=0.3, level=1.0, types=1.0)
    causes = Counter(h.truth.cause.values())
    assert set(causes) == {"level", "types", "noise"}
    assert 0.15 < causes["noise"] / len(h.churners) < 0.45
    assert 0.5 < causes["level"] / causes["types"] < 2
    by_cause = {c: [a for a in h.churners if h.truth.cause[a] == c] for c in causes}
    # each cause keeps its own signature inside the mixture
    assert h.rate(by_cause["level"]) < 0.6 * h.rate(h.survivors)
    assert h.share(by_cause["types"], HURTFUL) > 1.4 * h.share(h.survivors, HURTFUL)
    assert h.rate(by_cause["noise"]) == pytest.approx(h.rate(h.survivors), rel=0.35)
    assert h.rate(h.churners) < h.rate(h.survivors)
    assert h.share(h.churners, HURTFUL) > h.share(h.survivors, HURTFUL)
    assert h.truth.abrupt == set(by_cause["noise"])


def test_noise_one_is_independent_of_everything_the_history_shows(
        make: Callable[..., History]) -> None:
    h = make(noise=1.0, native=True)
    assert set(h.truth.cause.values()) == {"noise"}
    assert h.rate(h.churners) == pytest.approx(h.rate(h.survivors), rel=0.2)
    assert h.share(h.churners, HURTFUL) == pytest.approx(h.share(h.survivors, HURTFUL), rel=0.25)
    assert h.trend(h.churners) == pytest.approx(h.trend(h.survivors), rel=0.12)
    for driver in ("level", "types", "price"):
        churned = statistics.mean(h.truth.drivers[a][driver] for a in h.churners)
        stayed = statistics.mean(h.truth.drivers[a][driver] for a in h.survivors)
        assert abs(churned - stayed) < 0.35, driver
    # weights do not matter once all churn is random
    assert make(noise=1.0, level=1.0).truth.churned == h.truth.churned


def test_same_seed_same_accounts_whatever_the_mechanisms(make: Callable[..., History]) -> None:
    level, types = make(level=1.0), make(types=1.0)
    assert level.truth.drivers == types.truth.drivers
    assert level.truth.started == types.truth.started
    assert level.plans == types.plans
    assert level.truth.churned != types.truth.churned


def test_the_readers_take_every_file(tmp_path: Path) -> None:
    truth = generate(tmp_path, accounts=60, days=150, seed=3, noise=0.2,
                     mechanisms={"billing": 1, "support": 1, "tenure": 0.5, "decline": 0.5})
    rows = sum(1 for _ in (tmp_path / "events.csv").open()) - 1
    engine = history.Engine()
    try:
        days = list(history.warehouse_days(engine, tmp_path / "events.csv", Policy()))
        assert sum(d.events for d in days) == rows
        assert [d.occurred_at for d in days] == sorted(d.occurred_at for d in days)
        subs = history.read_subscriptions(engine, tmp_path / "subscriptions.csv")
    finally:
        engine.close()
    ends = subs.churn_dates(30)
    assert {a: [t.timestamp()] for a, t in truth.churned.items()} == ends
    native = NativeHistory().add_jsonl(tmp_path / "events.jsonl")
    try:
        assert not native.skipped
        events = list(native.events())
        kinds = Counter(e.type for e in events)
        assert kinds["track"] == rows
        for kind in ("subscription_created", "subscription_deleted", "invoice_paid",
                     "payment_failed", "ticket_opened", "ticket_solved", "satisfaction_rating"):
            assert kinds[kind] > 0, kind
        assert kinds["subscription_created"] == 60
        assert kinds["subscription_deleted"] == len(truth.churned)
        # the billing events imply the same periods and MRR as subscriptions.csv
        from_jsonl = native.subscriptions()
        assert {a: [p[:3] for p in ps] for a, ps in from_jsonl.periods.items()} == \
            {a: [p[:3] for p in ps] for a, ps in subs.periods.items()}
    finally:
        native.close()


def test_cli_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synthetic_history", str(tmp_path), "--accounts", "30", "--days", "120", "--seed",
            "2", "--mechanism", "level=1.0", "--mechanism", "types=0.5", "--noise", "0.3"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    assert "events.jsonl" in capsys.readouterr().out
    assert (tmp_path / "events.jsonl").exists()
    monkeypatch.setattr(sys, "argv", [*argv, "--no-native"])
    main()
    assert "30 accounts" in capsys.readouterr().out
    # no stale JSONL beside the new CSV
    assert (tmp_path / "events.csv").exists() and not (tmp_path / "events.jsonl").exists()
    for bad in (["--mechanism", "mood=1"], ["--mechanism", "level=x"], ["--noise", "1.5"]):
        monkeypatch.setattr(sys, "argv", ["synthetic_history", str(tmp_path), *bad])
        with pytest.raises(SystemExit):
            main()
    with pytest.raises(ValueError, match="positive weight"):
        generate(tmp_path, 5, 100, mechanisms={}, noise=0.0)
    with pytest.raises(ValueError, match="needs a mechanism"):
        generate(tmp_path, 5, 100, native=True)
