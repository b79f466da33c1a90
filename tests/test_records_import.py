"""`profiles/` reads run directories through `jetfed.coordinator.records` without pulling the
coordinator's round loop, paho, torch or the method registry (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fleet import ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import json, sys
import jetfed.coordinator.records, jetfed.profiles.records, jetfed.profiles.report
heavy = (
    "paho",
    "torch",
    "jetfed.coordinator.server",
    "jetfed.coordinator.config",
    "jetfed.edge.methods.base",
)
print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))
"""


def test_records_and_profiles_import_without_the_coordinator_paho_or_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
