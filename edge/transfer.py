"""Chunked, verified, resumable blob transfers over MQTT, used in both directions.

The holder of a blob (`BlobServer`) publishes chunks only when asked; the receiver (`Download`)
asks for what it is missing, re-asks when progress stalls and verifies every chunk against the
manifest, which verifies the whole payload: the manifest's digest is the sha256 of the chunk
digests (checked when it is parsed), so each byte is hashed once on each side, when its chunk
is hashed. Asking again after a reconnect is the resume:
only missing chunks travel again, and duplicates are ignored.

Memory stays at one window per receiver whatever the payload size (KB adapters to GB models):
big blobs are served from files (`offer_file`, `offer_tensors`) read one chunk at a time, a
download hands each verified chunk to its spool file on disk (`jetfed.edge.spool`: written on a
background thread, a few chunks of backlog), and a receiver keeps only a window
of asked-for-but-not-received data in flight (in the broker, both MQTT clients and the receiver's
inbox), asking for more as chunks land. Blobs of at most `MEMORY_PAYLOAD_BYTES` (LoRA adapters of
small models) skip the files on both sides: offered as bytes, downloaded into a buffer.

Speed is the depth of that window: each ask costs a round trip through the broker and the
holder's process, so a shallow window leaves the link idle between batches (measured on a loaded
loopback Mosquitto: with 8 MiB an ask took ~47 ms to come back as chunks; docs/RESULTS.md). A
receiver pulling several blobs at once (the coordinator, five uploads) shares one `SharedWindow`
among them: a lone transfer gets the whole depth, five together hold no more in flight than one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Union,
)

from jetfed.edge.errors import ProtocolError
from jetfed.edge.logs import log_event
from jetfed.edge.spool import Spool
from jetfed.edge.tensorfile import (
    MEMORY_PAYLOAD_BYTES,
    Payload,
    read_payload,
    tensor_file_bytes,
    tensor_file_size,
    write_tensor_file,
)
from jetfed.edge.wire import BlobManifest, make_manifest, manifest_of_chunks, sha256_hex

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]
ChunkTopic = Callable[[str, int], str]

DEFAULT_WINDOW_BYTES = 32 << 20
"""Asked-for, not yet received data per download (or per receiver, shared): deep enough to
hide the ask → chunk round trip on a loaded loopback link."""
MIN_WINDOW_CHUNKS = 2


class TransferTimeout(Exception):
    """A transfer made no progress for longer than its timeout."""


def manifest_of_file(
    path: str, chunk_size_bytes: int, content: str = "safetensors"
) -> BlobManifest:
    """The manifest of a file on disk, read one chunk at a time (one hash pass)."""
    digests: List[str] = []
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size_bytes)
            if chunk or not digests:  # an empty payload is one empty chunk, as in make_manifest
                digests.append(sha256_hex(chunk))
            if len(chunk) < chunk_size_bytes:
                break
    return manifest_of_chunks(digests, os.path.getsize(path), chunk_size_bytes, content)


@dataclass
class _Offered:
    """One offered blob: in memory (`data`) or in a file (`fd`, deleted on withdraw if owned)."""

    manifest: BlobManifest
    data: Optional[bytes] = None
    path: Optional[str] = None
    fd: Optional[int] = None
    owned: bool = False

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.fd is not None
        return os.pread(self.fd, end - start, start)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.owned and self.path is not None:
            _unlink_quietly(self.path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class BlobServer:
    """Holds blobs this side offers and publishes requested chunks of them (thread-safe).

    With `background=True`, `serve` checks a request and returns at once; a worker thread reads
    and publishes the chunks. Requests arrive on paho's network thread, which must get back to
    writing: serving inline there leaves the socket idle while chunks are read and packed."""

    def __init__(
        self,
        publish: Publish,
        chunk_size_bytes: int,
        spool_dir: Optional[str] = None,
        background: bool = False,
    ) -> None:
        self._publish = publish
        self._chunk_size_bytes = chunk_size_bytes
        self._spool_dir = spool_dir
        self._offered: Dict[str, _Offered] = {}
        self._lock = threading.Lock()
        self.chunks_served = 0
        self._requests: Optional[queue.Queue[Tuple[str, List[int], ChunkTopic]]] = None
        if background:
            self._requests = queue.Queue()
            threading.Thread(target=self._serve_requests, name="blob-server", daemon=True).start()

    def _add(self, blob: _Offered) -> BlobManifest:
        with self._lock:
            previous = self._offered.get(blob.manifest.digest)
            if previous is not None:
                blob.release()
                return previous.manifest
            self._offered[blob.manifest.digest] = blob
        return blob.manifest

    def offer(self, data: bytes, chunk_size_bytes: Optional[int] = None) -> BlobManifest:
        """Offer bytes held in memory (small blobs: adapters, exchange payloads)."""
        manifest = make_manifest(data, chunk_size_bytes or self._chunk_size_bytes)
        return self._add(_Offered(manifest, data=data))

    def offer_file(
        self, path: str, chunk_size_bytes: Optional[int] = None, owned: bool = False
    ) -> BlobManifest:
        """Offer a file, served one chunk at a time; `owned` files are deleted on withdraw."""
        manifest = manifest_of_file(path, chunk_size_bytes or self._chunk_size_bytes)
        return self._add(_Offered(manifest, path=path, fd=os.open(path, os.O_RDONLY), owned=owned))

    def offer_tensors(
        self,
        tensors: Mapping[str, torch.Tensor],
        dtype: str = "fp32",
        chunk_size_bytes: Optional[int] = None,
    ) -> BlobManifest:
        """Encode `tensors` (in memory up to `MEMORY_PAYLOAD_BYTES`, else to a spool file one
        tensor at a time) and offer them."""
        if tensor_file_size(tensors, dtype) <= MEMORY_PAYLOAD_BYTES:
            return self.offer(tensor_file_bytes(tensors, dtype), chunk_size_bytes)
        handle, path = tempfile.mkstemp(prefix="jetfed-blob-", dir=self._spool_dir)
        os.close(handle)
        try:
            write_tensor_file(path, tensors, dtype)
            return self.offer_file(path, chunk_size_bytes, owned=True)
        except BaseException:
            _unlink_quietly(path)
            raise

    def payload(self, digest: str) -> Payload:
        """An offered blob's bytes or the path of its file (valid until it is withdrawn)."""
        with self._lock:
            blob = self._offered[digest]
        if blob.data is not None:
            return blob.data
        assert blob.path is not None
        return blob.path

    def has(self, digest: str) -> bool:
        with self._lock:
            return digest in self._offered

    def withdraw(self, digest: str) -> None:
        with self._lock:
            blob = self._offered.pop(digest, None)
            if blob is not None:
                blob.release()

    def serve(self, digest: str, indices: List[int], topic_for: ChunkTopic) -> int:
        """Publish the requested chunks; returns their payload bytes. Unknown → ProtocolError."""
        wanted = sorted(set(indices))
        with self._lock:
            blob = self._offered.get(digest)
            if blob is None:
                raise ProtocolError(f"no blob {digest[:12]} is offered here")
            count = blob.manifest.chunk_count
            if wanted and wanted[-1] >= count:
                raise ProtocolError(f"chunk {wanted[-1]} out of range (blob has {count})")
            spans = [blob.manifest.chunk_range(index) for index in wanted]
        if self._requests is not None:
            self._requests.put((digest, wanted, topic_for))
        else:
            self._publish_chunks(digest, wanted, topic_for)
        return sum(end - start for start, end in spans)

    def _publish_chunks(self, digest: str, indices: List[int], topic_for: ChunkTopic) -> None:
        for index in indices:
            with self._lock:  # withdraw() may close the file between chunks
                blob = self._offered.get(digest)
                if blob is None:
                    return
                chunk = blob.read(*blob.manifest.chunk_range(index))
                self.chunks_served += 1
            self._publish(topic_for(digest, index), chunk)

    def _serve_requests(self) -> None:
        assert self._requests is not None
        while True:
            digest, indices, topic_for = self._requests.get()
            try:
                self._publish_chunks(digest, indices, topic_for)
            except Exception as exc:  # a failed publish must not stop serving other requests
                log_event(logger, logging.WARNING, "blob.serve_failed", reason=exc)


class SharedWindow:
    """One receiver's in-flight budget, split evenly among its open downloads (each keeps at
    least `MIN_WINDOW_CHUNKS`). A download that finishes or closes hands its share back to the
    others as their next chunks land; owned by one thread, like the downloads."""

    def __init__(self, budget_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._open: Set[int] = set()

    def join(self, download: Download) -> None:
        self._open.add(id(download))

    def leave(self, download: Download) -> None:
        self._open.discard(id(download))

    def share_bytes(self) -> int:
        return self.budget_bytes // max(1, len(self._open))


class Download:
    """Receives one blob into a file (into memory up to `memory_bytes`): verifies chunks, tracks
    what is missing, re-asks on stalls.

    With `window_bytes`, at most that much is asked for and not yet received at any time (more is
    asked for as chunks land); with a `SharedWindow`, this download's share of it; with None,
    everything missing is asked for at once. A chunk failing its checks is asked for again at
    once. Call `close()` when done (deletes the file).
    """

    def __init__(
        self,
        manifest: BlobManifest,
        request: Callable[[List[int]], None],
        max_size_bytes: int,
        retry_after_s: float = 5.0,
        timeout_s: float = 120.0,
        window_bytes: Union[int, SharedWindow, None] = DEFAULT_WINDOW_BYTES,
        spool_dir: Optional[str] = None,
        memory_bytes: int = MEMORY_PAYLOAD_BYTES,
    ) -> None:
        if manifest.size_bytes > max_size_bytes:
            raise ProtocolError(
                f"blob of {manifest.size_bytes} bytes exceeds the limit of {max_size_bytes}",
                "blob_too_large",
            )
        self.manifest = manifest
        self._request = request
        self._retry_after_s = retry_after_s
        self._timeout_s = timeout_s
        count = manifest.chunk_count
        self._window = window_bytes
        self._missing: Set[int] = set(range(count))
        self._in_flight: Set[int] = set()
        self._not_asked: Deque[int] = deque(range(count))
        self._buffer: Optional[bytearray] = None
        self._spool: Optional[Spool] = None
        self.path = ""
        if manifest.size_bytes <= memory_bytes:
            self._buffer = bytearray(manifest.size_bytes)
        else:
            self._spool = Spool(manifest.size_bytes, spool_dir)
            self.path = self._spool.path
        self._last_progress_s = time.monotonic()
        self._last_request_s = 0.0
        self.bytes_received = 0
        self.duplicate_chunks = 0
        self.rejected_chunks = 0
        self.requests_sent = 0
        self.chunks_requested = 0
        self.retries_without_progress = 0
        """Re-asks since the last chunk landed: at most timeout_s / retry_after_s."""

    @property
    def complete(self) -> bool:
        return not self._missing

    def missing(self) -> List[int]:
        return sorted(self._missing)

    def start(self) -> None:
        if isinstance(self._window, SharedWindow):
            self._window.join(self)
        self._fill()

    def _window_chunks(self) -> int:
        if self._window is None:
            return self.manifest.chunk_count
        window_bytes = (
            self._window.share_bytes() if isinstance(self._window, SharedWindow) else self._window
        )
        return max(MIN_WINDOW_CHUNKS, window_bytes // self.manifest.chunk_size_bytes)

    def _leave_window(self) -> None:
        if isinstance(self._window, SharedWindow):
            self._window.leave(self)

    def _ask(self, indices: List[int]) -> None:
        self._last_request_s = time.monotonic()
        self.requests_sent += 1
        self.chunks_requested += len(indices)
        self._request(indices)

    def _fill(self) -> None:
        """Ask for more chunks once at most half the window is still in flight."""
        window_chunks = self._window_chunks()
        if len(self._in_flight) > window_chunks // 2:
            return
        fresh: List[int] = []
        while self._not_asked and len(self._in_flight) + len(fresh) < window_chunks:
            index = self._not_asked.popleft()
            if index in self._missing:
                fresh.append(index)
        if fresh:
            self._in_flight.update(fresh)
            self._ask(fresh)

    def add_chunk(self, index: int, payload: bytes) -> bool:
        """Store a verified chunk; False for a duplicate, ProtocolError (after asking for it
        again) for a bad one."""
        if not 0 <= index < self.manifest.chunk_count:
            raise ProtocolError(f"chunk index {index} out of range")
        self.bytes_received += len(payload)
        if index not in self._missing:
            self.duplicate_chunks += 1
            return False
        start, end = self.manifest.chunk_range(index)
        problem = ""
        if len(payload) != end - start:
            problem = f"chunk {index} has {len(payload)} bytes, expected {end - start}"
        elif sha256_hex(payload) != self.manifest.chunk_digests[index]:
            problem = f"chunk {index} digest mismatch"
        if problem:
            self.rejected_chunks += 1
            self._in_flight.add(index)
            self._ask([index])
            raise ProtocolError(problem, "bad_chunk")
        if self._buffer is not None:
            self._buffer[start : start + len(payload)] = payload
        elif self._spool is not None:
            self._spool.write(payload, start)
        self._missing.discard(index)
        self._in_flight.discard(index)
        self._last_progress_s = time.monotonic()
        self.retries_without_progress = 0
        if self._missing:
            self._fill()
        else:
            self._leave_window()
        return True

    def poll(self) -> None:
        """Re-ask for missing chunks after a stall; TransferTimeout when stalled too long."""
        if self.complete:
            return
        now = time.monotonic()
        if now - self._last_progress_s > self._timeout_s:
            raise TransferTimeout(self._stall_text())
        if now - max(self._last_progress_s, self._last_request_s) > self._retry_after_s:
            self.retries_without_progress += 1
            log_event(
                logger,
                logging.INFO,
                "transfer.retry",
                digest=self.manifest.digest[:12],
                missing=len(self._missing),
            )
            self._in_flight &= self._missing
            if self._in_flight:
                self._ask(sorted(self._in_flight))
            else:
                self._fill()

    def _stall_text(self) -> str:
        """Why a transfer stalls, in one line. A broker drops a publish above its size limit
        without a word (MQTT 3.1.1 has no way to say so), which looks exactly like a holder
        that went away: both are named, with the size that would have to pass."""
        largest = max(end - start for start, end in map(self.manifest.chunk_range, self._missing))
        return (
            f"blob {self.manifest.digest[:12]}: {len(self._missing)} of "
            f"{self.manifest.chunk_count} chunks missing after {self._timeout_s:.0f} s without "
            f"progress (asked again {self.retries_without_progress} times): the holder is gone, "
            f"or the broker drops messages of {largest} bytes (a size limit below the chunk "
            "size: Mosquitto message_size_limit, NATS max_payload, EMQX max_packet_size; lower "
            "transfer.chunk_size_bytes or raise the limit)"
        )

    def payload(self) -> Payload:
        """The whole payload: its bytes (a download held in memory) or the path of the file
        holding it. Every chunk was verified, so the whole is too (the manifest's digest is over
        the chunk digests, checked when it was parsed)."""
        if not self.complete:
            raise ProtocolError("transfer incomplete")
        if self._buffer is not None:
            return bytes(self._buffer)
        assert self._spool is not None
        self._spool.flush()
        return self.path

    def result(self) -> bytes:
        """The whole payload in memory, verified (small blobs; big ones: `payload`)."""
        return read_payload(self.payload())

    def close(self) -> None:
        """Delete the spool file (or buffer) and hand back the window share (idempotent)."""
        self._leave_window()
        self._buffer = None
        if self._spool is not None:
            self._spool.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
