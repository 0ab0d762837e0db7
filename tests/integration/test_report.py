"""`churnsignal report` writes a self-contained page whose charts draw in headless Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from churnsignal.sinks.clickhouse import ClickHouseSink
from tests.integration.test_business_views import (
    NOV_20,
    hundred_customers,
    with_late_cancellation,
)

pytestmark = pytest.mark.integration

CHARTS = 5


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CHURNSIGNAL_REQUIRE_CHROMIUM"):
        pytest.fail("chromium is required here (CI installs Debian's chromium package)")
    return found


def test_report_is_self_contained_and_its_charts_draw(tmp_path: Path) -> None:
    chromium = _chromium()
    dsn = f"chdb://{tmp_path / 'ch'}"
    history = hundred_customers()
    with_late_cancellation(history)  # an alert for the reasons chart
    sink = ClickHouseSink(dsn)
    asyncio.run(sink.write(history.rows(wall=NOV_20)))
    sink.close()

    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "churnsignal", "report", "--out", str(out),
                           "--dsn", dsn], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert not re.search(r"<script[^>]+src=", page), "must not load scripts from the network"
    assert page.count('class="plotly-graph-div"') == CHARTS
    assert "late" in page  # the at-risk accounts table

    if chromium is None:
        pytest.skip("chromium not installed: the page was checked, not rendered")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=15000", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    # Plotly marks a div js-plotly-plot and fills it with SVG once the chart has drawn.
    assert dom.count("js-plotly-plot") >= CHARTS, dom[:2000]
    assert dom.count('class="main-svg"') >= CHARTS
