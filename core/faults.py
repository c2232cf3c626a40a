"""Crash injection for the crash-safety tests: ``OLAB_CRASH_AFTER=flow:step``.

When the variable names the step just finished, the process kills itself
with SIGKILL, as a power cut or an OOM kill would, leaving everything as it
was at that instant. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "OLAB_CRASH_AFTER"


def checkpoint(flow: str, step: str) -> None:
    if os.environ.get(VARIABLE) == f"{flow}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
