"""Shared fixtures: a real broker for the session, and real worker processes.

The broker is KAFKA_BOOTSTRAP_SERVERS when set (CI points it at Apache Kafka), else a
testcontainers Kafka when a Docker engine answers, else the embedded Tansu broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from churnsignal.app.embedded import EmbeddedBroker


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    with EmbeddedBroker() as tansu:
        yield tansu.bootstrap


@pytest.fixture(scope="session")
def broker_kind() -> str:
    return "external" if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else "embedded"


def _compiled() -> bool:
    """Whether the core was built by mypyc (setup.py, CHURNSIGNAL_COMPILE=1)."""
    from churnsignal.stream import fold

    return not fold.__file__.endswith(".py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Apache Kafka pass (`make test-kafka`) runs only what touches a broker: a test
    marked offline (a replay, ClickHouse alone) has run in the embedded pass already.
    Against a compiled build (`make test-compiled`), tests that inject a fault by replacing
    a function of the core are skipped: compiled modules call each other directly, so the
    replacement is never called. They run against the pure-Python build (`make test`)."""
    if _compiled():
        skip = pytest.mark.skip(reason="replaces a core function, which compiled callers "
                                       "do not look up; run by `make test`")
        for item in items:
            if item.get_closest_marker("interpreted_only"):
                item.add_marker(skip)
    if not os.environ.get("CHURNSIGNAL_TEST_KAFKA_DIR"):
        return
    offline = [item for item in items if item.get_closest_marker("offline")]
    if offline:
        config.hook.pytest_deselected(items=offline)
        items[:] = [item for item in items if not item.get_closest_marker("offline")]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: object, ids: list[str]) -> None:
    """pytest-xdist schedules by node id: of tests sharing one (schemathesis' operations) it
    would run one and call the run passed. Refuse instead."""
    if twice := sorted(nodeid for nodeid, n in Counter(ids).items() if n > 1):
        raise pytest.UsageError(
            f"tests sharing a node id cannot run under pytest-xdist: {twice}; mark them serial "
            "and run them without -n (`make test` does: -m 'not serial', then -m serial)")


# What the tests measured, as each test's report carries it: under pytest-xdist the tests
# run in other processes, and only their reports reach the one that prints the summary. A
# test's report takes every line since the last report's, so lines from a module fixture's
# setup (before this fixture's) are not missed.
_FIGURES: list[str] = []
_REPORTED = [0]  # of helpers.FIGURES, in this process


@pytest.fixture(autouse=True)
def _figures_in_the_report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    helpers = sys.modules.get("tests.integration.helpers")  # not imported: no figures
    if helpers:
        request.node.user_properties.extend(
            ("figure", line) for line in helpers.FIGURES[_REPORTED[0]:])
        _REPORTED[0] = len(helpers.FIGURES)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        _FIGURES.extend(str(v) for k, v in report.user_properties if k == "figure")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
