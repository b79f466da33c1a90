"""What a device installs is what the tree holds: the wheel built from this checkout has one
top-level package, `jetfed`, with every module of edge/, coordinator/ and profiles/ (a new
subpackage that setuptools would not find is caught here), the live page's assets and the
demo's bundled data; and it works from a fresh environment, away from the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("edge", "coordinator", "profiles")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    offline = ("--no-deps", "--no-build-isolation", "-q")  # setuptools: the test extra's
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), *offline, "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("jetfed-*.whl")
    return built


def _tracked(folder: str, suffix: str) -> List[str]:
    listed = subprocess.run(
        ["git", "ls-files", folder], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [f"jetfed/{name}" for name in listed if name.endswith(suffix)]


def test_the_wheel_holds_jetfed_alone_with_every_module_and_asset(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {
        "jetfed",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    modules = [name for folder in SOURCES for name in _tracked(folder, ".py")]
    assert modules and sorted(set(modules) - names) == []
    assert sorted(set(_tracked("coordinator/ui/static", "")) - names) == []
    assert sorted(set(_tracked("coordinator/demo_data", "")) - names) == []


def test_the_installed_wheel_works_away_from_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """A venv that sees this machine's dependencies but not the checkout: the wheel's jetfed
    imports, finds its demo data and page assets, and its CLI answers."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import jetfed, pathlib; from jetfed.coordinator.demo import DEMO_DATA; "
        "from jetfed.coordinator.ui import server; "
        "assert (DEMO_DATA / 'train.jsonl').exists(), DEMO_DATA; "
        "assert (pathlib.Path(server.__file__).parent / 'static' / 'app.js').exists(); "
        "print(jetfed.__file__)"
    )
    where = subprocess.run(
        [python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    usage = subprocess.run(
        [python, "-m", "jetfed", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert usage.returncode == 0 and "coordinator" in usage.stdout, usage.stderr
