"""A year of warehouse-style history with a known ground truth, for the backtest and its docs.

    python -m churnsignal.offline.synthetic_history DIR [--accounts 500] [--days 365] [--seed 7]
        [--mechanism level=1 --mechanism types=0.5 ...] [--noise 0.3] [--churn-share 0.3]
        [--native | --no-native]

Without ``--mechanism`` or ``--noise`` (today's generator, byte for byte): DIR/events.csv
(account_id, event_time, event_type, user_id) and DIR/subscriptions.csv (account_id,
start_date, end_date, mrr, plan). Three kinds of account: healthy ones use the product
steadily; decliners' usage decays over the weeks before they cancel; narrowing churners keep
their volume but fall back to one feature in the weeks before they leave (a pattern the default
policy weighs lightly and calibration can learn); key-event droppers keep their volume and
breadth but stop the product's core action (``Report Exported``) six weeks before they leave
(only a per-event-type signal sees it); abrupt churners cancel without warning in usage. Event
names are product-specific (``Report Exported``, ``Dashboard Viewed``...), as a real export has
them.

With mechanisms, churn is a competing-risks process: each chosen mechanism is a daily hazard
whose share of all churn is (about) its weight's share, ``noise`` is the share of churn that is a
constant hazard (random: independent of everything the history shows), and usage stays
stationary until the end unless ``decline`` caused it:

- ``level``: hazard exp(-1.5 z) on the account's steady usage rate (z standard normal; the rate
  is lognormal): lightly engaged accounts leave, with no decline first.
- ``types``: hazard exp(1.5 z) where z rises with the share of ``Error Shown`` and ``Support
  Article Viewed`` (hurtful) and falls with that of ``Report Exported`` (helpful) in the
  account's event mix; the volume does not depend on it.
- ``tenure``: hazard exp(-(age - 30 days) / 40 days): young accounts leave, old ones stay.
- ``price``: hazard exp(1.5 z) on the price per seat (list prices starter 29, pro 49, business
  99, each account with its own discount or markup): expensive plans leave more.
- ``billing``: a hazard in the 14 days after a failed invoice, nine times higher in the three
  days after its retries run out (a churn then is involuntary: the subscription ends with
  ``cancellation_reason: payment_failed``; else the customer replaces the card days later).
- ``support``: hazard (tickets opened in the past 30 days) squared.
- ``decline``: today's visible change: the churner's usage decays, narrows to one feature or
  drops ``Report Exported`` over the six weeks before it leaves.

Nobody leaves in the first 30 days (70 for ``decline``, as today). Every mechanism-mode
history has the same accounts for a seed (rates, event mix, plans, failed payments, tickets);
only who leaves and when depends on the mechanisms, so histories compare like for like.
Mechanism mode writes events.csv (usage only: a warehouse export has no billing or support),
subscriptions.csv (plus a ``seats`` column, ignored by the readers) and, unless ``--no-native``,
events.jsonl: the whole history as canonical events, which the native reader takes
(``backtest --events DIR/events.jsonl``, with or without ``--subscriptions``): usage
(``track``, the same rows as the CSV), subscription lifecycle (created, updated past_due /
unpaid / active, deleted with its reason), invoices (``invoice_paid``, ``payment_failed``
with ``attempt_count`` and ``next_attempt_at``, unset when retries are exhausted,
``payment_method_updated``) and support (``ticket_opened``, ``ticket_solved``,
``satisfaction_rating``). Files are written account by account (events in time order within
an account): the readers sort, so memory stays per account.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson

EVENT_NAMES = ("Dashboard Viewed", "Report Exported", "Alert Created", "Integration Synced",
               "Comment Added", "Invite Sent")
NAME_WEIGHTS = (3, 3, 1, 1, 1, 1)  # viewing and exporting are what most use is
START = datetime(2025, 1, 1, tzinfo=UTC)

MECHANISMS = ("level", "types", "tenure", "price", "billing", "support", "decline")
HELPFUL = "Report Exported"
HURTFUL = ("Error Shown", "Support Article Viewed")
HURT_WEIGHT = 0.6  # each hurtful type's base weight beside NAME_WEIGHTS
STRENGTH = 1.5  # log-hazard per standard deviation of a static driver
MIN_AGE = 30  # days: nobody leaves in the first paid month
DECLINE_AGE = 70  # weeks of normal use before a decline can show, as today's decliners
TENURE_DAYS = 40.0
PLANS = (("starter", 29), ("pro", 49), ("business", 99))
PLAN_SHARES = (0.5, 0.35, 0.15)
RETRY_DAYS = (0, 3, 5, 7)  # first attempt and three retries after a failed invoice
WEEKEND = 0.35  # share of a weekday's use on Saturdays and Sundays

PRICE_SPREAD = 0.2  # sd of an account's log discount or markup on its plan's list price
_LOG_PRICES = [math.log(p) for _, p in PLANS]
_PRICE_MEAN = sum(s * x for s, x in zip(PLAN_SHARES, _LOG_PRICES, strict=True))
_PRICE_SD = math.sqrt(PRICE_SPREAD ** 2 + sum(s * (x - _PRICE_MEAN) ** 2
                                            for s, x in zip(PLAN_SHARES, _LOG_PRICES, strict=True)))
DAY_S = 86_400


@dataclass
class Truth:
    """Who churned when and why. In mechanism mode ``cause`` names the mechanism (or
    ``noise``) whose hazard ended each churner, decline churners are also in ``decliners``,
    ``narrowing`` or ``key_droppers`` by pattern, noise churners in ``abrupt``, and
    ``drivers`` holds each account's hidden properties (z scores of level, types and price,
    per_day, fail_rate, tickets_per_month)."""

    churned: dict[str, datetime]  # account -> end date
    decliners: set[str]
    narrowing: set[str]
    abrupt: set[str]
    key_droppers: set[str] = field(default_factory=set)
    started: dict[str, datetime] = field(default_factory=dict)
    cause: dict[str, str] = field(default_factory=dict)
    involuntary: set[str] = field(default_factory=set)  # ended by exhausted payment retries
    drivers: dict[str, dict[str, float]] = field(default_factory=dict)


def generate(directory: Path, accounts: int = 500, days: int = 365, seed: int = 7,
             churn_share: float = 0.3, mechanisms: Mapping[str, float] | None = None,
             noise: float | None = None, native: bool | None = None) -> Truth:
    """Write a history to ``directory``. Without ``mechanisms`` and ``noise``: today's
    generator, unchanged. Else ``mechanisms`` maps names of MECHANISMS to weights (their
    shares of the non-random churn), ``noise`` (0-1, default 0) is the share of churn that is
    random, and ``native`` (default: yes) also writes events.jsonl."""
    legacy = mechanisms is None and noise is None
    if legacy and native:
        raise ValueError("native output needs a mechanism or --noise")
    weights = {} if legacy else _checked(mechanisms or {}, noise or 0.0)
    directory.mkdir(parents=True, exist_ok=True)
    if legacy or native is False:
        # A JSONL left by an earlier run would contradict the history written now.
        (directory / "events.jsonl").unlink(missing_ok=True)
    if legacy:
        return _legacy(directory, accounts, days, seed, churn_share)
    return _mechanistic(directory, accounts, days, seed, churn_share, weights, noise or 0.0,
                        native is not False)


def _checked(mechanisms: Mapping[str, float], noise: float) -> dict[str, float]:
    unknown = sorted(set(mechanisms) - set(MECHANISMS))
    if unknown:
        raise ValueError(f"unknown mechanism(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(MECHANISMS)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be between 0 and 1, got {noise}")
    weights = {m: float(w) for m, w in mechanisms.items()}
    if any(not math.isfinite(w) or w < 0 for w in weights.values()):
        raise ValueError(f"mechanism weights must be >= 0, got {weights}")
    if noise < 1.0 and not any(weights.values()):
        raise ValueError("noise below 1 needs a mechanism with a positive weight")
    return {m: w for m, w in weights.items() if w > 0}


# --- today's generator ------------------------------------------------------------------------


@dataclass(slots=True)
class _Legacy:
    account: str
    start: datetime
    users: int
    per_day: float
    end: datetime | None
    kind: str
    last: datetime
    rng: random.Random  # positioned after this account's header draws


def _legacy(directory: Path, accounts: int, days: int, seed: int,
            churn_share: float) -> Truth:
    """Today's output, byte for byte, without holding its rows: one shared random stream
    decided every account in turn, so a first pass runs it (writing subscriptions, keeping a
    copy of the stream where each account's days begin) and a second replays the copies day by
    day; a day's rows sorted are the old global sort's rows for that day, as every event falls
    between 08:00 and 20:00 of its day."""
    rng = random.Random(seed)
    truth = Truth({}, set(), set(), set())
    window = START + timedelta(days=days)
    starting: dict[int, list[_Legacy]] = {}
    with (directory / "subscriptions.csv").open("w", newline="") as sub_fh:
        subs = csv.writer(sub_fh)
        subs.writerow(["account_id", "start_date", "end_date", "mrr", "plan"])
        scratch: list[tuple[datetime, str, str, str]] = []
        for a in range(accounts):
            acc = _legacy_header(rng, a, days, churn_share, window)
            truth.started[acc.account] = acc.start
            if acc.end is not None:
                truth.churned[acc.account] = acc.end
                {"decline": truth.decliners, "narrow": truth.narrowing,
                 "key": truth.key_droppers, "abrupt": truth.abrupt}[acc.kind].add(acc.account)
            acc.rng.setstate(rng.getstate())
            day = acc.start
            while day < acc.last:  # the draws only, to reach the next account's
                _legacy_day(acc, rng, day, scratch)
                scratch.clear()
                day += timedelta(days=1)
            mrr = round(acc.users * rng.choice((29, 49, 99)), 2)
            subs.writerow([acc.account, acc.start.date().isoformat(),
                           acc.end.date().isoformat() if acc.end else "", mrr,
                           "pro" if mrr > 300 else "starter"])
            starting.setdefault((acc.start - START).days, []).append(acc)
    with (directory / "events.csv").open("w", newline="") as ev_fh:
        events = csv.writer(ev_fh)
        events.writerow(["account_id", "event_time", "event_type", "user_id"])
        active: list[_Legacy] = []
        for d in range(days):
            day = START + timedelta(days=d)
            active.extend(starting.pop(d, ()))
            rows: list[tuple[datetime, str, str, str]] = []
            for acc in active:
                _legacy_day(acc, acc.rng, day, rows)
            active = [acc for acc in active if day + timedelta(days=1) < acc.last]
            rows.sort()
            for at, account, name, user in rows:
                events.writerow([account, at.strftime("%Y-%m-%d %H:%M:%S"), name, user])
    return truth


def _legacy_header(rng: random.Random, a: int, days: int, churn_share: float,
                   window: datetime) -> _Legacy:
    account = f"acct-{a:04d}"
    start = START + timedelta(days=rng.randrange(0, days // 3))
    users = rng.randint(2, 12)
    per_day = rng.uniform(2, 12)
    end: datetime | None = None
    kind = "healthy"
    if rng.random() < churn_share:
        end = start + timedelta(days=rng.randrange(70, max(71, days - (start - START).days)))
        kind = rng.choices(("decline", "narrow", "key", "abrupt"), (0.35, 0.25, 0.25, 0.15))[0]
    last = min(end or window, window)
    return _Legacy(account, start, users, per_day, end, kind, last, random.Random())


def _legacy_day(acc: _Legacy, rng: random.Random, day: datetime,
                rows: list[tuple[datetime, str, str, str]]) -> None:
    rate = acc.per_day
    end = acc.end
    if acc.kind == "decline" and end is not None:
        weeks_left = (end - day).days / 7
        rate = acc.per_day * min(1.0, max(0.0, (weeks_left - 0.5) / 5))
    late = end is not None and (end - day).days < 42
    narrowed = acc.kind == "narrow" and late
    names = EVENT_NAMES[:1] if narrowed else EVENT_NAMES[: 3 + acc.users % 4]
    weights = list(NAME_WEIGHTS[: len(names)])
    if acc.kind == "key" and late:
        weights[1] = 0  # no more reports; the same volume elsewhere
    for _ in range(_poisson(rng, rate * (0.8 if narrowed else 1.0))):
        at = day + timedelta(seconds=rng.randrange(8 * 3600, 20 * 3600))
        rows.append((at, acc.account, rng.choices(names, weights)[0],
                     f"{acc.account}-u{rng.randrange(acc.users)}"))


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: small rates only, which is all this needs.
    n, p, limit = 0, 1.0, pow(2.718281828459045, -lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return n
        n += 1


# --- mechanisms -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Account:
    """An account's hidden properties and the billing and support it would have over the whole
    window (cut at its churn). Days are indices from START."""

    name: str
    start: int
    users: int
    seats: int
    plan: str
    price: float  # per seat and month
    per_day: float
    z_level: float
    z_types: float
    z_price: float
    help_mult: float
    hurt_mult: float
    breadth: int
    fail_rate: float
    tickets_per_month: float
    invoices: list[int]
    failures: dict[int, tuple[int, int]]  # invoice day -> (failed attempts 1-4, paid day)
    tickets: list[int]


def _account(seed: int, a: int, days: int) -> _Account:
    # Its own stream per account: the same accounts whatever the mechanisms or their order.
    rng = random.Random(f"{seed}:{a}:account")
    start = rng.randrange(0, max(1, days - 60))
    users = rng.randint(2, 12)
    seats = users + rng.randint(0, 3)
    plan, list_price = rng.choices(PLANS, PLAN_SHARES)[0]
    price = round(list_price * math.exp(rng.gauss(0.0, PRICE_SPREAD)), 2)
    z_level = rng.gauss(0.0, 1.0)
    u_help, u_hurt = rng.gauss(0.0, 1.0), rng.gauss(0.0, 1.0)
    fail_rate = 0.03 + 0.45 * rng.random() ** 2
    invoices = list(range(start, days, 30))
    failures: dict[int, tuple[int, int]] = {}
    for day in invoices[1:]:  # the card was just entered at sign-up
        if rng.random() >= fail_rate:
            continue
        failed = 1
        while failed < len(RETRY_DAYS) and rng.random() >= 0.5:
            failed += 1
        paid = day + (RETRY_DAYS[failed] if failed < len(RETRY_DAYS)
                      else RETRY_DAYS[-1] + rng.randint(4, 12))  # a new card, eventually
        failures[day] = (failed, paid)
    tickets_per_month = 0.5 * math.exp(rng.gauss(0.0, 1.0))
    tickets: list[int] = []
    t = start + rng.expovariate(tickets_per_month / 30)
    while t < days:
        tickets.append(int(t))
        t += rng.expovariate(tickets_per_month / 30)
    return _Account(
        f"acct-{a:04d}", start, users, seats, plan, price,
        min(60.0, 5.0 * math.exp(0.7 * z_level)), z_level, (u_hurt - u_help) / math.sqrt(2),
        (math.log(price) - _PRICE_MEAN) / _PRICE_SD, math.exp(0.8 * u_help),
        math.exp(0.8 * u_hurt), 3 + rng.randrange(4), fail_rate, tickets_per_month, invoices,
        failures, tickets)


def _hazards(acc: _Account, days: int, components: list[str]) -> list[list[float]]:
    """Per component, its relative hazard on each day from the account's start (index 0) to
    the window's end. A churn on day t is known from what happened before t."""
    n = days - acc.start
    out = []
    for name in components:
        g = [0.0] * n
        first = MIN_AGE if name != "decline" else DECLINE_AGE
        if name in ("level", "types", "price", "decline", "noise"):
            value = {"level": math.exp(-STRENGTH * acc.z_level),
                     "types": math.exp(STRENGTH * acc.z_types),
                     "price": math.exp(STRENGTH * acc.z_price)}.get(name, 1.0)
            g[first:] = [value] * max(0, n - first)
        elif name == "tenure":
            for i in range(first, n):
                g[i] = math.exp(-(i - MIN_AGE) / TENURE_DAYS)
        elif name == "billing":
            for day, (failed, _) in acc.failures.items():
                for t in range(day + 1, day + 15):
                    if 0 <= t - acc.start < n:
                        g[t - acc.start] += 1.0 + (8.0 if failed == len(RETRY_DAYS) and
                                                   0 < t - day - RETRY_DAYS[-1] <= 3 else 0.0)
            g[:first] = [0.0] * min(first, n)
        elif name == "support":
            opened = [0] * (n + 1)
            for t in acc.tickets:
                opened[t - acc.start] += 1
            recent = 0
            for i in range(n):
                recent += opened[i - 1] if i >= 1 else 0  # tickets of the 30 days before i
                recent -= opened[i - 31] if i >= 31 else 0
                g[i] = float(recent * recent) if i >= first else 0.0
        out.append(g)
    return out


def _solve(totals: list[float], target: float) -> float:
    """The scale c with mean(1 - exp(-c * total)) = target (capped when out of reach)."""
    if target <= 0 or not totals:
        return 0.0

    def share(c: float) -> float:
        return sum(1.0 - math.exp(-c * g) for g in totals) / len(totals)

    lo, hi = 1e-12, 1e-6
    while share(hi) < target and hi < 1e9:
        hi *= 8
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if share(mid) < target else (lo, mid)
    return hi


def _mechanistic(directory: Path, accounts: int, days: int, seed: int, churn_share: float,
                 weights: dict[str, float], noise: float, native: bool) -> Truth:
    components = ([m for m in MECHANISMS if m in weights] if noise < 1 else []) + \
        (["noise"] if noise > 0 else [])
    total_weight = sum(weights.values())
    targets = [churn_share * noise if m == "noise" else
               churn_share * (1 - noise) * weights[m] / total_weight for m in components]
    # First pass: each component's total hazard per account, to scale it to its share of churn
    # (competing risks overlap a little, so one more scale sets the overall churn share).
    totals: list[list[float]] = [[] for _ in components]
    for a in range(accounts):
        for i, g in enumerate(_hazards(_account(seed, a, days), days, components)):
            totals[i].append(sum(g))
    scales = [_solve(t, target) for t, target in zip(totals, targets, strict=True)]
    overall = _solve([sum(s * t[a] for s, t in zip(scales, totals, strict=True))
                      for a in range(accounts)], churn_share)
    scales = [s * overall for s in scales]

    truth = Truth({}, set(), set(), set())
    with ExitStack() as files:
        ev_fh = files.enter_context((directory / "events.csv").open("w", newline=""))
        sub_fh = files.enter_context((directory / "subscriptions.csv").open("w", newline=""))
        jsonl = files.enter_context((directory / "events.jsonl").open("wb")) if native else None
        events = csv.writer(ev_fh)
        subs = csv.writer(sub_fh)
        events.writerow(["account_id", "event_time", "event_type", "user_id"])
        subs.writerow(["account_id", "start_date", "end_date", "mrr", "plan", "seats"])
        day_names = [(START + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(days + 1)]
        for a in range(accounts):
            acc = _account(seed, a, days)
            end, cause = _churn(random.Random(f"{seed}:{a}:churn"), acc, days, components,
                                scales)
            _record(truth, acc, end, cause)
            mrr = round(acc.seats * acc.price, 2)
            subs.writerow([acc.name, day_names[acc.start], day_names[end] if end is not None
                           else "", mrr, acc.plan, acc.seats])
            _write_account(random.Random(f"{seed}:{a}:events"), acc, days, end, cause,
                           events, jsonl, day_names)
    return truth


def _churn(rng: random.Random, acc: _Account, days: int, components: list[str],
           scales: list[float]) -> tuple[int | None, str]:
    """The churn day (None: stays to the window's end) and the component that caused it."""
    if not components:
        return None, ""
    hazards = _hazards(acc, days, components)
    threshold = rng.expovariate(1.0)
    cumulative = 0.0
    for i in range(days - acc.start):
        parts = [s * g[i] for s, g in zip(scales, hazards, strict=True)]
        today = sum(parts)
        cumulative += today
        if today > 0 and cumulative >= threshold:
            cause = rng.choices(components, parts)[0]
            if cause == "decline":
                cause = rng.choices(("decline", "narrow", "key"), (0.35, 0.25, 0.25))[0]
            return acc.start + i, cause
    return None, ""


def _record(truth: Truth, acc: _Account, end: int | None, cause: str) -> None:
    truth.started[acc.name] = START + timedelta(days=acc.start)
    truth.drivers[acc.name] = {
        "level": acc.z_level, "types": acc.z_types, "price": acc.z_price,
        "per_day": acc.per_day, "fail_rate": acc.fail_rate,
        "tickets_per_month": acc.tickets_per_month}
    if end is None:
        return
    truth.churned[acc.name] = START + timedelta(days=end)
    truth.cause[acc.name] = cause if cause not in ("narrow", "key") else "decline"
    sets = {"decline": truth.decliners, "narrow": truth.narrowing, "key": truth.key_droppers,
            "noise": truth.abrupt}
    if cause in sets:
        sets[cause].add(acc.name)
    if cause == "billing" and _retries_just_ran_out(acc, end):
        truth.involuntary.add(acc.name)


def _retries_just_ran_out(acc: _Account, end: int) -> bool:
    """Whether ``end`` falls in the three days after a failed invoice ran out of retries."""
    return any(failed == len(RETRY_DAYS) and 0 < end - day - RETRY_DAYS[-1] <= 3
               for day, (failed, _) in acc.failures.items())


def _write_account(rng: random.Random, acc: _Account, days: int, end: int | None, cause: str,
                   events: Any, jsonl: IO[bytes] | None, day_names: list[str]) -> None:
    """Usage rows to the CSV and, with ``jsonl``, every event as canonical JSON, one day at a
    time (the account's other events that day merged in by time)."""
    stop = end if end is not None else days
    extra = _billing_and_support(rng, acc, stop, end, cause) if jsonl is not None else {}
    names = EVENT_NAMES[: acc.breadth] + HURTFUL
    weights = list(NAME_WEIGHTS[: acc.breadth]) + [HURT_WEIGHT * acc.hurt_mult] * len(HURTFUL)
    weights[EVENT_NAMES.index(HELPFUL)] *= acc.help_mult
    late_weights = list(weights)
    late_weights[EVENT_NAMES.index(HELPFUL)] = 0.0
    n = 0
    for d in range(acc.start, stop):
        weekend = (START.weekday() + d) % 7 >= 5
        rate = acc.per_day * (WEEKEND if weekend else 1.0) * rng.gammavariate(3.0, 1 / 3)
        left = stop - d
        use_names, use_weights = names, weights
        if end is not None and left < 42:  # today's decline patterns, for decline churners
            if cause == "decline":
                rate *= min(1.0, max(0.0, (left / 7 - 0.5) / 5))
            elif cause == "narrow":
                use_names, use_weights, rate = names[:1], weights[:1], rate * 0.8
            elif cause == "key":
                use_weights = late_weights
        lines: list[tuple[int, bytes]] = []
        for second in sorted(rng.randrange(8 * 3600, 20 * 3600)
                             for _ in range(_count(rng, rate))):
            name = rng.choices(use_names, use_weights)[0]
            user = f"{acc.name}-u{rng.randrange(acc.users)}"
            clock = f"{second // 3600:02d}:{second % 3600 // 60:02d}:{second % 60:02d}"
            events.writerow([acc.name, f"{day_names[d]} {clock}", name, user])
            if jsonl is not None:
                n += 1
                lines.append((second, orjson.dumps({
                    "event_id": f"{acc.name}-e{n}", "account_id": acc.name, "type": "track",
                    "occurred_at": f"{day_names[d]}T{clock}Z", "user_id": user,
                    "data": {"name": name, "feature": name}})))
        if jsonl is not None:
            lines.extend(extra.pop(d, ()))
            lines.sort(key=lambda item: item[0])
            jsonl.writelines(line + b"\n" for _, line in lines)
    if jsonl is not None:  # the cancellation, at the end day's midnight
        for d in sorted(extra):
            jsonl.writelines(line + b"\n" for _, line in sorted(extra[d], key=lambda i: i[0]))


def _count(rng: random.Random, lam: float) -> int:
    """A Poisson count: Knuth's method for small rates, normal beyond (heavy users)."""
    if lam >= 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    return _poisson(rng, lam)


def _billing_and_support(rng: random.Random, acc: _Account, stop: int, end: int | None,
                         cause: str) -> dict[int, list[tuple[int, bytes]]]:
    """Canonical billing and support events before ``stop`` (and the cancellation on
    ``end``), by day, as (second of day, JSON). Everything is drawn for the whole window and
    then cut, so the draws do not depend on who churns."""
    out: dict[int, list[tuple[int, bytes]]] = {}
    account, mrr = acc.name, round(acc.seats * acc.price * 100)
    limit = stop * DAY_S

    def emit(at: int, kind: str, data: dict[str, Any], suffix: str,
             user: str | None = None) -> None:
        if at < limit or (kind == "subscription_deleted" and end is not None):
            day, second = divmod(at, DAY_S)
            body: dict[str, Any] = {
                "event_id": f"{account}-{suffix}", "account_id": account, "type": kind,
                "occurred_at": _iso(at), "data": data}
            if user is not None:
                body["user_id"] = user
            out.setdefault(day, []).append((second, orjson.dumps(body)))

    def status(at: int, kind: str, state: str, suffix: str, **more: Any) -> None:
        emit(at, kind, {"subscription_id": f"sub-{account}", "status": state,
                        "plan": acc.plan, "seats": acc.seats, "mrr_cents": mrr,
                        "currency": "usd", **more}, suffix)

    status(acc.start * DAY_S, "subscription_created", "active", "created")
    for k, day in enumerate(acc.invoices):
        at = day * DAY_S + rng.randrange(5 * 3600, 7 * 3600)
        invoice = {"invoice_id": f"in-{account}-{k}", "amount_cents": mrr, "currency": "usd"}
        if day not in acc.failures:
            emit(at, "invoice_paid", {**invoice, "attempt_count": 1}, f"in{k}-paid")
            continue
        failed, paid = acc.failures[day]
        status(at + 60, "subscription_updated", "past_due", f"in{k}-past-due")
        for attempt in range(failed):
            retry = at + RETRY_DAYS[attempt] * DAY_S
            following = (_iso(at + RETRY_DAYS[attempt + 1] * DAY_S)
                         if attempt + 1 < len(RETRY_DAYS) else None)
            emit(retry, "payment_failed", {**invoice, "attempt_count": attempt + 1,
                                           "next_attempt_at": following}, f"in{k}-f{attempt}")
        paid_at = paid * DAY_S + (at % DAY_S)
        if failed == len(RETRY_DAYS):  # retries exhausted: unpaid until the card is replaced
            status(at + RETRY_DAYS[-1] * DAY_S + 60, "subscription_updated", "unpaid",
                   f"in{k}-unpaid")
            emit(paid_at - 600, "payment_method_updated", {}, f"in{k}-card")
        emit(paid_at, "invoice_paid", {**invoice, "attempt_count": failed + 1}, f"in{k}-paid")
        status(paid_at + 60, "subscription_updated", "active", f"in{k}-active")
    for k, day in enumerate(acc.tickets):
        opened = day * DAY_S + rng.randrange(9 * 3600, 18 * 3600)
        solved = opened + int(3600 * math.exp(rng.gauss(3.0, 1.0)))  # median 20 h
        priority = rng.choices(("low", "normal", "high", "urgent"), (2, 6, 2, 1))[0]
        rated, bad = rng.random() < 0.4, rng.random() < 0.3
        ticket = {"ticket_id": f"t-{account}-{k}", "priority": priority, "channel": "email"}
        user = f"{account}-u{rng.randrange(acc.users)}"
        emit(opened, "ticket_opened", {**ticket, "status": "new"}, f"t{k}-open", user)
        emit(solved, "ticket_solved", {**ticket, "status": "solved",
                                       "resolution_s": float(solved - opened)}, f"t{k}-solved",
             user)
        if rated:
            emit(solved + 3600, "satisfaction_rating", {"csat": "bad" if bad else "good"},
                 f"t{k}-csat", user)
    if end is not None:
        reason = ("payment_failed" if cause == "billing" and _retries_just_ran_out(acc, end)
                  else "cancellation_requested")
        status(end * DAY_S, "subscription_deleted", "canceled", "deleted",
               cancellation_reason=reason)
    return out


def _iso(seconds: int) -> str:
    """Seconds from START as an ISO time in UTC."""
    return (START + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mechanism(text: str) -> tuple[str, float]:
    name, _, weight = text.partition("=")
    try:
        return name.strip(), float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--churn-share", type=float, default=0.3,
                        help="share of accounts that churn within the window")
    parser.add_argument("--mechanism", type=_mechanism, action="append", metavar="NAME=WEIGHT",
                        help=f"a churn mechanism and its weight, repeatable: "
                             f"{', '.join(MECHANISMS)}")
    parser.add_argument("--noise", type=float, default=None,
                        help="share of churn that is random (0-1; default 0 with mechanisms)")
    parser.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                        help="also write events.jsonl (default with mechanisms)")
    args = parser.parse_args()
    mechanisms = dict(args.mechanism) if args.mechanism else None
    try:
        truth = generate(args.directory, args.accounts, args.days, args.seed, args.churn_share,
                         mechanisms, args.noise, args.native)
    except ValueError as exc:
        parser.error(str(exc))
    if mechanisms is None and args.noise is None:
        print(f"wrote {args.directory}/events.csv and subscriptions.csv: {args.accounts} "
              f"accounts, {len(truth.churned)} churned ({len(truth.decliners)} after a decline)")
        return
    causes: dict[str, int] = {}
    for cause in truth.cause.values():
        causes[cause] = causes.get(cause, 0) + 1
    files = "events.csv, subscriptions.csv" + (", events.jsonl" if args.native is not False
                                               else "")
    print(f"wrote {files} to {args.directory}: {args.accounts} accounts, {len(truth.churned)} "
          f"churned (" + ", ".join(f"{n} by {c}" for c, n in sorted(causes.items())) +
          f"; {len(truth.involuntary)} involuntary)")


if __name__ == "__main__":
    main()
