"""install_jetson.sh, run for real in subprocesses against fake device roots.

A fake root is a folder with etc/nv_tegra_release and proc/device-tree/model as a Jetson has them
(release lines as L4T prints them: JetPack 5 = R35.4.1, 6 = R36.4.3, 7 = R38.2 on Thor and R39.2
on AGX Orin, see ../shared/fixtures/tegrastats-orin.md); `uname -m` is forced with JETFED_UNAME_M.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "install_jetson.sh"
ORIN_MODEL = "NVIDIA Jetson AGX Orin Developer Kit"
SERVICE_ARGS = ["--broker", "mqtt://coordinator.lan:1883", "--device-id", "orin-01"]
SERVICE_ARGS += ["--service-user", "alice"]

RELEASES = {
    "jp5": "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023",
    "jp6": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
    "DATE: Wed Jan  8 01:49:37 UTC 2025",
    "jp7_thor": "# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64, "
    "DATE: Fri Aug 22 00:55:42 UTC 2025",
    "jp7_orin": "# R39 (release), REVISION: 2.0, GCID: 43000000, BOARD: generic, EABI: aarch64, "
    "DATE: Mon Jul 20 00:00:00 UTC 2026",
}


def make_root(base: Path, release: Optional[str], model: str = ORIN_MODEL) -> Path:
    """A device root as the script reads it; `release=None` is a non-Jetson."""
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("orin-01\n")
    if release is not None:
        (root / "etc" / "nv_tegra_release").write_text(release + "\n")
        (root / "proc" / "device-tree").mkdir(parents=True)
        # The kernel ends the model string with a NUL.
        (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    return root


def run_script(
    args: List[str], machine: str = "aarch64", extra_env: Optional[Dict[str, str]] = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    env["JETFED_UNAME_M"] = machine
    env.update(extra_env or {})
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )


def snapshot(root: Path) -> Dict[str, Tuple[int, bytes]]:
    """Every path under root with its mode and content, to prove nothing changed."""
    state: Dict[str, Tuple[int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        content = path.read_bytes() if path.is_file() else b""
        state[str(path.relative_to(root))] = (path.lstat().st_mode, content)
    return state


def dry_run(tmp_path: Path, release: Optional[str], *extra: str, machine: str = "aarch64"):
    root = make_root(tmp_path, release)
    venv = tmp_path / "venv"
    before = snapshot(root)
    args = ["--dry-run", "--root", str(root), "--venv", str(venv), *SERVICE_ARGS, *extra]
    result = run_script(args, machine=machine)
    assert snapshot(root) == before, "a dry run changed the fake root"
    assert not venv.exists(), "a dry run created the venv"
    return result


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("release", "expected", "absent"),
    [
        (
            "jp5",
            [
                "JetPack 5 (L4T R35.4.1)",
                "jp/v512/pytorch/torch-2.1.0a0+41361538.nv23.06-cp38-cp38-linux_aarch64.whl",
                "torch==2.1.0a0",
                "transformers>=4.45,<4.47",
                "peft>=0.13,<0.14",
                "numpy<2",
                "onnxruntime-gpu from wheel https://nvidia.box.com/",
                "onnxruntime_gpu-1.17.0-cp38-cp38-linux_aarch64.whl",
                "needs Python 3.8",
            ],
            ["cusparse", "transformers>=5"],
        ),
        (
            "jp6",
            [
                "JetPack 6 (L4T R36.4.3)",
                "jp/v61/pytorch/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_"
                "aarch64.whl",
                "torch==2.5.0a0",
                "transformers>=4.45,<5",
                "peft>=0.13,<0.18",
                "numpy<2",
                "--index-url https://pypi.jetson-ai-lab.io/jp6/cu126 onnxruntime-gpu==1.23.0",
                "libcusparse_lt-linux-aarch64-0.6.3.2-archive.tar.xz",
                "needs Python 3.10",
            ],
            ["transformers>=5"],
        ),
        (
            "jp7_thor",
            [
                "JetPack 7 (L4T R38.2.0)",
                "--index-url https://download.pytorch.org/whl/cu130 torch==2.9.1",
                "transformers>=5,<6",
                "peft>=0.21",
                "--index-url https://pypi.jetson-ai-lab.io/sbsa/cu130 onnxruntime-gpu",
            ],
            ["numpy<2", "cusparse", "transformers>=4"],
        ),
        (
            "jp7_orin",
            [
                "JetPack 7 (L4T R39.2.0)",
                "--index-url https://download.pytorch.org/whl/cu130 torch==2.9.1",
                "transformers>=5,<6",
            ],
            ["numpy<2"],
        ),
    ],
)
def test_dry_run_picks_the_jetpack_stack(
    tmp_path: Path, release: str, expected: List[str], absent: List[str]
) -> None:
    result = dry_run(tmp_path, RELEASES[release])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"on '{ORIN_MODEL}'" in out, "the model's trailing NUL must be stripped"
    for text in expected:
        assert text in out + result.stderr, f"missing {text!r}"
    for text in absent:
        assert text not in out, f"unexpected {text!r}"
    # Every mutating step is shown, none is run.
    for text in [
        "-m venv --system-site-packages",
        "jetson-stats==7.2.2",
        "--install-service",
        "usermod -aG jtop alice",
        "would write /etc/jetfed/constraints.txt",
        "would write /etc/jetfed/edge.env (mode 600)",
        "would write /etc/systemd/system/jetfed-edge.service",
        "SupplementaryGroups=jtop",
        "systemctl enable jetfed-edge.service",
    ]:
        assert text in out, f"missing step {text!r}"
    assert "-c /etc/jetfed/constraints.txt" in out
    assert f"{REPO}\\[jetson\\]" in out or f"{REPO}[jetson]" in out


def test_second_dry_run_is_identical(tmp_path: Path) -> None:
    first = dry_run(tmp_path, RELEASES["jp6"], "--power-mode", "2", "--jetson-clocks")
    root = tmp_path / "root"
    args = ["--dry-run", "--root", str(root), "--venv", str(tmp_path / "venv"), *SERVICE_ARGS]
    second = run_script([*args, "--power-mode", "2", "--jetson-clocks"])
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout


def test_dry_run_answers_nvpmodel_and_pins_clocks(tmp_path: Path) -> None:
    result = dry_run(tmp_path, RELEASES["jp5"], "--power-mode", "3", "--jetson-clocks")
    assert result.returncode == 0, result.stderr
    assert "(answering 'NO') nvpmodel -m 3" in result.stdout
    assert "ExecStartPre=+/usr/bin/jetson_clocks" in result.stdout


def test_dry_run_never_prints_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    result = dry_run(
        tmp_path, RELEASES["jp6"], "--username", "dev1", "--password-file", str(secret)
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert 'JETFED_PASSWORD="********"' in result.stdout


@pytest.mark.parametrize(("machine", "release"), [("x86_64", None), ("aarch64", None)])
def test_refuses_a_non_jetson(tmp_path: Path, machine: str, release: Optional[str]) -> None:
    result = dry_run(tmp_path, release, machine=machine)
    assert result.returncode == 2
    assert "this is not a Jetson" in result.stderr
    assert "--generic" in result.stderr
    assert "==> Plan" not in result.stdout


def test_refuses_x86_even_with_a_tegra_release_file(tmp_path: Path) -> None:
    result = dry_run(tmp_path, RELEASES["jp6"], machine="x86_64")
    assert result.returncode == 2
    assert "uname -m: x86_64" in result.stderr


def test_generic_dry_run_chooses_cpu_torch(tmp_path: Path) -> None:
    result = dry_run(tmp_path, None, "--generic", machine="x86_64")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in out
    assert "transformers>=5,<6" in out
    assert "telemetry    : psutil" in out
    assert "onnxruntime  : none" in out
    steps = out.split("==> System packages", 1)[1]
    for text in ["onnxruntime", "jtop", "jetson-stats", "numpy<2", "[jetson]", "nvpmodel"]:
        assert text not in steps, text


@pytest.mark.parametrize(
    ("release", "message"),
    [
        ("# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic, EABI: aarch64", "JetPack 6.0"),
        ("# R35 (release), REVISION: 1.0, GCID: 1, BOARD: t186ref, EABI: aarch64", "JetPack 5.0"),
        ("# R32 (release), REVISION: 7.4, GCID: 1, BOARD: t210ref, EABI: aarch64", "R32.7.4"),
    ],
)
def test_refuses_unsupported_jetpacks(tmp_path: Path, release: str, message: str) -> None:
    result = dry_run(tmp_path, release)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("torch_version", "transformers"),
    [("2.6.0rc1", "transformers>=4.45,<5"), ("2.6.0", "transformers>=5,<6")],
)
def test_index_override_pins_its_torch_and_a_matching_transformers(
    tmp_path: Path, torch_version: str, transformers: str
) -> None:
    index = "https://pypi.jetson-ai-lab.io/jp6/cu126"
    result = dry_run(
        tmp_path, RELEASES["jp6"], "--index-url", index, "--torch-version", torch_version
    )
    assert result.returncode == 0, result.stderr
    assert f"--index-url {index} torch=={torch_version}" in result.stdout
    assert f"| torch=={torch_version}" in result.stdout
    assert f"| {transformers}" in result.stdout
    assert "nvidia.com/compute/redist" not in result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--broker", "http://coordinator"], "--broker 'http://coordinator' must look like"),
        (["--power-mode", "max"], "--power-mode 'max'"),
        (["--device-id", "a/b"], "--device-id 'a/b'"),
        (["--service-user", "root"], "--service-user NAME is required"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
    ],
)
def test_user_mistakes_get_one_clear_line(tmp_path: Path, flags: List[str], message: str) -> None:
    result = dry_run(tmp_path, RELEASES["jp6"], *flags)
    assert result.returncode != 0
    assert message in result.stderr


def host_unit_dir() -> Optional[Path]:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    return None


def test_config_only_writes_a_valid_unit_and_is_idempotent(tmp_path: Path) -> None:
    root = make_root(tmp_path, RELEASES["jp6"])
    password = 'p@ss "w\\rd" $HOME `x`'
    args = ["--root", str(root), "--config-only", "--jetson-clocks", *SERVICE_ARGS]
    args += ["--username", "dev1", "--password", password, "--experiment", "sst2"]
    first = run_script(args)
    assert first.returncode == 0, first.stdout + first.stderr

    env_file = root / "etc" / "jetfed" / "edge.env"
    unit = root / "etc" / "systemd" / "system" / "jetfed-edge.service"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert (root / "etc/systemd/system/multi-user.target.wants/jetfed-edge.service").is_symlink()
    assert (root / "var" / "lib" / "jetfed").is_dir()
    unit_text = unit.read_text()
    for line in [
        "User=alice",
        "SupplementaryGroups=jtop",
        "EnvironmentFile=/etc/jetfed/edge.env",
        "ExecStart=/opt/jetfed/venv/bin/jetfed edge run",
        "ExecStartPre=+/usr/bin/jetson_clocks",
        "Restart=on-failure",
        "Environment=JETFED_DATA=/var/lib/jetfed PYTHONUNBUFFERED=1",
    ]:
        assert line in unit_text.splitlines(), line

    # systemd and a shell decode the env file's quoting the same way.
    decoded = subprocess.run(
        [
            "bash",
            "-c",
            'set -a; . "$1"; printf "%s\\n" "$JETFED_PASSWORD" "$JETFED_BROKER" '
            '"$JETFED_DEVICE_ID" "$JETFED_USERNAME" "$JETFED_EXPERIMENT"',
            "-",
            str(env_file),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout.splitlines()
    assert decoded == [
        password,
        "mqtt://coordinator.lan:1883",
        "orin-01",
        "dev1",
        "sst2",
    ]

    before = snapshot(root)
    second = run_script(args)
    assert second.returncode == 0, second.stderr
    assert snapshot(root) == before
    assert "unchanged: /etc/jetfed/edge.env" in second.stdout
    assert "unchanged: /etc/systemd/system/jetfed-edge.service" in second.stdout
    assert "already enabled: jetfed-edge.service" in second.stdout

    # Without --broker an existing env file is kept as it is.
    third = run_script(
        ["--root", str(root), "--config-only", "--jetson-clocks", "--service-user", "alice"]
    )
    assert third.returncode == 0, third.stderr
    assert "kept: /etc/jetfed/edge.env" in third.stdout
    assert snapshot(root) == before

    analyze = shutil.which("systemd-analyze")
    units = host_unit_dir()
    if analyze is None or units is None:
        pytest.skip("systemd-analyze or the host's systemd units are not available")
    # verify resolves ExecStart binaries and dependencies under --root.
    shutil.copytree(units, root / "usr" / "lib" / "systemd" / "system")
    for exe in ("opt/jetfed/venv/bin/jetfed", "usr/bin/jetson_clocks"):
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\n")
        (root / exe).chmod(0o755)
    verify = subprocess.run(
        [
            analyze,
            "verify",
            f"--root={root}",
            "--recursive-errors=no",
            "/etc/systemd/system/jetfed-edge.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stderr.strip() == "", verify.stderr


def test_generic_refuses_jetson_power_flags(tmp_path: Path) -> None:
    result = dry_run(tmp_path, None, "--generic", "--power-mode", "0", machine="x86_64")
    assert result.returncode != 0
    assert "--power-mode and --jetson-clocks need a Jetson" in result.stderr


def test_generic_unit_has_no_jtop(tmp_path: Path) -> None:
    root = make_root(tmp_path, None)
    result = run_script(
        ["--root", str(root), "--config-only", "--generic", *SERVICE_ARGS], machine="x86_64"
    )
    assert result.returncode == 0, result.stderr
    unit_text = (root / "etc" / "systemd" / "system" / "jetfed-edge.service").read_text()
    assert "jtop" not in unit_text
    assert "jetson_clocks" not in unit_text
