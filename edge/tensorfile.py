"""Tensor payloads as safetensors FILES, written and read one tensor (or a few rows) at a time.

A full model's state is ~91 MB (MiniLM) to several GB; holding a second encoded copy in memory
next to the decoded one is what breaks small devices and a coordinator receiving many updates.
`write_tensor_file` streams each tensor to disk cast to the wire dtype; `TensorFile` validates a
received file (names, shapes, dtypes, finite values; refused with ProtocolError like
`jetfed.edge.tensor_codec.decode_tensors`) and then reads tensors lazily, as a read-only mapping.

A payload of at most `MEMORY_PAYLOAD_BYTES` (a LoRA adapter of a small model) is the exception:
it stays in memory as bytes (`Payload`), encoded by `tensor_file_bytes`, read by `TensorFile`
straight from them. Its file would cost more than its data (creating, writing, reading and
unlinking a 50 KB spool file took ~1 ms here, ten times the data's own decoding), and it is no
bigger than one chunk at the default chunk size.

Wire dtypes: fp32, fp16, bf16, and int8 (per-row scales, `jetfed.edge.compression`), which stores
each tensor as int8 under its name plus its scales under `name + SCALE_SUFFIX`, and says so in the
safetensors metadata. The wire dtype applies to floating tensors; integer tensors (token indices
of kd's top-k payloads, `jetfed.edge.topk`) travel as they are, uint16 or int32, and a receiver
accepts them only when it allows those dtypes (`INDEX_DTYPES`); they are read as exact fp32 values
(every integer below 2^24) and take no part in the finiteness check or the L2 norm.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from typing import (
    IO,
    TYPE_CHECKING,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from jetfed.edge.compression import dequantize_int8, quantize_int8, scale_shape
from jetfed.edge.errors import ProtocolError
from jetfed.edge.tensor_codec import check_tensor_names

if TYPE_CHECKING:
    import torch

    from jetfed.edge.tensor_codec import TensorSpec

FLOAT_DTYPES = ("fp32", "fp16", "bf16")
UPDATE_DTYPES = (*FLOAT_DTYPES, "int8")
INDEX_DTYPES = ("uint16", "int32")
SCALE_SUFFIX = ":scale"
COMPRESSION_KEY = "jetfed.compression"
Readable = Union[io.FileIO, io.BytesIO]
"""A file, or a whole file read into memory (`TensorFile.whole`)."""
Payload = Union[str, bytes]
"""A safetensors payload: the path of its file, or its bytes (one of `MEMORY_PAYLOAD_BYTES`)."""
MEMORY_PAYLOAD_BYTES = 1 << 20
"""Payloads up to this size are held in memory, not spooled to files (offered, downloaded and
read): a coordinator holding N accepted uploads holds at most N MiB of them."""
ROW_BLOCK_BYTES = 2 << 20
_ST_DTYPES = {
    "fp32": "F32",
    "fp16": "F16",
    "bf16": "BF16",
    "int8": "I8",
    "uint16": "U16",
    "int32": "I32",
}
_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U16": 2, "I32": 4}
_INDEX_ST_DTYPES = {_ST_DTYPES[name] for name in INDEX_DTYPES}
_WIRE_DTYPE_OF = {stored: wire for wire, stored in _ST_DTYPES.items()}


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "int8": torch.int8,
        "uint16": torch.uint16,
        "int32": torch.int32,
    }[name]


def _index_dtype(tensor: torch.Tensor) -> Optional[str]:
    """The wire name of an integer tensor's dtype (None for floating tensors)."""
    if tensor.is_floating_point():
        return None
    for name in INDEX_DTYPES:
        if tensor.dtype == _torch_dtype(name):
            return name
    raise ValueError(f"integer tensors travel as {INDEX_DTYPES}, not {tensor.dtype}")


def _entries(
    tensors: Mapping[str, torch.Tensor], dtype: str
) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """(stored name, wire dtype, shape) of every tensor the file will hold, in file order."""
    entries: List[Tuple[str, str, Tuple[int, ...]]] = []
    for name, tensor in tensors.items():
        shape = tuple(tensor.shape)
        index_dtype = _index_dtype(tensor)
        entries.append((name, index_dtype or dtype, shape))
        if dtype == "int8" and index_dtype is None:
            entries.append((name + SCALE_SUFFIX, "fp32", scale_shape(shape)))
    return entries


def _header(entries: List[Tuple[str, str, Tuple[int, ...]]], dtype: str) -> bytes:
    header: Dict[str, object] = {"__metadata__": {"format": "pt", COMPRESSION_KEY: dtype}}
    offset = 0
    for name, wire_dtype, shape in entries:
        st_dtype = _ST_DTYPES[wire_dtype]
        size = math.prod(shape) * _ITEM_BYTES[st_dtype]
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _in_name_order(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: tensors[name] for name in sorted(tensors)}


def tensor_file_size(tensors: Mapping[str, torch.Tensor], dtype: str = "fp32") -> int:
    """The size in bytes of `write_tensor_file`'s file of `tensors`, without encoding them."""
    entries = _entries(_in_name_order(tensors), dtype)
    data = sum(math.prod(shape) * _ITEM_BYTES[_ST_DTYPES[wire]] for _, wire, shape in entries)
    return len(_header(entries, dtype)) + data


def _write_tensors(handle: IO[bytes], tensors: Mapping[str, torch.Tensor], dtype: str) -> int:
    """Only one converted tensor exists at a time, so memory stays at the caller's own copy.
    Tensors are written in name order: the same state always gives the same bytes and digest
    (a resumed coordinator re-offers exactly the global state devices already hold)."""
    import torch

    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} is not one of {UPDATE_DTYPES}")
    tensors = _in_name_order(tensors)
    handle.write(_header(_entries(tensors, dtype), dtype))
    for tensor in tensors.values():
        if _index_dtype(tensor) is not None:
            parts: Tuple[torch.Tensor, ...] = (tensor.detach().to("cpu"),)
        elif dtype == "int8":
            parts = quantize_int8(tensor)
        else:
            parts = (tensor.detach().to("cpu", _torch_dtype(dtype)),)
        for part in parts:
            flat = part.contiguous().reshape(-1).view(torch.uint8)
            handle.write(flat.numpy().data)
    return handle.tell()


def write_tensor_file(path: str, tensors: Mapping[str, torch.Tensor], dtype: str = "fp32") -> int:
    """Write `tensors` cast to the wire `dtype` as a safetensors file; returns its size in bytes."""
    with open(path, "wb") as handle:
        return _write_tensors(handle, tensors, dtype)


def tensor_file_bytes(tensors: Mapping[str, torch.Tensor], dtype: str = "fp32") -> bytes:
    """`write_tensor_file`'s exact bytes, in memory (payloads of `MEMORY_PAYLOAD_BYTES`)."""
    buffer = io.BytesIO()
    _write_tensors(buffer, tensors, dtype)
    return buffer.getvalue()


def read_payload(payload: Payload) -> bytes:
    """A payload's bytes, from memory or from its file."""
    if isinstance(payload, bytes):
        return payload
    with open(payload, "rb") as handle:
        return handle.read()


class TensorFile(Mapping[str, "torch.Tensor"]):
    """A validated safetensors payload read lazily as fp32 tensors: `tf[name]`,
    `tf.row_blocks(name)`.

    Construction refuses anything not exactly as expected (ProtocolError); afterwards every read
    is of data already checked. A file must stay on disk while the mapping is used; one of at most
    `MEMORY_PAYLOAD_BYTES` is read once, whole (one open instead of one per tensor)."""

    def __init__(
        self,
        payload: Payload,
        expected: Optional[TensorSpec] = None,
        allow_dtypes: Sequence[str] = FLOAT_DTYPES,
    ) -> None:

        if isinstance(payload, str) and os.path.getsize(payload) <= MEMORY_PAYLOAD_BYTES:
            payload = read_payload(payload)
        self._payload = payload
        self.compression = self._read_header(expected, allow_dtypes)
        self.l2_norm = math.sqrt(self._checked_sum_of_squares())
        """Global L2 norm over every tensor (as fp32 values), found while checking them."""

    def _checked_sum_of_squares(self) -> float:
        """Σ x² (fp64) over every floating value, refusing NaN and Inf. An in-memory payload of
        fp32 tensors only (a global state, an uncompressed update) is one fp32 array: checked
        in one pass (a pass per tensor cost ~80 µs of torch calls each, most of a small
        adapter's decoding); a NaN found there is named by the per-tensor pass."""
        import torch

        if (
            isinstance(self._payload, bytes)
            and len(self._payload) > self._data_start
            and all(dtype == "F32" for dtype, _ in self._stored.values())
        ):
            values = torch.frombuffer(
                bytearray(self._payload[self._data_start :]), dtype=torch.float32
            )
            if bool(torch.isfinite(values).all()):
                return float(torch.linalg.vector_norm(values, dtype=torch.float64)) ** 2
        squares = 0.0
        for name in self._shapes:
            if self.is_index(name):
                continue
            for _, block in self.row_blocks(name):
                self._check_finite(name, block)
                # fp64 accumulation without an fp64 copy of the block (3x cheaper than .double())
                squares += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
        return squares

    def _read_header(self, expected: Optional[TensorSpec], allow_dtypes: Sequence[str]) -> str:
        from safetensors import deserialize, safe_open

        try:  # safetensors checks the layout; names, dtypes and shapes are read from the header
            if isinstance(self._payload, bytes):
                deserialize(self._payload)
            else:
                with safe_open(self._payload, framework="pt"):
                    pass
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise ProtocolError(f"not a valid safetensors payload: {exc}") from None
        with self._open() as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None) or {}
        stored = {  # in name order, as safetensors lists them
            name: (str(entry["dtype"]), tuple(entry["shape"]))
            for name, entry in sorted(header.items())
        }
        compression = metadata.get(COMPRESSION_KEY, "")
        if compression == "int8" and "int8" not in allow_dtypes:
            raise ProtocolError(f"int8 payloads are not accepted here (allowed {allow_dtypes})")
        quantized = compression == "int8"
        shapes = {
            n: s for n, (_, s) in stored.items() if not (quantized and n.endswith(SCALE_SUFFIX))
        }
        if expected is not None:
            check_tensor_names(expected, shapes)
        allowed = {_ST_DTYPES[d] for d in allow_dtypes if d in (*FLOAT_DTYPES, *INDEX_DTYPES)}
        for name, shape in shapes.items():
            st_dtype = stored[name][0]
            if st_dtype in _INDEX_ST_DTYPES:
                if st_dtype not in allowed:
                    raise ProtocolError(
                        f"tensor {name} has dtype {st_dtype}, allowed {allow_dtypes}"
                    )
            elif quantized:
                scales = stored.get(name + SCALE_SUFFIX)
                if st_dtype != "I8" or scales != ("F32", scale_shape(shape)):
                    raise ProtocolError(f"tensor {name} is not int8 with fp32 per-row scales")
            elif st_dtype not in allowed:
                raise ProtocolError(f"tensor {name} has dtype {st_dtype}, allowed {allow_dtypes}")
            if expected is not None and shape != tuple(expected[name]):
                raise ProtocolError(
                    f"tensor {name} has shape {shape}, expected {tuple(expected[name])}"
                )
        self._shapes: Dict[str, Tuple[int, ...]] = shapes
        self._stored = stored
        self._data_start = 8 + length
        self._offsets = {name: int(header[name]["data_offsets"][0]) for name in stored}
        return "int8" if quantized else ""

    def is_index(self, name: str) -> bool:
        """Whether tensor `name` is stored as integers (uint16 or int32)."""
        return self._stored[name][0] in _INDEX_ST_DTYPES

    @staticmethod
    def _check_finite(name: str, block: torch.Tensor) -> None:
        import torch

        if not bool(torch.isfinite(block).all()):
            raise ProtocolError(f"tensor {name} contains NaN or Inf")

    def row_blocks(
        self, name: str, max_bytes: int = ROW_BLOCK_BYTES
    ) -> Iterator[Tuple[int, torch.Tensor]]:
        """(first row, fp32 rows) of tensor `name`, at most ~`max_bytes` of fp32 at a time.

        Plain reads, not a memory map: a mapped file's touched pages count as resident until
        it is unmapped, which would put a whole tensor back in memory."""
        with self._open() as handle:
            for start, end in row_ranges(self._shapes[name], max_bytes):
                yield start, self._read(handle, name, start, end)

    def whole(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, fp32 tensor) of every tensor, from one read of the file: for small payloads
        read many times over (a thousand LoRA uploads), where a read per tensor costs more than
        the data."""
        if isinstance(self._payload, bytes):
            data = io.BytesIO(self._payload)
        else:
            data = io.BytesIO(read_payload(self._payload))
        for name, shape in self._shapes.items():
            yield name, self._read(data, name, 0, shape[0] if len(shape) >= 2 else 0)

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of `name` as fp32 (the whole tensor when it has no rows)."""
        with self._open() as handle:
            return self._read(handle, name, start, end)

    def _open(self) -> Readable:
        """The payload to read from: its bytes, or its file (unbuffered)."""
        if isinstance(self._payload, bytes):
            return io.BytesIO(self._payload)
        return open(self._payload, "rb", buffering=0)

    def _read(self, handle: Readable, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of `name` as fp32 (the whole tensor when it has no rows)."""
        import torch

        shape = self._shapes[name]
        if len(shape) < 2:
            values = self._raw(handle, name, 0, math.prod(shape), shape)
            scale_span: Tuple[int, int, Tuple[int, ...]] = (0, 1, (1,))
        else:
            row = math.prod(shape[1:])
            values = self._raw(
                handle, name, start * row, (end - start) * row, (end - start, *shape[1:])
            )
            scale_span = (start, end - start, (end - start,))
        if self.compression == "int8" and not self.is_index(name):
            return dequantize_int8(values, self._raw(handle, name + SCALE_SUFFIX, *scale_span))
        return values.to(torch.float32)

    def _raw(
        self, handle: Readable, stored: str, first: int, count: int, shape: Tuple[int, ...]
    ) -> torch.Tensor:
        """`count` elements of stored tensor `stored` from element `first`, as stored."""
        import torch

        st_dtype = self._stored[stored][0]
        item = _ITEM_BYTES[st_dtype]
        dtype = _torch_dtype(_WIRE_DTYPE_OF[st_dtype])
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(count * item)
        handle.seek(self._data_start + self._offsets[stored] + first * item)
        if handle.readinto(buffer) != len(buffer):
            raise ProtocolError(f"tensor {stored} is truncated")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        if name not in self._shapes:
            raise KeyError(name)
        blocks = [block for _, block in self.row_blocks(name, max_bytes=1 << 62)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def __contains__(self, name: object) -> bool:
        """From the header (Mapping's own would read the whole tensor)."""
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def spec(self) -> Dict[str, Tuple[int, ...]]:
        return dict(self._shapes)


def refuse_index_tensors(tensors: TensorFile) -> None:
    """An update of weights has no integer tensors: refuse one (what most strategies check)."""
    for name in tensors:
        if tensors.is_index(name):
            raise ProtocolError(f"tensor {name} holds integers, not weights", "invalid_tensors")


def row_ranges(shape: Sequence[int], max_bytes: int = ROW_BLOCK_BYTES) -> Iterator[Tuple[int, int]]:
    """[start, end) row ranges of ~`max_bytes` of fp32 each; one range (0, 1) for tensors
    without rows (fewer than 2 dimensions), which are always read whole."""
    if len(shape) < 2:
        yield 0, 1
        return
    row_bytes = 4 * math.prod(shape[1:])
    step = max(1, max_bytes // max(row_bytes, 1))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def read_rows(tensors: Mapping[str, torch.Tensor], name: str, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of one tensor as fp32, from a TensorFile or an in-memory mapping."""
    import torch

    if isinstance(tensors, TensorFile):
        return tensors.rows(name, start, end)
    tensor = tensors[name].to(torch.float32)
    return tensor[start:end] if tensor.dim() >= 2 else tensor


def whole_tensors(tensors: Mapping[str, torch.Tensor]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) of every tensor: one read of a TensorFile's file, or the mapping's."""
    import torch

    if isinstance(tensors, TensorFile):
        yield from tensors.whole()
    else:
        for name, tensor in tensors.items():
            yield name, tensor.to(torch.float32)


def row_blocks(
    tensors: Mapping[str, torch.Tensor], name: str, max_bytes: int = ROW_BLOCK_BYTES
) -> Iterator[Tuple[int, torch.Tensor]]:
    """(first row, fp32 rows) of one tensor: a few MB at a time from a TensorFile (rows only for
    tensors with 2+ dimensions), the whole tensor from an in-memory mapping."""
    import torch

    if isinstance(tensors, TensorFile):
        yield from tensors.row_blocks(name, max_bytes)
    else:
        yield 0, tensors[name].to(torch.float32)


def tensor_shape(tensors: Mapping[str, torch.Tensor], name: str) -> Tuple[int, ...]:
    """The shape of one tensor without reading it from disk."""
    if isinstance(tensors, TensorFile):
        return tensors.spec()[name]
    return tuple(tensors[name].shape)
