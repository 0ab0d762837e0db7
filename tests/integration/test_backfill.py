"""Proof of the monthly figures: a generated subscription history, part backfilled as snapshots
and the rest live, through the real core, rows and ClickHouse engine, checked month by month
against the same definitions computed in plain Python from the generator's ground truth.

The ground truth is the generator's own list of what happened to each account (not the rows):
when an account is a paying customer, at which MRR, in which currency, and why it ended.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from churnsignal.offline.importer import ImportSummary, snapshots
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.sinks.clickhouse import ClickHouseSink
from churnsignal.sinks.queries import run_query
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.policy import Policy
from churnsignal.stream.rows import fact_rows

pytestmark = [pytest.mark.integration, pytest.mark.offline]

POLICY = Policy()
FIRST = datetime(2025, 6, 1, tzinfo=UTC)
CUTOFF = datetime(2026, 1, 1, tzinfo=UTC)  # the backfill's as-of; live events after it
LAST = datetime(2026, 10, 25, tzinfo=UTC)  # nothing generated after this
WALL = datetime(2026, 11, 20, tzinfo=UTC).timestamp()
MINUTE = timedelta(minutes=1)


@dataclass
class Account:
    id: str
    currency: str
    mrr_known: bool = True  # False: seen only through invoices, its MRR is not known
    # Ground truth: (time, customer, mrr, involuntary end) from that time on
    truth: list[tuple[datetime, bool, int, bool]] = field(default_factory=list)
    periods: list[list[Any]] = field(default_factory=list)  # backfill: [start, end, mrr]
    live: list[dict[str, Any]] = field(default_factory=list)  # canonical events
    delinquent: list[tuple[datetime, datetime, bool]] = field(default_factory=list)


class Generator:
    def __init__(self, seed: int = 20) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.accounts: list[Account] = []
        self.failed_invoices: list[tuple[datetime, bool]] = []  # first failure, paid later

    def event(self, a: Account, type_: str, at: datetime, **data: Any) -> None:
        self.n += 1
        a.live.append({"event_id": f"evt_{self.n}", "account_id": a.id, "type": type_,
                       "occurred_at": at.isoformat(), "data": data})

    def generate(self, accounts: int = 90) -> list[Account]:
        for i in range(accounts):
            a = Account(f"acct{i:03d}", "eur" if i % 3 == 0 else "usd")
            start = FIRST + timedelta(days=self.rng.randrange(0, 480), hours=10)
            self.subscription(a, start, self.rng.choice([2_900, 9_900, 19_900]),
                              quiet_only=i == 7)
            self.accounts.append(a)
        return self.accounts

    def subscription(self, a: Account, start: datetime, mrr: int, quiet_only: bool = False) -> None:
        """One subscription from ``start``: monthly renewals until it ends or LAST."""
        rng, live = self.rng, start >= CUTOFF
        if quiet_only:  # its start was never sent: only invoices, then its cancellation
            a.mrr_known = False
            start = max(start, CUTOFF + timedelta(days=3, hours=10))
            live = True
        if not quiet_only:  # a quiet one is known as a customer from its first paid invoice
            a.truth.append((start, True, mrr, False))
        if live and not quiet_only:
            self.event(a, "subscription_created", start, status="active", mrr_cents=mrr,
                       currency=a.currency, plan=f"p{mrr}")
        period = [start, None, mrr]
        if not live:
            a.periods.append(period)
        k = 0
        while True:
            k += 1
            renew = start + timedelta(days=30 * k, hours=2)
            if renew > LAST:
                return
            if renew < CUTOFF:  # the backfilled era: only renewals, cancellations, returns
                if rng.random() < 0.05 and not quiet_only:
                    end = renew - timedelta(days=1)
                    period[1] = end
                    a.truth.append((end, False, 0, False))
                    if rng.random() < 0.5:
                        self.subscription(a, end + timedelta(days=rng.randrange(20, 60)), mrr)
                    return
                continue
            roll = rng.random()
            if quiet_only:
                if k > 4:
                    self.event(a, "subscription_deleted", renew - timedelta(days=1),
                               status="canceled", cancellation_reason="cancellation_requested")
                    a.truth.append((renew - timedelta(days=1), False, 0, False))
                    return
                self.event(a, "invoice_paid", renew, invoice_id=f"in_{a.id}_{k}",
                           amount_cents=4_900, currency=a.currency)
                if k == 1:
                    a.truth.append((renew, True, 0, False))  # its MRR is not known: 0
                continue
            if roll < 0.05:  # voluntary cancellation, maybe a reactivation later
                end = renew - timedelta(days=1)
                self.event(a, "subscription_deleted", end, status="canceled",
                           cancellation_reason="cancellation_requested", mrr_cents=mrr)
                a.truth.append((end, False, 0, False))
                back = end + timedelta(days=rng.randrange(15, 70), hours=1)
                if rng.random() < 0.5 and back < LAST:
                    self.subscription(a, back, rng.choice([2_900, 9_900]))
                return
            invoice = f"in_{a.id}_{start.date()}_{k}"
            if roll < 0.15:  # a failed payment: recovered, or the subscription terminated
                self.event(a, "payment_failed", renew, invoice_id=invoice, amount_cents=mrr,
                           attempt_count=1, next_attempt_at=(renew + timedelta(days=3)).isoformat())
                due = renew + MINUTE
                self.event(a, "subscription_updated", due, status="past_due", mrr_cents=mrr,
                           currency=a.currency)
                a.truth.append((due, True, mrr, False))
                if rng.random() < 0.6:
                    paid = renew + timedelta(days=rng.randrange(2, 30), hours=1)
                    self.event(a, "invoice_paid", paid, invoice_id=invoice, amount_cents=mrr,
                               currency=a.currency)
                    self.event(a, "subscription_updated", paid + MINUTE, status="active",
                               mrr_cents=mrr, currency=a.currency)
                    a.truth.append((paid, True, mrr, False))
                    a.delinquent.append((due, paid, False))
                    self.failed_invoices.append((renew, True))
                    continue
                end = renew + timedelta(days=rng.randrange(8, 40), hours=1)
                self.event(a, "subscription_deleted", end, status="canceled",
                           cancellation_reason="payment_failed", mrr_cents=mrr)
                a.truth.append((end, False, 0, True))
                a.delinquent.append((due, end, True))
                self.failed_invoices.append((renew, False))
                return
            self.event(a, "invoice_paid", renew, invoice_id=invoice, amount_cents=mrr,
                       currency=a.currency)  # a quiet renewal
            if roll > 0.9:  # an upgrade or a downgrade a few days later
                mrr = rng.choice([m for m in (2_900, 9_900, 19_900, 49_900) if m != mrr])
                at = renew + timedelta(days=5)
                self.event(a, "subscription_updated", at, status="active", mrr_cents=mrr,
                           currency=a.currency, plan=f"p{mrr}")
                a.truth.append((at, True, mrr, False))


def with_lapses(a: Account, days: int | None) -> list[tuple[datetime, bool, int, bool]]:
    """The truth under a past-due rule: a delinquency not settled within ``days`` is an
    involuntary churn at its end; a later payment is a reactivation."""
    truth = list(a.truth)
    if days is None:
        return truth
    for due, settled, _terminated in a.delinquent:
        lapse = due + timedelta(days=days)
        if lapse < settled:
            truth.append((lapse, False, 0, True))
            # the recovery's own entry (or the termination) is already at ``settled``
    truth.sort(key=lambda e: e[0])
    out: list[tuple[datetime, bool, int, bool]] = []
    for at, customer, mrr, involuntary in truth:
        out.append((at, customer, mrr, involuntary))
    return out


def _at(truth: list[tuple[datetime, bool, int, bool]], t: datetime) -> tuple[bool, int]:
    state = (False, 0)
    for at, customer, mrr, _ in truth:
        if at < t:
            state = (customer, mrr if customer else 0)
    return state


def _months(first: datetime, until: datetime) -> Iterator[datetime]:
    m = first.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    while m <= until:
        yield m
        m = (m + timedelta(days=32)).replace(day=1)


def expected(gen: Generator, days: int | None) -> dict[str, Any]:
    now = datetime.now(UTC)
    truths = {a.id: with_lapses(a, days) for a in gen.accounts}
    first = min(t[0][0] for t in truths.values())
    months = list(_months(first, now))
    churn, mrr, cohorts = {}, {}, defaultdict(lambda: defaultdict(lambda: [0, 0]))
    currency = {a.id: a.currency for a in gen.accounts}
    for m in months:
        nxt = (m + timedelta(days=32)).replace(day=1)
        start = churned = involuntary = 0
        money: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
        for acct, truth in truths.items():
            customer, m0 = _at(truth, m)
            _, m1 = _at(truth, nxt)
            ends = [e for i, e in enumerate(truth) if m <= e[0] < nxt and not e[1]
                    and _at(truth, e[0])[0]]
            if customer:
                start += 1
                if ends:
                    churned += 1
                    involuntary += ends[0][3]
            row = money[currency[acct]]
            row[0] += m0
            row[1] += m0 if m0 > 0 and m1 == 0 else 0
            row[2] += m0 - m1 if 0 < m1 < m0 else 0
            row[3] += m1 - m0 if m0 > 0 and m1 > m0 else 0
            row[4] += m1 if m0 == 0 else 0
        churn[m.date()] = (start, churned, involuntary)
        mrr[m.date()] = {c: tuple(v[:5]) for c, v in money.items()}
    for truth in truths.values():
        cohort = next(e[0] for e in truth if e[1]).replace(day=1, hour=0, minute=0)
        for k, m in enumerate(_months(cohort, now)):
            cell = cohorts[cohort.date()][k]
            cell[0] += 1
            cell[1] += 1 if k == 0 or _at(truth, m)[0] else 0
    recovery: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for failed, paid in gen.failed_invoices:
        cell = recovery[failed.replace(day=1).date()]
        cell[0] += 1
        cell[1] += paid
    return {"churn": churn, "mrr": mrr, "cohorts": cohorts, "recovery": recovery}


def _ts(t: datetime) -> float:
    return t.timestamp()


def worker_rows(gen: Generator, tmp_path: Path) -> list[Any]:
    """Backfill: a subscriptions file read by the import's own reader; then the live events;
    both through the core and row code the worker runs."""
    lines = ["account_id,start_date,end_date,mrr,plan,currency"]
    for a in gen.accounts:
        for start, end, mrr in a.periods:
            lines.append(f"{a.id},{start.isoformat()},{end.isoformat() if end else ''},"
                         f"{mrr / 100:.2f},p{mrr},{a.currency.upper()}")
    path = tmp_path / "subscriptions.csv"
    path.write_text("\n".join(lines) + "\n")
    summary = ImportSummary()
    snaps = snapshots(path, _ts(CUTOFF), summary)
    assert summary.subscriptions == len(lines) - 1 and not summary.skipped
    per_account: dict[str, list[Any]] = defaultdict(list)
    for e in snaps:
        per_account[e["account_id"]].append(EVENT_ADAPTER.validate_python(e))
    rows: list[Any] = []
    for a in gen.accounts:
        items = [(None, 0, e) for e in per_account[a.id]]
        items += [(None, 0, EVENT_ADAPTER.validate_python(e))
                  for e in sorted(a.live, key=lambda e: e["occurred_at"])]
        state = None
        for chunk in (items[:len(per_account[a.id])], items[len(per_account[a.id]):]):
            out = apply_batch(state, a.id, chunk, WALL, POLICY)  # backfill, then live
            state = out.state
            rows += fact_rows(out)[0]
    return rows


@pytest.fixture(scope="module")
def history() -> Generator:
    gen = Generator()
    gen.generate()
    return gen


@pytest.mark.parametrize("days", [None, 14])
async def test_monthly_figures_equal_the_ground_truth(history: Generator, tmp_path: Path,
                                                      days: int | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The setting as a user gives it: the views are created with it.
    monkeypatch.setenv("CHURNSIGNAL_VIEWS__PAST_DUE_CHURN_DAYS", "" if days is None else str(days))
    sink = ClickHouseSink(f"chdb://{tmp_path / 'ch'}")
    try:
        rows = worker_rows(history, tmp_path)
        await sink.write({"billing_events_data": rows})
        await sink.write({"billing_events_data": rows})  # replayed: changes nothing
        want = expected(history, days)
        got_churn = {r["month"].date(): (r["customers_at_start"], r["churned"],
                                         r["churned_involuntary"])
                     for r in run_query(sink, "logo_churn").rows}
        assert got_churn == want["churn"]
        got_mrr: dict[Any, dict[str, tuple[int, ...]]] = defaultdict(dict)
        for r in run_query(sink, "mrr_churn").rows:
            got_mrr[r["month"].date()][r["currency"]] = (
                r["mrr_start_cents"], r["churned_mrr_cents"], r["contraction_mrr_cents"],
                r["expansion_mrr_cents"], r["new_mrr_cents"])
        assert dict(got_mrr) == want["mrr"]
        got_cohorts: dict[Any, dict[int, list[int]]] = defaultdict(dict)
        for r in run_query(sink, "cohort_retention").rows:
            got_cohorts[r["cohort"]][r["months_since"]] = [r["customers"], r["retained"]]
        assert got_cohorts == {c: dict(v) for c, v in want["cohorts"].items()}
        got_recovery = {r["month"]: [r["failed_invoices"], r["recovered"]]
                        for r in run_query(sink, "payment_recovery").rows}
        assert got_recovery == dict(want["recovery"])
        months = sorted(want["churn"])
        busy = [m for m in months if want["churn"][m][1]]
        print(f"days={days}: {len(months)} months, {len(history.accounts)} accounts, "
              f"{len(rows)} billing rows, churn in {len(busy)} months, "
              f"involuntary {sum(v[2] for v in want['churn'].values())}")
        assert len(months) >= 12 and len(busy) >= 6
        kinds = {(e["type"], e["data"].get("status"), e["data"].get("cancellation_reason"))
                 for a in history.accounts for e in a.live}
        assert {("subscription_deleted", "canceled", "payment_failed"),
                ("subscription_deleted", "canceled", "cancellation_requested"),
                ("subscription_updated", "past_due", None), ("invoice_paid", None, None),
                ("subscription_created", "active", None)} <= kinds
        assert sum(len(a.periods) > 1 for a in history.accounts) >= 1  # backfilled returns
        assert sum(sum(e["type"] == "subscription_created" for e in a.live) > 0
                   and bool(a.periods) for a in history.accounts) >= 1  # live returns
        assert any(r for r in history.failed_invoices if r[1]) and {a.currency for a in
                                                                   history.accounts} == {"eur", "usd"}
    finally:
        sink.close()
