"""Tensors as safetensors bytes on the wire: encoded in a wire dtype, decoded only after their
names, shapes, dtypes and finiteness are checked. No pickle, ever."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from jetfed.edge.errors import ProtocolError

if TYPE_CHECKING:
    import torch

WIRE_DTYPES = ("fp32", "fp16", "bf16")
TensorSpec = Mapping[str, Tuple[int, ...]]


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_tensor_names(expected: Iterable[str], names: Iterable[str]) -> None:
    """ProtocolError naming the first missing and unexpected tensor names, if they differ."""
    missing = sorted(set(expected) - set(names))
    unknown = sorted(set(names) - set(expected))
    if missing or unknown:
        raise ProtocolError(f"tensor names differ: missing {missing[:3]}, unexpected {unknown[:3]}")


def encode_tensors(tensors: Mapping[str, torch.Tensor], dtype: str = "fp32") -> bytes:
    """safetensors bytes of `tensors` cast to the wire dtype (contiguous CPU copies)."""
    from safetensors.torch import save

    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} is not one of {WIRE_DTYPES}")
    target = _torch_dtype(dtype)
    prepared = {
        name: tensor.detach().to("cpu", target).contiguous() for name, tensor in tensors.items()
    }
    return bytes(save(prepared))


def decode_tensors(
    data: bytes, expected: Optional[TensorSpec] = None, allow_dtypes: Sequence[str] = WIRE_DTYPES
) -> Dict[str, torch.Tensor]:
    """Parse safetensors bytes into fp32 tensors, refusing anything not exactly as expected."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ProtocolError(f"not a valid safetensors payload: {exc}") from None
    allowed = {_torch_dtype(name) for name in allow_dtypes}
    if expected is not None:
        check_tensor_names(expected, tensors)
    decoded: Dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in allowed:
            raise ProtocolError(f"tensor {name} has dtype {tensor.dtype}, allowed {allow_dtypes}")
        if expected is not None and tuple(tensor.shape) != tuple(expected[name]):
            raise ProtocolError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}"
            )
        as_fp32 = tensor.to(torch.float32)
        if not bool(torch.isfinite(as_fp32).all()):
            raise ProtocolError(f"tensor {name} contains NaN or Inf")
        decoded[name] = as_fp32
    return decoded


def tensor_spec(tensors: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}
