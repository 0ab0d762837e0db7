"""`churnsignal worker` whose ClickHouse inserts fail while a flag file exists.

Faults are injected at the client boundary (clickhouse-connect's ``Client.insert``, which the
chdb backend inherits), so everything above it — sink retries, back-pressure, offsets — is
the production code. Run as ``python -m tests.integration.faulty_worker worker``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

FLAG = Path(os.environ["CHURNSIGNAL_TEST_CLICKHOUSE_DOWN"])
_insert = Client.insert


def _failing_insert(self: Any, *args: Any, **kwargs: Any) -> Any:
    if FLAG.exists():
        raise ConnectionRefusedError("injected fault: ClickHouse unreachable")
    return _insert(self, *args, **kwargs)


Client.insert = _failing_insert  # type: ignore[method-assign]

if __name__ == "__main__":
    from churnsignal.app.cli import main

    main()
