"""The stop signals the command line received (``server/cli.py`` records
them), shared with the code that installs handlers of its own."""
from __future__ import annotations

signalled: list[int] = []


def stop_requested() -> bool:
    """A stop signal came, even if its KeyboardInterrupt was swallowed: one
    raised inside an import's module-lock callback (or a __del__) is
    printed as "Exception ignored" and lost, and the command went on. A
    command that installs handlers of its own asks this first."""
    return bool(signalled)
