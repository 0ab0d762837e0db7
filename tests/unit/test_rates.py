"""Rates files (`churnsignal import rates`), the reporting view's options, and `migrate` taking
the view settings it is given rather than reading the environment."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from churnsignal.app.settings import ViewSettings, load_settings
from churnsignal.errors import ConfigError
from churnsignal.offline.rates import ALWAYS, Rate, RatesError, parse_rates
from churnsignal.sinks import ddl
from churnsignal.sinks.clickhouse import migrate


def test_a_rates_file_with_and_without_dates() -> None:
    text = ("currency,rate,valid_from\nEUR,1.10\neur, 1.2 ,2026-09-01\n\n# a comment\n"
            "jpy,0.0065,2026-09-01T00:00\n")
    assert parse_rates(text, "usd") == [
        Rate("eur", ALWAYS, Decimal("1.100000000000")),
        Rate("eur", date(2026, 9, 1), Decimal("1.2")),
        Rate("jpy", date(2026, 9, 1), Decimal("0.0065"))]
    # more than 12 decimals: rounded half up at 12
    [r] = parse_rates("eur,0.0000000000005", "usd")
    assert r.rate == Decimal("0.000000000001")


@pytest.mark.parametrize(("text", "message"), [
    ("eur", "line 1: expected"),
    ("euro,1", "not a 3-letter"),
    ("eur,abc", "not a number"),
    ("eur,0", "must be > 0"),
    ("eur,-2", "must be > 0"),
    ("eur,nan", "must be > 0"),
    ("eur,0.0000000000001", "is 0 at 12 decimals"),
    ("eur,1,2026-13-01", "not an ISO date"),
    ("eur,1.1\neur,1.2", "line 2: a second rate for eur"),
    ("usd,0.9", "usd is the reporting currency"),
])
def test_a_bad_line_is_named_and_nothing_is_loaded(text: str, message: str) -> None:
    with pytest.raises(RatesError, match=message):
        parse_rates(text, "usd")


def test_the_reporting_currency_setting() -> None:
    assert ViewSettings().reporting_currency is None
    assert ViewSettings.model_validate({"reporting_currency": " EUR "}).reporting_currency == "eur"
    assert ViewSettings.model_validate({"reporting_currency": ""}).reporting_currency is None
    with pytest.raises(ValueError, match="pattern"):
        ViewSettings.model_validate({"reporting_currency": "euro"})


def test_minor_units_as_stripe_counts_them() -> None:
    assert [ddl.minor_units(c) for c in ("usd", "eur", "jpy", "krw", "kwd")] == [
        100, 100, 1, 1, 1000]


def test_the_reporting_view_is_empty_without_a_currency_and_names_it_with_one() -> None:
    unset = ddl.currency_views(None)[-1]
    assert "WHERE '' != ''" in unset
    usd = ddl.currency_views("usd")[-1]
    assert "'usd' AS reporting_currency" in usd and "WHERE 'usd' != ''" in usd
    with pytest.raises(ValueError, match="not a 3-letter"):
        ddl.currency_views("us'd")


class Recorder:
    """A ClickHouse client that records the statements it is given."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def command(self, sql: str) -> None:
        self.statements.append(sql)


def _views(client: Recorder) -> str:
    return "\n".join(s for s in client.statements if "account_timeline AS" in s
                     or "mrr_monthly_reporting AS" in s)


def test_migrate_uses_the_view_settings_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # the environment says otherwise: what the caller passes wins
    monkeypatch.setenv("CHURNSIGNAL_VIEWS__PAST_DUE_CHURN_DAYS", "99")
    monkeypatch.setenv("CHURNSIGNAL_VIEWS__REPORTING_CURRENCY", "gbp")
    given = Recorder()
    names = migrate(given, 400, ViewSettings(past_due_churn_days=7, reporting_currency="eur"))
    views = _views(given)
    assert "INTERVAL 7 DAY" in views and "INTERVAL 99 DAY" not in views
    assert "'eur' AS reporting_currency" in views and "'gbp'" not in views
    assert "CREATE OR REPLACE VIEW mrr_monthly_reporting" in names
    # unset in the settings passed: no past-due rule and an empty reporting view, whatever
    # the environment says
    plain = Recorder()
    migrate(plain, 400, ViewSettings())
    assert "INTERVAL 99 DAY" not in _views(plain) and "WHERE '' != ''" in _views(plain)
    # the behaviour of `churnsignal migrate` is kept: its settings come from the environment
    from_cli = Recorder()
    migrate(from_cli, 400, load_settings().views)
    assert "INTERVAL 99 DAY" in _views(from_cli) and "'gbp' AS reporting_currency" in _views(
        from_cli)
    # a caller without settings (views=None) reads the environment as the settings would
    legacy = Recorder()
    migrate(legacy, 400)
    assert legacy.statements == from_cli.statements


def test_the_migrate_command_passes_its_settings(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """`churnsignal migrate` hands migrate() its settings' views (not the environment's)."""
    from typer.testing import CliRunner

    from churnsignal.app import cli
    from churnsignal.sinks import clickhouse

    seen: dict[str, Any] = {}

    def fake_migrate(client: Any, ttl_days: int = 400, views: Any = None) -> list[str]:
        seen.update(ttl_days=ttl_days, views=views)
        return ["CREATE TABLE x"]

    settings = load_settings(views=ViewSettings(past_due_churn_days=3, reporting_currency="chf"),
                             state_dir=tmp_path)
    monkeypatch.setattr(cli, "load_settings", lambda: settings)
    monkeypatch.setattr(clickhouse, "migrate", fake_migrate)
    monkeypatch.setattr(clickhouse, "connect", lambda dsn: object())
    monkeypatch.delenv("CHURNSIGNAL_VIEWS__PAST_DUE_CHURN_DAYS", raising=False)
    result = CliRunner().invoke(cli.cli, ["migrate"])
    assert result.exit_code == 0, result.output
    assert seen["views"].past_due_churn_days == 3 and seen["views"].reporting_currency == "chf"


def test_an_invalid_reporting_currency_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNSIGNAL_VIEWS__REPORTING_CURRENCY", "dollars")
    with pytest.raises(ConfigError, match="REPORTING_CURRENCY"):
        load_settings()


def test_imported_amounts_are_in_the_minor_units_of_their_currency(tmp_path: Path) -> None:
    """A yen has no cents, a Kuwaiti dinar has 1000 fils: imported MRR is counted as Stripe
    (and so the live stream) counts it, which the reporting view's conversion relies on."""
    from churnsignal.offline.importer import ImportSummary, snapshots, stripe_export_subscription

    path = tmp_path / "subs.csv"
    path.write_text("account_id,start_date,end_date,mrr,currency\n"
                    "a-usd,2025-01-01,,49.99,usd\n"
                    "a-jpy,2025-01-01,,5000,JPY\n"
                    "a-kwd,2025-01-01,,12.345,kwd\n"
                    "a-none,2025-01-01,,10,\n")
    events = snapshots(path, 1_767_225_600.0, ImportSummary())
    assert {e["account_id"]: e["data"]["mrr_cents"] for e in events} == {
        "a-usd": 4_999, "a-jpy": 5_000, "a-kwd": 12_345, "a-none": 1_000}
    row = {"id": "sub_1", "Customer ID": "cus_1", "Status": "active", "Amount": "5,000",
           "Currency": "jpy", "Interval": "month", "Start Date (UTC)": "2025-01-01 00:00"}
    assert stripe_export_subscription(row)["items"]["data"][0]["price"]["unit_amount"] == 5_000
    assert stripe_export_subscription({**row, "Currency": "usd", "Amount": "49.00"})[
        "items"]["data"][0]["price"]["unit_amount"] == 4_900
    assert stripe_export_subscription({**row, "Amount": "inf"})["items"]["data"] == []
