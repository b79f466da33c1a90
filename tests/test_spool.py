"""The spool writer: chunks land at their offsets, errors surface, close never blocks or leaks."""

from __future__ import annotations

import os
import resource
import signal
import threading
from pathlib import Path
from typing import Iterator, List

import pytest

from jetfed.edge import spool as spool_module
from jetfed.edge.spool import BACKLOG_CHUNKS, Spool


def test_chunks_written_out_of_order_read_back_in_place(tmp_path: Path) -> None:
    chunks = [bytes([i]) * 1000 for i in range(7)]
    spool = Spool(7 * 1000 - 300, str(tmp_path))
    for index in (3, 0, 6, 1, 5, 2, 4):
        spool.write(chunks[index][: 700 if index == 6 else 1000], index * 1000)
    spool.flush()
    assert Path(spool.path).read_bytes() == b"".join(chunks)[:6700]
    spool.close()
    spool.close()


def test_a_closed_spool_file_serves_the_next_download_of_its_size(tmp_path: Path) -> None:
    """Rewriting a file's pages is several times faster than filling a new file on these VMs:
    the next same-size download gets the file back, never another size or folder."""
    first = Spool(4096, str(tmp_path))
    first.write(b"a" * 4096, 0)
    first.flush()
    first.close()
    (tmp_path / "other").mkdir()
    other_size, other_dir = Spool(2048, str(tmp_path)), Spool(4096, str(tmp_path / "other"))
    again = Spool(4096, str(tmp_path))
    assert again.path == first.path != other_size.path and other_dir.path != first.path
    again.write(b"b" * 4096, 0)
    again.flush()
    assert Path(again.path).read_bytes() == b"b" * 4096
    for spool in (again, other_size, other_dir):
        spool.close()
    spool_module._POOL.clear()
    assert not any(os.path.exists(s.path) for s in (again, other_size, other_dir))


class HeldWriter:
    """The writer thread held inside each write until `go_on` is set (`released` records, per
    write, whether the test released it rather than the 30 s safety timeout)."""

    def __init__(self) -> None:
        self.go_on = threading.Event()
        self.released: List[bool] = []


@pytest.fixture
def held_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWriter]:
    held = HeldWriter()
    real_pwrite = os.pwrite

    def held_pwrite(fd: int, data: bytes, offset: int) -> int:
        held.released.append(held.go_on.wait(30))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(spool_module.os, "pwrite", held_pwrite)
    yield held
    held.go_on.set()


def test_close_with_writes_queued_returns_at_once_and_drops_them(
    tmp_path: Path, held_writer: HeldWriter
) -> None:
    """close may run from a garbage collection on the writer thread itself: it must not wait
    for the writer (which is held until after close returned)."""
    spool = Spool(BACKLOG_CHUNKS * 10, str(tmp_path))
    for index in range(BACKLOG_CHUNKS):
        spool.write(b"x" * 10, index * 10)
    spool.close()
    held_writer.go_on.set()
    spool.flush()  # the queued writes settle; the descriptor is closed by the last of them
    assert spool._fd == -1
    # at most the write already under way ran (released by the test, not by the timeout)
    assert held_writer.released in ([], [True])


def test_a_failed_write_is_raised_by_flush_and_the_next_write(tmp_path: Path) -> None:
    spool = Spool(3 << 20, str(tmp_path))
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # writes past 1 MiB: EFBIG
    try:
        spool.write(b"y" * 1000, 2 << 20)
        with pytest.raises(OSError):
            spool.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    with pytest.raises(OSError):
        spool.write(b"z" * 1000, 0)
    spool.close()
    assert not os.path.exists(spool.path)  # a file that failed a write is not reused
