"""tegrastats subprocess: works on every Jetson without the jtop service (root not required)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import List, Optional

from jetfed.edge.telemetry.backends.base import Backend, BackendUnavailable
from jetfed.edge.telemetry.memory import MemoryProbe
from jetfed.edge.telemetry.rails import module_power_w
from jetfed.edge.telemetry.samples import Sample
from jetfed.edge.telemetry.tegrastats_parse import parse_line


class TegrastatsBackend(Backend):
    """Runs `tegrastats --interval N` and turns each printed line into a sample.

    The line's own timestamp has one-second resolution, so samples are stamped with the
    monotonic clock when the line arrives (tegrastats flushes each line as it prints it).
    """

    name = "tegrastats"
    polled = False

    def __init__(
        self,
        interval_ms: int = 100,
        command: Optional[List[str]] = None,
        memory: Optional[MemoryProbe] = None,
    ) -> None:
        super().__init__(memory)
        self.interval_ms = interval_ms
        self.command = command
        self._process: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None
        self._pending: List[Sample] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        command = self.command
        if command is None:
            binary = shutil.which("tegrastats")
            if binary is None:
                raise BackendUnavailable("tegrastats not found on PATH")
            command = [binary, "--interval", str(self.interval_ms)]
        try:
            self._process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as exc:
            raise BackendUnavailable(f"cannot start tegrastats: {exc}") from exc
        self._reader = threading.Thread(target=self._read_lines, name="tegrastats", daemon=True)
        self._reader.start()

    def _read_lines(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            parsed = parse_line(line)
            if not parsed.rails_w:
                continue
            rails = dict(parsed.rails_w)
            sample = self._host_sample(dict(rails), module_power_w(rails))
            if parsed.ram_used_bytes is not None:
                sample.system_used_bytes = parsed.ram_used_bytes
            with self._lock:
                self._pending.append(sample)

    def close(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._reader is not None:
            self._reader.join(timeout=2)

    def read(self) -> Optional[Sample]:
        """The oldest line not yet delivered (the sampler drains them all on each tick)."""
        with self._lock:
            return self._pending.pop(0) if self._pending else None

    def wait_first(self, timeout_s: float) -> bool:
        """True once a line has arrived (lets a caller check the binary really prints rails)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending:
                    return True
            time.sleep(0.01)
        return False
