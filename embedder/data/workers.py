"""Reader processes end with their run.

A DataLoader worker blocked in a long wait (a download's Retry-After, a slow server, a read on a
hung network file system) does not look at its parent until the wait ends, so a run killed with
SIGKILL would leave it behind. `die_with_parent`, the readers' worker_init_fn, asks Linux to
send the worker SIGKILL the moment its parent process ends (prctl PR_SET_PDEATHSIG), and
checks that the parent did not already end between the fork and that request.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(worker_id: int | None = None) -> bool:
    """In a child process: be killed when the parent ends. True where the kernel took the request
    (Linux); elsewhere False, and torch's own watchdog ends the worker at its next batch."""
    from multiprocessing import parent_process

    parent = parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent.pid:  # the parent ended before the request: nobody would send the signal
        os._exit(1)
    return True
