"""Handing freed heap memory back to the OS, where a process frees a lot at once.

glibc keeps freed memory mapped: tensors below its mmap threshold (which rises to 32 MB once a
large block is freed: every weight of SmolLM2 but the embedding) live on the heap, and chunk
buffers in paho's thread's arena. A coordinator that frees a full model's state (the copy
folded into the evaluation model, ~0.3 GB of it left resident after a SmolLM2 round) or a burst
of chunks would stack the next allocations on top of it. `malloc_trim(0)` returns every free
page, wherever it lies in the heap.
"""

from __future__ import annotations

import contextlib
import ctypes


def release_freed_memory() -> None:
    """malloc_trim(0) (glibc only; elsewhere nothing happens)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
