"""Pick the best telemetry backend available here, best first."""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional

from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event
from jetfed.edge.telemetry.backends.base import Backend, BackendUnavailable
from jetfed.edge.telemetry.backends.ina3221 import Ina3221Backend
from jetfed.edge.telemetry.backends.jtop_backend import JtopBackend
from jetfed.edge.telemetry.backends.nvml import NvmlBackend
from jetfed.edge.telemetry.backends.psutil_backend import PsutilBackend
from jetfed.edge.telemetry.backends.rapl import RaplBackend
from jetfed.edge.telemetry.backends.tegrastats import TegrastatsBackend

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("jtop", "ina3221", "tegrastats", "nvml", "rapl", "psutil")
JTOP_SOCKET = "/run/jtop.sock"
TEGRASTATS_FIRST_LINE_TIMEOUT_S = 3.0


def _tegrastats(interval_s: float, tegrastats_command: Optional[List[str]]) -> Backend:
    backend = TegrastatsBackend(max(1, int(interval_s * 1000)), command=tegrastats_command)
    backend.open()
    if not backend.wait_first(TEGRASTATS_FIRST_LINE_TIMEOUT_S):
        backend.close()
        raise BackendUnavailable("tegrastats printed no power rails")
    return backend


def _opened(backend: Backend) -> Backend:
    backend.open()
    return backend


def _jtop(interval_s: float, socket_path: str) -> Backend:
    if not os.path.exists(socket_path):
        raise BackendUnavailable("no jtop service socket at " + socket_path)
    return _opened(JtopBackend(interval_s=max(0.5, interval_s)))


def detect_backend(
    preference: str = "auto",
    sysfs_root: str = "/sys",
    interval_s: float = 0.1,
    tegrastats_command: Optional[List[str]] = None,
    jtop_socket: str = JTOP_SOCKET,
) -> Backend:
    """An opened backend: the named one, or with "auto" the first that works here in the order
    jtop → ina3221 → tegrastats → nvml → rapl → psutil. jtop runs at ≥ 0.5 s (its service's
    recommended floor; the sampler still polls at `interval_s`)."""
    factories: Dict[str, Callable[[], Backend]] = {
        "jtop": lambda: _jtop(interval_s, jtop_socket),
        "ina3221": lambda: _opened(Ina3221Backend(sysfs_root)),
        "tegrastats": lambda: _tegrastats(interval_s, tegrastats_command),
        "nvml": lambda: _opened(NvmlBackend()),
        "rapl": lambda: _opened(RaplBackend(sysfs_root)),
        "psutil": lambda: _opened(PsutilBackend()),
    }
    if preference != "auto":
        if preference not in factories:
            raise UserError(
                "telemetry backend must be auto or one of {}, got {!r}".format(
                    ", ".join(BACKEND_NAMES), preference
                )
            )
        try:
            return factories[preference]()
        except BackendUnavailable as exc:
            raise UserError(f"telemetry backend {preference} is unavailable: {exc}") from exc
    for name in BACKEND_NAMES:
        try:
            return factories[name]()
        except BackendUnavailable as exc:
            log_event(logger, logging.DEBUG, "telemetry.backend_skipped", backend=name, reason=exc)
    raise AssertionError("the psutil backend is always available")
