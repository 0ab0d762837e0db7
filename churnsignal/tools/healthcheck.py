"""The container image's HEALTHCHECK: ``python -m churnsignal.tools.healthcheck``.

One image runs every command, so the check asks the command the container runs (PID 1's
arguments, the image's ``ENTRYPOINT ["churnsignal"]`` plus its ``CMD``) which port to probe:

- ``gateway``: ``/healthz`` on ``CHURNSIGNAL_GATEWAY__PORT`` (8000);
- ``worker`` and ``notify``: ``/healthz`` on ``CHURNSIGNAL_WEB_PORT`` (6066);
- anything else (``migrate``, ``query``, ``sync stripe``, ...) serves nothing: healthy while it
  runs.

Exit 0 when healthy, 1 otherwise (what Docker's HEALTHCHECK reads). Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

WEB_COMMANDS = frozenset({"worker", "notify"})


def command_of(argv: Sequence[str]) -> str | None:
    """The churnsignal command in a process's arguments (``.../churnsignal gateway`` or
    ``python -m churnsignal gateway``), or None when it runs something else."""
    for i, arg in enumerate(argv):
        if Path(arg).name == "churnsignal" or (arg == "churnsignal" and i and argv[i - 1] == "-m"):
            rest = [a for a in argv[i + 1:] if not a.startswith("-")]
            return rest[0] if rest else None
    return None


def port_for(command: str | None, env: Mapping[str, str]) -> int | None:
    """The port whose /healthz tells whether ``command`` is healthy; None: nothing to probe."""
    if command == "gateway":
        return int(env.get("CHURNSIGNAL_GATEWAY__PORT") or 8000)
    if command in WEB_COMMANDS:
        return int(env.get("CHURNSIGNAL_WEB_PORT") or 6066)
    return None


def healthy(port: int | None, timeout: float = 2.0) -> bool:
    if port is None:
        return True
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",  # noqa: S310
                                    timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def main(pid: int = 1) -> int:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        argv = []
    return 0 if healthy(port_for(command_of([a for a in argv if a]), os.environ)) else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
