"""Pool workers end with the process that started them.

A spawned worker whose parent is killed (`kill PID`, an OOM kill; Ctrl-C reaches the whole
process group, a signal to one process does not) is reparented and carries on: it trains to
the end of its run and keeps writing the run folder, which a resumed sweep or simulation then
writes too. So every pool worker (`spawned_pool`) calls `exit_with_parent` first, with the
parent's pid taken in the parent (the parent may already be gone when the worker starts). A
daemon thread polls `os.getppid()`; Linux's PR_SET_PDEATHSIG would be immediate but tracks the
parent *thread*, and ProcessPoolExecutor may spawn workers from its manager thread. The worker
exits without cleanup: run folders are written atomically and resume from their last checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional

from jetfed.edge.logs import log_event

logger = logging.getLogger(__name__)

PARENT_POLL_S = 0.5
EXIT_CODE_ORPHANED = 3


def exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this process as soon as `parent_pid` is no longer its parent."""

    def orphaned() -> bool:
        return os.getppid() != parent_pid

    def watch() -> None:
        while not orphaned():
            time.sleep(poll_s)
        log_event(logger, logging.WARNING, "worker.orphaned", parent_pid=parent_pid)
        os._exit(EXIT_CODE_ORPHANED)

    if orphaned():
        os._exit(EXIT_CODE_ORPHANED)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start_worker(parent_pid: int, setup: Optional[Callable[[], None]]) -> None:
    exit_with_parent(parent_pid)
    if setup is not None:
        setup()


def spawned_pool(workers: int, setup: Optional[Callable[[], None]] = None) -> ProcessPoolExecutor:
    """`workers` spawned processes (no torch state inherited) that end with this one; `setup`
    (a module-level function) runs first in each."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), setup),
    )
