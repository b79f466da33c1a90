"""The REAL jtop path: jetson-stats' own service (JTOP_TESTING) reads a fake AGX Orin INA3221
tree; we read the same rails through the `jtop` client and through our jtop backend + profiler.

The service runs in a child process inside `unshare -m` (tests/jtop_fake_service.py), so its
socket, fake tree, config and `jtop` group never touch the host; this side only creates the two
empty mount points that must pre-exist and removes them again, under a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.jtop_fake_service import FAKE_ROOT, PARENT_MOUNT_NS_ENV, RAILS

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_PATH = "/tmp/jetfed-jtop-test.lock"
SERVICE_TIMEOUT_S = 60
UNSHARE = ["unshare", "-m", "--propagation", "private"]


def _skip_reason() -> str:
    if os.geteuid() != 0:
        return "needs root: the jtop service runs as root and mounts a private /run"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "needs unshare and mount (util-linux) for a private mount namespace"
    try:
        import jtop  # noqa: F401
    except ImportError:
        return "jetson-stats is not installed (pip install jetson-stats)"
    probe = subprocess.run(
        [*UNSHARE, "mount", "-t", "tmpfs", "tmpfs", tempfile.gettempdir()],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return "cannot create a mount namespace here: " + probe.stderr.decode().strip()
    return ""


@pytest.fixture(scope="module")
def jtop_run() -> Iterator[Dict[str, Any]]:
    """One service run (~8 s) shared by the tests below."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    mount_points = [FAKE_ROOT, Path(sys.base_prefix) / "local"]
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created: List[Path] = []
        try:
            for path in mount_points:
                if not path.exists():
                    path.mkdir()
                    created.append(path)
            completed = subprocess.run(
                [*UNSHARE, sys.executable, "-m", "tests.jtop_fake_service"],
                cwd=REPO_ROOT,
                env={**os.environ, PARENT_MOUNT_NS_ENV: os.readlink("/proc/self/ns/mnt")},
                capture_output=True,
                text=True,
                timeout=SERVICE_TIMEOUT_S,
                check=False,
            )
        finally:
            for path in reversed(created):
                path.rmdir()
    assert completed.returncode == 0, completed.stderr[-3000:]
    yield json.loads(completed.stdout.strip().splitlines()[-1])


def test_jtop_service_and_our_backend_read_the_fake_orin_rails(jtop_run: Dict[str, Any]) -> None:
    expected_mw = {rail: mv * ma // 1000 for rail, (mv, ma) in RAILS.items()}
    seen_by_jtop = jtop_run["jtop"]
    assert seen_by_jtop["rail_mw"] == expected_mw
    # jtop's own total sums all four rails, counting VDDQ_VDD2_1V8AO twice on AGX Orin.
    assert seen_by_jtop["tot_mw"] == sum(expected_mw.values()) == 9900
    assert seen_by_jtop["uptimes"][1] > seen_by_jtop["uptimes"][0]

    ours = jtop_run["ours"]
    assert ours["backend"] == "jtop"
    (t0, rails0, total0), (t1, _, _) = ours["samples"]
    assert t1 > t0  # deduplicated on the service's uptime
    assert rails0 == pytest.approx({rail: mw / 1000 for rail, mw in expected_mw.items()})
    assert total0 == pytest.approx(9.0)  # GPU_SOC + CPU_CV + SYS_5V0


def test_jtop_backend_profiles_energy_per_phase(jtop_run: Dict[str, Any]) -> None:
    ours = jtop_run["ours"]
    assert ours["idle_power_w"] == pytest.approx(9.0)
    idle, train = ours["records"]
    assert idle["phase"] == "idle" and idle["energy_above_idle_j"] == 0.0
    assert train["backend"] == "jtop" and train["idle_power_w"] == pytest.approx(9.0)
    assert 1.0 < train["sample_rate_hz"] < 3.0  # the service runs at 0.5 s
    duration_s = train["duration_s"]
    window_s = train["energy_by_rail_j"]["VDDQ_VDD2_1V8AO"] / 0.9
    assert window_s == pytest.approx(duration_s, abs=0.15)
    module_rails = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
    assert train["energy_j"] == pytest.approx(
        sum(train["energy_by_rail_j"][rail] for rail in module_rails), rel=1e-9
    )
    assert train["peak_power_w"] == pytest.approx(12.0)
    # GPU rail raised 3 W after ≥ 0.3 s of a ≥ 2.5 s phase (sleeps overrun on a loaded machine:
    # bound by the measured duration); sampled every 0.5 s by the service.
    assert 3.0 * (2.2 - 0.6) < train["energy_above_idle_j"] < 3.0 * (duration_s - 0.3) + 0.5
    assert 9.0 * window_s < train["energy_j"] < 12.0 * window_s
