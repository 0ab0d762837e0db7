"""A year of warehouse-style history with a known ground truth, for the backtest and its docs.

    python -m churnsignal.offline.synthetic_history DIR [--accounts 500] [--days 365] [--seed 7]

writes DIR/events.csv (account_id, event_time, event_type, user_id) and
DIR/subscriptions.csv (account_id, start_date, end_date, mrr, plan). Three kinds of account:
healthy ones use the product steadily; decliners' usage decays over the weeks before they
cancel; narrowing churners keep their volume but fall back to one feature in the weeks
before they leave (a pattern the default policy weighs lightly and calibration can learn);
key-event droppers keep their volume and breadth but stop the product's core action
(``Report Exported``) six weeks before they leave (only a per-event-type signal sees it);
abrupt churners cancel without warning in usage. Event names are product-specific
(``Report Exported``, ``Dashboard Viewed``...), as a real export has them.
"""

from __future__ import annotations

import argparse
import csv
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

EVENT_NAMES = ("Dashboard Viewed", "Report Exported", "Alert Created", "Integration Synced",
               "Comment Added", "Invite Sent")
NAME_WEIGHTS = (3, 3, 1, 1, 1, 1)  # viewing and exporting are what most use is
START = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class Truth:
    churned: dict[str, datetime]  # account -> end date
    decliners: set[str]
    narrowing: set[str]
    abrupt: set[str]
    key_droppers: set[str] = field(default_factory=set)


def generate(directory: Path, accounts: int = 500, days: int = 365, seed: int = 7,
             churn_share: float = 0.3) -> Truth:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    truth = Truth({}, set(), set(), set())
    with (directory / "events.csv").open("w", newline="") as ev_fh, \
            (directory / "subscriptions.csv").open("w", newline="") as sub_fh:
        events = csv.writer(ev_fh)
        subs = csv.writer(sub_fh)
        events.writerow(["account_id", "event_time", "event_type", "user_id"])
        subs.writerow(["account_id", "start_date", "end_date", "mrr", "plan"])
        rows: list[tuple[datetime, str, str, str]] = []
        for a in range(accounts):
            account = f"acct-{a:04d}"
            start = START + timedelta(days=rng.randrange(0, days // 3))
            users = rng.randint(2, 12)
            per_day = rng.uniform(2, 12)
            end: datetime | None = None
            kind = "healthy"
            if rng.random() < churn_share:
                end = start + timedelta(days=rng.randrange(70, max(71, days - (start - START).days)))
                kind = rng.choices(("decline", "narrow", "key", "abrupt"),
                                   (0.35, 0.25, 0.25, 0.15))[0]
                truth.churned[account] = end
                {"decline": truth.decliners, "narrow": truth.narrowing,
                 "key": truth.key_droppers, "abrupt": truth.abrupt}[kind].add(account)
            last = min(end or START + timedelta(days=days), START + timedelta(days=days))
            day = start
            while day < last:
                rate = per_day
                if kind == "decline" and end is not None:
                    weeks_left = (end - day).days / 7
                    rate = per_day * min(1.0, max(0.0, (weeks_left - 0.5) / 5))
                late = end is not None and (end - day).days < 42
                narrowed = kind == "narrow" and late
                names = EVENT_NAMES[:1] if narrowed else EVENT_NAMES[: 3 + users % 4]
                weights = list(NAME_WEIGHTS[: len(names)])
                if kind == "key" and late:
                    weights[1] = 0  # no more reports; the same volume elsewhere
                for _ in range(_poisson(rng, rate * (0.8 if narrowed else 1.0))):
                    at = day + timedelta(seconds=rng.randrange(8 * 3600, 20 * 3600))
                    rows.append((at, account, rng.choices(names, weights)[0],
                                 f"{account}-u{rng.randrange(users)}"))
                day += timedelta(days=1)
            mrr = round(users * rng.choice((29, 49, 99)), 2)
            subs.writerow([account, start.date().isoformat(),
                           end.date().isoformat() if end else "", mrr,
                           "pro" if mrr > 300 else "starter"])
        rows.sort()
        for at, account, name, user in rows:
            events.writerow([account, at.strftime("%Y-%m-%d %H:%M:%S"), name, user])
    return truth


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: small rates only, which is all this needs.
    n, p, limit = 0, 1.0, pow(2.718281828459045, -lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return n
        n += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    truth = generate(args.directory, args.accounts, args.days, args.seed)
    print(f"wrote {args.directory}/events.csv and subscriptions.csv: {args.accounts} accounts, "
          f"{len(truth.churned)} churned ({len(truth.decliners)} after a decline)")


if __name__ == "__main__":
    main()
