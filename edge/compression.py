"""Lossy compression of update deltas for the wire: int8 with one fp32 scale per row.

A delta's rows (output channels, embedding rows) differ in range by orders of magnitude, so one
scale per tensor would flush most rows to zero; one scale per row costs 4 bytes per row (~1 % of
a 384-wide row) and keeps slicing by rows trivial, which the streaming reader relies on. Scales
are max|row| / 127 (symmetric, round to nearest): the error per element is at most scale / 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    import torch

INT8_MAX = 127


def scale_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """One scale per row for tensors with rows, one for the whole tensor otherwise."""
    return (shape[0],) if len(shape) >= 2 else (1,)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)


def quantize_int8(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 values shaped like `tensor`, fp32 scales shaped `scale_shape(tensor.shape)`)."""
    import torch

    rows = _as_rows(tensor.detach().to("cpu", torch.float32))
    scales = rows.abs().amax(dim=1) / INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(rows / safe.unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values.reshape(tensor.shape), scales.reshape(scale_shape(tuple(tensor.shape)))


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 tensor from int8 `values` and their per-row (or single) `scales`."""
    import torch

    rows = _as_rows(values).to(torch.float32)
    return (rows * scales.to(torch.float32).reshape(-1, 1)).reshape(values.shape)
