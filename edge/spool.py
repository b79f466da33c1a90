"""A download's spool file, written at chunk offsets by one background writer thread.

A receiver's protocol thread verifies a chunk (sha256) and hands it here: storing chunk i then
overlaps verifying chunk i+1 and paho reading chunk i+2 (`os.pwrite` and `hashlib` both release
the GIL). Storing is the slow step where page-cache pages are expensive to come by (measured on
this project's VMs: ~300 MB/s for fresh pages against ~1.6 GB/s for sha256; docs/RESULTS.md), so
in series the two add up and in parallel the slower one sets the rate.

Invariant: at most `BACKLOG_CHUNKS` chunks wait for the writer in the whole process (one thread
for every spool), so memory beyond the receive window stays a few chunks however many
downloads are open; a writer that falls behind makes `write` wait. `flush` returns once every
chunk handed over is in the file (or raises the write's error). `close` never waits (it may run
anywhere, a garbage collection on the writer thread included): queued chunks of a closed spool
are dropped, and its descriptor is closed by whichever of `close` and the writer finishes last,
so no write ever lands on a closed or reused descriptor.

A closed spool's file is kept for the next download of the same size (`_POOL`, at most
`POOL_MAX_FILES` files and `POOL_MAX_BYTES` in all, deleted at exit): rewriting pages a file
already holds runs at ~3.5 GB/s on these VMs against 0.2–0.7 GB/s for a new file (the host
takes freed pages back within seconds), and a federation moves updates of one size every
round. A reused file is never read before it is rewritten: a download hands out its payload
only once every chunk has landed in it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import tempfile
import threading
from typing import List, Optional, Tuple

BACKLOG_CHUNKS = 4
POOL_MAX_FILES = 8
POOL_MAX_BYTES = 4 << 30


class _Writer:
    """The process's one writer thread, started on first use."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Tuple[Spool, bytes, int]] = queue.Queue(maxsize=BACKLOG_CHUNKS)
        self._started = False
        self._lock = threading.Lock()

    def put(self, spool: Spool, payload: bytes, offset: int) -> None:
        with self._lock:
            if not self._started:
                threading.Thread(target=self._run, name="spool-writer", daemon=True).start()
                self._started = True
        self._queue.put((spool, payload, offset))

    def _run(self) -> None:
        while True:
            spool, payload, offset = self._queue.get()
            spool._store(payload, offset)


_WRITER = _Writer()


class _Pool:
    """Spool files of finished downloads with their (folder, size), oldest first: when full,
    the oldest go (the newest is the likeliest to match the next round's download)."""

    def __init__(self) -> None:
        self._files: List[Tuple[Optional[str], int, str]] = []
        self._lock = threading.Lock()

    def take(self, spool_dir: Optional[str], size_bytes: int) -> Optional[str]:
        with self._lock:
            for index in range(len(self._files) - 1, -1, -1):
                if self._files[index][:2] == (spool_dir, size_bytes):
                    return self._files.pop(index)[2]
        return None

    def give(self, spool_dir: Optional[str], size_bytes: int, path: str) -> None:
        """Keep `path` for reuse; delete the oldest files beyond the pool's bounds."""
        if size_bytes > POOL_MAX_BYTES:
            _unlink(path)
            return
        with self._lock:
            self._files.append((spool_dir, size_bytes, path))
            evicted = []
            while len(self._files) > POOL_MAX_FILES or (
                sum(size for _, size, _ in self._files) > POOL_MAX_BYTES
            ):
                evicted.append(self._files.pop(0)[2])
        for old in evicted:
            _unlink(old)

    def holds(self, path: str) -> bool:
        with self._lock:
            return any(path == kept for _, _, kept in self._files)

    def clear(self) -> None:
        with self._lock:
            paths = [path for _, _, path in self._files]
            self._files.clear()
        for path in paths:
            _unlink(path)


def pooled(path: str) -> bool:
    """Whether `path` is a closed spool file kept for reuse (what a closed download leaves)."""
    return _POOL.holds(path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _reopen(path: Optional[str]) -> Tuple[int, str]:
    if path is not None:
        with contextlib.suppress(OSError):
            return os.open(path, os.O_RDWR), path
    return -1, ""


_POOL = _Pool()
atexit.register(_POOL.clear)


class Spool:
    """A temporary file of `size_bytes` filled at offsets in the background; back in the pool
    (or deleted) on close."""

    def __init__(self, size_bytes: int, spool_dir: Optional[str] = None) -> None:
        self._size_bytes, self._spool_dir = size_bytes, spool_dir
        self._fd, self.path = _reopen(_POOL.take(spool_dir, size_bytes))
        if self._fd < 0:  # none pooled, or someone deleted it (a temp-folder cleaner)
            self._fd, self.path = tempfile.mkstemp(prefix="jetfed-download-", dir=spool_dir)
            os.ftruncate(self._fd, size_bytes)
        self._pending = 0
        self._closing = False
        self._error: Optional[OSError] = None
        self._settled = threading.Condition()

    def write(self, payload: bytes, offset: int) -> None:
        """Queue `payload` for `offset` (waits while the backlog is full); an earlier write's
        error (a full disk) is raised here, at the latest by `flush`."""
        self._raise_error()
        with self._settled:
            self._pending += 1
        _WRITER.put(self, payload, offset)

    def _store(self, payload: bytes, offset: int) -> None:
        """On the writer thread: write all of `payload` unless closed, keep the first error."""
        try:
            view = memoryview(payload)
            while view and not self._closing and self._error is None:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            self._error = exc
        finally:
            with self._settled:
                self._pending -= 1
                if self._pending == 0 and self._closing:
                    self._close_fd()
                self._settled.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Wait until every chunk handed over is in the file."""
        with self._settled:
            self._settled.wait_for(lambda: self._pending == 0)
        self._raise_error()

    def close(self) -> None:
        """Close the file once no write is under way, then pool it (deleted if a write failed
        or the pool is full); idempotent."""
        with self._settled:
            self._closing = True
            if self._pending == 0:
                self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._error is None:
                _POOL.give(self._spool_dir, self._size_bytes, self.path)
            else:
                _unlink(self.path)
