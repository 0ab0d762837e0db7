"""``python -m churnsignal``: the same command line as the ``churnsignal`` script."""

from churnsignal.app.cli import main

main()
