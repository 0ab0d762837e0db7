"""`churnsignal worker` whose ingest process cannot start: its module is missing, as after a
bad install, and the restarts back off from 0.2 s instead of 1 s so the test is short.
Everything else is the production code. Run as
``python -m tests.integration.crashing_ingest_worker worker``
(with ``CHURNSIGNAL_INGEST__SEPARATE_PROCESS=true``).
"""

from __future__ import annotations

from churnsignal.app import ingest_process

ingest_process.CHILD_MODULE = "churnsignal.app.no_such_ingest_module"
ingest_process.RESTART_FIRST_S = 0.2

if __name__ == "__main__":
    from churnsignal.app.cli import main

    main()
