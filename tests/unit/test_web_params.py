"""/api parameters are checked before use, and the bearer token in constant time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from churnsignal.app.web import (
    AT_MAX,
    BadParameter,
    bearer_problem,
    check_account_id,
    check_params,
    parse_at,
)

NOW = 1_764_000_000.0


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity", "-1e400", "1e400",
                                 "", " ", "abc", "0x10", "1_000", "1e", ".", "--1", "1,5",
                                 "\u0661\u0662\u0663",  # Arabic-Indic digits: float() takes them
                                 "1" * 65, "-1", "4102444801", "1764000000000",  # milliseconds
                                 "1e300"])
def test_bad_at_is_a_400_with_the_reason(raw: str) -> None:
    with pytest.raises(BadParameter) as err:
        parse_at(raw, NOW)
    assert err.value.parameter == "at"
    assert "at must be" in str(err.value)


def test_milliseconds_get_a_hint() -> None:
    with pytest.raises(BadParameter, match="milliseconds"):
        parse_at("1764000000000", NOW)


@pytest.mark.parametrize(("raw", "value"), [(None, NOW), ("1764000000", 1_764_000_000.0),
                                            ("1764000000.5", 1_764_000_000.5),
                                            (" 1.764e9 ", 1_764_000_000.0), ("0", 0.0),
                                            ("+12", 12.0), (str(int(AT_MAX)), AT_MAX)])
def test_good_at(raw: str | None, value: float) -> None:
    assert parse_at(raw, NOW) == value


@pytest.mark.parametrize("raw", ["", "~stripe:cus_1", "a" * 201, "acme\x00", "ac\nme", "a\x7f",
                                 "a\u0085", "bad\udcff"])
def test_bad_account_ids(raw: str) -> None:
    with pytest.raises(BadParameter) as err:
        check_account_id(raw)
    assert err.value.parameter == "account_id"


@pytest.mark.parametrize("raw", ["acme", "a" * 200, "Acme Inc.", "kunde-ä-ß", "org_42/x"])
def test_good_account_ids(raw: str) -> None:
    assert check_account_id(raw) == raw


def test_unknown_and_repeated_parameters_are_refused() -> None:
    assert check_params([("at", "1")], {"at"}) == {"at": "1"}
    assert check_params([], ()) == {}
    with pytest.raises(BadParameter, match="unknown parameter 'when'"):
        check_params([("when", "1")], {"at"})
    with pytest.raises(BadParameter, match="more than once"):
        check_params([("at", "1"), ("at", "2")], {"at"})
    with pytest.raises(BadParameter, match=r"accepted: none"):
        check_params([("x" * 1000, "")], ())


TOKEN = b"0123456789abcdef0123456789abcdef"


def test_a_configured_token_is_always_required() -> None:
    for open_ in (True, False):  # on loopback too
        assert bearer_problem(f"Bearer {TOKEN.decode()}", TOKEN, open_) is None
        assert bearer_problem(f"bearer  {TOKEN.decode()} ", TOKEN, open_) is None
        assert bearer_problem(None, TOKEN, open_) == ("missing bearer token "
                                                      "(Authorization: Bearer TOKEN)")
        assert bearer_problem("Bearer", TOKEN, open_) is not None
        assert bearer_problem(f"Basic {TOKEN.decode()}", TOKEN, open_) is not None
        assert bearer_problem("Bearer wrong", TOKEN, open_) == "invalid bearer token"
        assert bearer_problem(f"Bearer {TOKEN.decode()}x", TOKEN, open_) == "invalid bearer token"
        assert bearer_problem(f"Bearer {TOKEN.decode()[:-1]}\udcff", TOKEN, open_) is not None
        assert bearer_problem("Bearer \u00e9" * 3, TOKEN, open_) is not None


def test_without_a_token_the_api_is_open_only_on_loopback() -> None:
    assert bearer_problem(None, None, True) is None
    assert bearer_problem("Bearer anything", None, True) is None
    problem = bearer_problem(f"Bearer {TOKEN.decode()}", None, False)
    assert problem is not None and "CHURNSIGNAL_API_TOKEN" in problem


class _App:
    """Just enough of a Faust app to collect the views and the timer register_views makes."""

    def __init__(self) -> None:
        self.pages: dict[str, Any] = {}
        self.timers: list[Any] = []

    def page(self, path: str) -> Callable[[Any], Any]:
        def add(fun: Any) -> Any:
            self.pages[path] = fun
            return fun
        return add

    def timer(self, interval: float) -> Callable[[Any], Any]:
        def add(fun: Any) -> Any:
            self.timers.append(fun)
            return fun
        return add


class _View:
    def json(self, value: object, *, status: int = 200, headers: dict[str, str] | None = None,
             **kwargs: object) -> tuple[int, object, dict[str, str]]:
        return status, value, headers or {}


class _Request:
    def __init__(self, query: dict[str, str] | None = None, auth: str | None = None) -> None:
        from multidict import CIMultiDict, MultiDict

        self.query = MultiDict(query or {})
        self.headers = CIMultiDict({"Authorization": auth} if auth else {})


def _views(monkeypatch: pytest.MonkeyPatch, liveness: Any = None, **env: str) -> _App:
    from types import SimpleNamespace

    from churnsignal.app.settings import load_settings
    from churnsignal.app.web import register_views

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = _App()
    rt = SimpleNamespace(app=app, settings=load_settings(), store=SimpleNamespace(peek=lambda a: None))
    if liveness is not None:
        rt.liveness = liveness
    register_views(rt)  # type: ignore[arg-type]
    return app


async def test_healthz_reports_a_stall_from_the_runtime_liveness(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from churnsignal.app.health import Liveness

    assert await _views(monkeypatch).pages["/healthz"](_View(), _Request()) == (
        200, {"status": "ok"}, {})  # not wired yet: tolerated
    liveness = Liveness(now=time.monotonic() - 1000)
    app = _views(monkeypatch, liveness, CHURNSIGNAL_HEALTH__STALL_S="60")
    status, body, _ = await app.pages["/healthz"](_View(), _Request())
    assert status == 200 and body["status"] == "ok" and body["reason"] == "idle"
    liveness.waiting(1, now=time.monotonic() - 100)
    status, body, _ = await app.pages["/healthz"](_View(), _Request())
    assert status == 503 and body["status"] == "stalled" and "agent stuck" in body["reason"]
    liveness.outage("clickhouse", True, now=time.monotonic())
    assert (await app.pages["/healthz"](_View(), _Request()))[0] == 200
    await app.timers[0]()  # the loop heartbeat
    assert liveness.last_beat is not None


async def test_api_views_check_the_token_first_then_the_parameters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    token = TOKEN.decode()
    app = _views(monkeypatch, CHURNSIGNAL_API_TOKEN=token)
    account = app.pages["/api/accounts/{account_id}"]
    status, body, headers = await account(_View(), _Request({"at": "nan"}), account_id="acme")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await account(_View(), _Request({"at": "nan"}, f"Bearer {token}"),
                                    account_id="acme")
    assert status == 400 and body["parameter"] == "at" and "at must be" in body["error"]
    status, body, _ = await account(_View(), _Request({}, f"Bearer {token}"), account_id="acme")
    assert status == 404 and body["error"] == "unknown account"
    monkeypatch.delenv("CHURNSIGNAL_API_TOKEN")
    app = _views(monkeypatch, CHURNSIGNAL_WEB_HOST="0.0.0.0")  # no token, not loopback
    status, body, _ = await app.pages["/api/summary"](_View(), _Request())
    assert status == 401 and "CHURNSIGNAL_API_TOKEN" in body["error"]
