"""Deterministic CUDA kernels: `jetfed edge run --deterministic` (JETFED_DETERMINISTIC=1).

On the CPU, a device's local round is already a pure function of the global state, its data and
its seed (tests/test_reproducibility.py). On CUDA some kernels are not: atomic adds in the
backward of embeddings and index/scatter ops, cuBLAS's split-K reductions over its workspaces,
cuDNN's autotuned algorithm choice, so two runs of one seed differ in the last bits. These
switches pick deterministic kernels instead. They cost speed, so they are off by default; turn
them on to compare runs bit for bit (method studies), not on a fleet in production. An op with
no deterministic kernel warns instead of failing the round (`warn_only`).
"""

from __future__ import annotations

import os

CUBLAS_WORKSPACE_CONFIG = ":4096:8"
"""cuBLAS is deterministic with this workspace layout (CUDA ≥ 10.2); read when cuBLAS starts, so
it must be set before the first matrix product on the GPU."""


def use_deterministic_kernels() -> None:
    """Switch this process to deterministic kernels (before any model is built)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
