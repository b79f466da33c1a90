"""Named network namespaces: create, empty and delete them, and sweep those of dead runs.

Every name starts with `{prefix}{pid}{letters}` (the creating process and a per-process
counter), so a later run can tell leftovers of a killed run from namespaces still in use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from typing import Iterable, List, Optional, Sequence

from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event

logger = logging.getLogger(__name__)

ROOT_ERROR = "--link needs root (network namespaces and TUN devices): run as root or drop --link"
KILL_GRACE_S = 3.0


def require_root() -> None:
    """Fail with one line unless this process may create namespaces and TUN devices."""
    if os.geteuid() != 0:
        raise UserError(ROOT_ERROR)
    if not os.path.exists("/dev/net/tun"):
        raise UserError("--link needs /dev/net/tun (the tun kernel module): load it or drop --link")


def ip(args: Sequence[str], netns: Optional[str] = None) -> str:
    """Run `ip [-n netns] ARGS`; a failure raises UserError with ip's own message."""
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"--link setup failed: {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def list_namespaces() -> List[str]:
    names = []
    for line in ip(["netns", "list"]).splitlines():
        if line.strip():
            names.append(line.split()[0])
    return names


def exec_prefix(netns: str) -> List[str]:
    return ["ip", "netns", "exec", netns]


def remove_namespaces(names: Iterable[str]) -> None:
    """End every process still inside these namespaces, then delete them (best effort: a
    teardown must get as far as it can)."""
    names = list(names)
    pids = [pid for name in names for pid in _pids_in(name)]
    _end_processes(pids)
    for name in names:
        done = subprocess.run(
            ["ip", "netns", "delete", name], capture_output=True, text=True, check=False
        )
        if done.returncode != 0 and name in list_namespaces():
            log_event(logger, logging.WARNING, "link.netns_left", netns=name, reason=done.stderr)


def _pids_in(netns: str) -> List[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def _end_processes(pids: List[int]) -> None:
    """SIGTERM, a grace period, then SIGKILL for whatever is left."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def owner_pid(name: str, prefix: str) -> Optional[int]:
    """The creating pid encoded in a name made by `fleet_tag`, or None for foreign names."""
    match = re.match(re.escape(prefix) + r"(\d+)[a-z]+-", name)
    return int(match.group(1)) if match else None


def cleanup_stale(prefix: str = "jf") -> List[str]:
    """Delete namespaces left by runs whose creating process is gone (SIGKILL, power loss);
    returns their names. Links need no sweep: TUN devices vanish with the relay process."""
    stale = []
    for name in list_namespaces():
        pid = owner_pid(name, prefix)
        if pid is not None and not pid_alive(pid):
            stale.append(name)
    if stale:
        remove_namespaces(stale)
        log_event(logger, logging.WARNING, "link.stale_removed", namespaces=",".join(stale))
    return stale
