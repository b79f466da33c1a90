"""Chunked, verified, resumable blob transfers over MQTT, used in both directions.

The holder of a blob (`BlobServer`) publishes chunks only when asked; the receiver (`Download`)
asks for what it is missing, re-asks when progress stalls, verifies every chunk against the
manifest and the whole payload against its digest. Asking again after a reconnect is the resume:
only missing chunks travel again, and duplicates are ignored.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from typing import IO, Callable, Dict, List, Optional, Set

from edge.errors import ProtocolError
from edge.logs import log_event
from edge.wire import BlobManifest, make_manifest, sha256_hex

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]
ChunkTopic = Callable[[str, int], str]

SPOOL_TO_DISK_BYTES = 32 << 20


class TransferTimeout(Exception):
    """A transfer made no progress for longer than its timeout."""


class BlobServer:
    """Holds blobs this side offers and publishes requested chunks of them (thread-safe)."""

    def __init__(self, publish: Publish, chunk_size_bytes: int) -> None:
        self._publish = publish
        self._chunk_size_bytes = chunk_size_bytes
        self._blobs: Dict[str, bytes] = {}
        self._manifests: Dict[str, BlobManifest] = {}
        self._lock = threading.Lock()

    def offer(self, data: bytes, chunk_size_bytes: Optional[int] = None) -> BlobManifest:
        manifest = make_manifest(data, chunk_size_bytes or self._chunk_size_bytes)
        with self._lock:
            self._blobs[manifest.digest] = data
            self._manifests[manifest.digest] = manifest
        return manifest

    def has(self, digest: str) -> bool:
        with self._lock:
            return digest in self._blobs

    def withdraw(self, digest: str) -> None:
        with self._lock:
            self._blobs.pop(digest, None)
            self._manifests.pop(digest, None)

    def serve(self, digest: str, indices: List[int], topic_for: ChunkTopic) -> int:
        """Publish the requested chunks; returns the payload bytes sent. Unknown → ProtocolError."""
        with self._lock:
            data = self._blobs.get(digest)
            manifest = self._manifests.get(digest)
        if data is None or manifest is None:
            raise ProtocolError(f"no blob {digest[:12]} is offered here")
        sent = 0
        for index in sorted(set(indices)):
            if index >= manifest.chunk_count:
                raise ProtocolError(f"chunk {index} out of range (blob has {manifest.chunk_count})")
            start, end = manifest.chunk_range(index)
            self._publish(topic_for(digest, index), data[start:end])
            sent += end - start
        return sent


class Download:
    """Receives one blob: verifies chunks, tracks what is missing, re-asks on stalls."""

    def __init__(
        self,
        manifest: BlobManifest,
        request: Callable[[List[int]], None],
        max_size_bytes: int,
        retry_after_s: float = 5.0,
        timeout_s: float = 120.0,
    ) -> None:
        if manifest.size_bytes > max_size_bytes:
            raise ProtocolError(
                f"blob of {manifest.size_bytes} bytes exceeds the limit of {max_size_bytes}"
            )
        self.manifest = manifest
        self._request = request
        self._retry_after_s = retry_after_s
        self._timeout_s = timeout_s
        self._missing: Set[int] = set(range(manifest.chunk_count))
        self._buffer: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in result()
            max_size=SPOOL_TO_DISK_BYTES
        )
        self._last_progress_s = time.monotonic()
        self._last_request_s = 0.0
        self.bytes_received = 0
        self.duplicate_chunks = 0
        self.requests_sent = 0

    @property
    def complete(self) -> bool:
        return not self._missing

    def missing(self) -> List[int]:
        return sorted(self._missing)

    def start(self) -> None:
        self._ask(self.missing())

    def _ask(self, indices: List[int]) -> None:
        self._last_request_s = time.monotonic()
        self.requests_sent += 1
        self._request(indices)

    def add_chunk(self, index: int, payload: bytes) -> bool:
        """Store a verified chunk; False for a duplicate, ProtocolError for a bad one."""
        if not 0 <= index < self.manifest.chunk_count:
            raise ProtocolError(f"chunk index {index} out of range")
        self.bytes_received += len(payload)
        if index not in self._missing:
            self.duplicate_chunks += 1
            return False
        start, end = self.manifest.chunk_range(index)
        if len(payload) != end - start:
            raise ProtocolError(f"chunk {index} has {len(payload)} bytes, expected {end - start}")
        if sha256_hex(payload) != self.manifest.chunk_digests[index]:
            raise ProtocolError(f"chunk {index} digest mismatch")
        self._buffer.seek(start)
        self._buffer.write(payload)
        self._missing.discard(index)
        self._last_progress_s = time.monotonic()
        return True

    def poll(self) -> None:
        """Re-ask for missing chunks after a stall; TransferTimeout when stalled too long."""
        if self.complete:
            return
        now = time.monotonic()
        if now - self._last_progress_s > self._timeout_s:
            raise TransferTimeout(
                f"blob {self.manifest.digest[:12]}: {len(self._missing)} of "
                f"{self.manifest.chunk_count} chunks missing after {self._timeout_s:.0f} s"
            )
        if now - max(self._last_progress_s, self._last_request_s) > self._retry_after_s:
            log_event(
                logger,
                logging.INFO,
                "transfer.retry",
                digest=self.manifest.digest[:12],
                missing=len(self._missing),
            )
            self._ask(self.missing())

    def result(self) -> bytes:
        """The whole payload, verified against the manifest digest."""
        if not self.complete:
            raise ProtocolError("transfer incomplete")
        self._buffer.seek(0)
        data = self._buffer.read(self.manifest.size_bytes)
        self._buffer.close()
        if sha256_hex(data) != self.manifest.digest:
            raise ProtocolError("payload digest mismatch")
        return data
