"""Optional compiled build of the per-event core (everything else is in pyproject.toml).

With ``CHURNSIGNAL_COMPILE=1`` the modules below are compiled to C extensions by mypyc (part
of mypy): the same typed source, ~1.5x faster through the fold. It needs a C compiler and,
for mypy to see the dependencies' types, ``pip install --no-build-isolation`` into an
environment that has them and mypy (``make bench`` and the Dockerfile do this). Without the
variable the package is pure Python, as every editable install is: a compiled module in the
source tree would shadow edits to its ``.py`` file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

# Pure modules on the per-event path (no pydantic classes: mypyc compiles plain classes).
COMPILED = [
    "stream/alerts.py", "stream/clock.py", "stream/engine.py", "stream/features.py",
    "stream/fold.py", "stream/identity.py", "stream/model.py", "stream/packs.py",
    "stream/reasons.py", "stream/rows.py", "stream/scoring.py", "stream/state.py",
    "stream/store.py",
    "schemas/_util.py", "schemas/decode.py", "schemas/identity.py", "schemas/intercom.py",
    "schemas/segment.py", "schemas/stripe.py", "schemas/usage_lite.py", "schemas/zendesk.py",
]


def _extensions() -> list[object]:
    if os.environ.get("CHURNSIGNAL_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    # mypyc names modules by their place under packages: a tree shaped like the installed
    # package (churnsignal.stream is stream/), as `make typecheck` builds for mypy.
    here = Path(__file__).parent
    tree = here / "build" / "mypyc-src"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(here / "churnsignal", tree / "churnsignal",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("stream", "schemas", "sinks"):
        shutil.copytree(here / part, tree / "churnsignal" / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    paths = [str((tree / "churnsignal" / path).relative_to(here)) for path in COMPILED]
    return mypycify([f"--config-file={here / 'pyproject.toml'}", *paths], opt_level="3")


setup(ext_modules=_extensions())
