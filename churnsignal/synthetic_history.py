"""``python -m churnsignal.synthetic_history``: the documented entry point, kept where it was.

The generator lives in ``churnsignal.offline.synthetic_history``."""

from churnsignal.offline.synthetic_history import *  # noqa: F403
from churnsignal.offline.synthetic_history import main

if __name__ == "__main__":
    main()
