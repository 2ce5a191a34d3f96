"""Child processes that do not outlive their parent."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child process that must not outlive the one starting it: Linux sends
    the child SIGTERM when its parent dies, however it dies (``kill -9``, the OOM killer). Without
    it a killed ``trackly run`` left its services holding their ports, and the next ``trackly run``
    failed to start. None where there is no such thing (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            # Popen raises SubprocessError in the parent: better than a child without the guarantee.
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the call: nothing will signal us
            os._exit(1)

    return preexec
