"""`churnsignal import rates FILE`: the exchange rates a user provides, for one reporting currency.

A CSV with ``currency,rate[,valid_from]`` per line (a header line naming the columns is
allowed): ``rate`` is how many units of the reporting currency
(``CHURNSIGNAL_VIEWS__REPORTING_CURRENCY``) one unit of ``currency`` is worth, from
``valid_from`` (an ISO date; omitted: since always) until the currency's next row. The rows go
to ``currency_rates_data`` (ClickHouse), which ``mrr_monthly_reporting`` reads (the formula is
in ``sinks.ddl.currency_views``); loading a row with the same currency and date again replaces
it. Parsing is pure (``parse_rates``); nothing is loaded unless every line is valid.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from churnsignal.errors import ChurnsignalError
from churnsignal.sinks.ddl import RATE_SCALE

ALWAYS = date(1970, 1, 1)  # valid_from of a row that gives none
_CODE = re.compile(r"[a-z]{3}")
_MAX_RATE = Decimal(10) ** 12


class RatesError(ChurnsignalError):
    """A rates file that cannot be loaded as a whole (the line is named)."""


@dataclass(frozen=True, slots=True)
class Rate:
    currency: str
    valid_from: date
    rate: Decimal  # units of the reporting currency per unit of ``currency``


def parse_rates(text: str, reporting: str) -> list[Rate]:
    """The rates of a CSV text, for the reporting currency ``reporting``; RatesError names
    the first line that is not ``currency,rate[,valid_from]`` with a 3-letter code, a rate
    > 0 (at most 12 decimals are kept, rounded half up) and an ISO date. A row for the
    reporting currency itself must say 1 (it is its own unit); the same currency and date
    twice is an error (which one would be meant?)."""
    out: dict[tuple[str, date], Rate] = {}
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if n == 1 and cells[0].lower() == "currency":
            continue  # a header
        if len(cells) not in (2, 3):
            raise RatesError(f"line {n}: expected currency,rate[,valid_from], got {row!r}")
        currency = cells[0].lower()
        if not _CODE.fullmatch(currency):
            raise RatesError(f"line {n}: {cells[0]!r} is not a 3-letter ISO 4217 code")
        try:
            rate = Decimal(cells[1])
        except InvalidOperation:
            raise RatesError(f"line {n}: rate {cells[1]!r} is not a number") from None
        if not rate.is_finite() or rate <= 0 or rate >= _MAX_RATE:
            raise RatesError(f"line {n}: rate {cells[1]!r} must be > 0 and < 10^12")
        rate = rate.quantize(Decimal(1).scaleb(-RATE_SCALE), rounding=ROUND_HALF_UP)
        if rate <= 0:
            raise RatesError(f"line {n}: rate {cells[1]!r} is 0 at {RATE_SCALE} decimals")
        valid_from = ALWAYS
        if len(cells) == 3 and cells[2]:
            try:
                valid_from = date.fromisoformat(cells[2][:10])
            except ValueError:
                raise RatesError(f"line {n}: valid_from {cells[2]!r} is not an ISO date") \
                    from None
        if currency == reporting and rate != 1:
            raise RatesError(f"line {n}: {currency} is the reporting currency: its rate is 1")
        if (currency, valid_from) in out:
            raise RatesError(f"line {n}: a second rate for {currency} from {valid_from}")
        out[(currency, valid_from)] = Rate(currency, valid_from, rate)
    return sorted(out.values(), key=lambda r: (r.currency, r.valid_from))


def read_rates(path: Path, reporting: str) -> list[Rate]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RatesError(f"cannot read {path}: {exc}") from None
    return parse_rates(text, reporting)


def rows(rates: list[Rate], reporting: str, loaded_at: float) -> list[tuple[Any, ...]]:
    """``currency_rates_data`` rows (``sinks.ddl.RATES_COLUMNS``)."""
    at = datetime.fromtimestamp(loaded_at, tz=UTC)
    return [(reporting, r.currency, r.valid_from, r.rate, at) for r in rates]


def load(dsn: str, rates: list[Rate], reporting: str, loaded_at: float, views: Any) -> None:
    """The rates into ClickHouse (the embedded store must be free: stop the worker first)."""
    from churnsignal.app.forget_embedded import store_holder
    from churnsignal.sinks.clickhouse import ClickHouseSink

    if dsn.startswith("chdb://"):
        holder = store_holder(Path(dsn.removeprefix("chdb://")))
        if holder is not None:
            raise RatesError(f"the embedded ClickHouse is held by {holder} (a worker?): stop "
                             "it and load the rates again")
    sink = ClickHouseSink(dsn, views=views)
    try:
        refused = asyncio.run(sink.write({"currency_rates_data": rows(rates, reporting,
                                                                      loaded_at)}))
        if refused:
            raise RatesError(f"ClickHouse refused {len(refused)} rates: {refused[0].error}")
    finally:
        sink.close()
