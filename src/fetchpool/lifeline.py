"""Child processes that never outlive their parent, and leave stopping to it. Bottom layer.

Every process fetchpool starts (fetch workers, CPU-stage workers) calls :func:`follow_parent`
first thing. It does two things (RELIABILITY.md cases 41 and 46):

* **Signals are the parent's to handle.** Ctrl-C reaches the whole foreground process group,
  and ``kill -TERM -PGID`` the whole group too; a worker killed by either would turn the items
  it holds into failures. Workers ignore SIGINT and SIGTERM; the parent decides whether to
  finish or cancel, and stops its workers itself (SIGKILL when it must).
* **A parent that dies takes its workers along.** Ignoring signals must not leave a worker
  running when its parent is killed with SIGKILL (or calls ``os._exit``): on Linux the kernel
  sends the worker SIGKILL when the parent goes (``PR_SET_PDEATHSIG``); everywhere a daemon
  thread also checks every :data:`POLL_SECONDS` that the parent is still the one it started
  with, and exits the process if not.

So a parent stops its workers with SIGKILL (or by closing their pipe), never with
``terminate()``; a parent that exits without stopping them kills them at exit
(``engine/backends/processes.ProcessFetchPool``), since multiprocessing's own exit hook would
terminate and then wait.

``PR_SET_PDEATHSIG`` fires when the *thread* that started the child ends. fetchpool starts
workers from threads that outlive them (the run loop, the CPU stage's supervisor), which stop
their workers before they end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

#: How often a worker checks that its parent is alive (where the kernel cannot tell it).
POLL_SECONDS = 0.25
_PR_SET_PDEATHSIG = 1


def follow_parent(parent_pid: int) -> None:
    """Make this process ignore SIGINT/SIGTERM and end when ``parent_pid`` ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before we could ask to follow it
        os._exit(1)
    watcher = threading.Thread(
        target=_watch, args=(parent_pid,), name="fetchpool-lifeline", daemon=True
    )
    watcher.start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    os._exit(1)
