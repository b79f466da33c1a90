"""`jetfed doctor` on this (non-Jetson, no GPU) box, on a fake Jetson root, and against real
brokers; the memory estimate against the RSS of a real training process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from jetfed.edge.doctor import (
    FAIL,
    OK,
    SKIP,
    WARN,
    CheckResult,
    DoctorOptions,
    Runner,
    check_clock_sync,
    failed,
    probe_broker,
    run_checks,
    transformers_torch_problem,
)
from jetfed.edge.mqtt import BrokerSpec
from tests.brokers import MosquittoBroker, free_port
from tests.telemetry_trees import build_ina3221_tree

REPO_ROOT = Path(__file__).resolve().parent.parent
CHRONY_SYNCED = """\
Reference ID    : C0A80001 (192.168.0.1)
Stratum         : 3
Ref time (UTC)  : Sat Nov 21 11:58:31 2026
System time     : 0.000012345 seconds fast of NTP time
Last offset     : -0.000023456 seconds
RMS offset      : 0.000045678 seconds
Frequency       : 12.345 ppm slow
Residual freq   : -0.001 ppm
Skew            : 0.023 ppm
Root delay      : 0.012345678 seconds
Root dispersion : 0.000567890 seconds
Update interval : 1024.3 seconds
Leap status     : Normal
"""


def by_name(results: List[CheckResult]) -> Dict[str, CheckResult]:
    return {result.name: result for result in results}


def test_cli_table_and_exit_1_when_the_broker_port_is_closed() -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200")
    done = subprocess.run(
        [sys.executable, "-m", "jetfed", "doctor", "--broker", closed, "--broker-timeout", "2"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if "│" in line}
    for name in ("device", "torch", "transformers/peft", "jtop", "power sensor", "power mode"):
        assert name in rows, done.stdout
    assert "fail" in rows["broker"] and closed in rows["broker"]
    assert "ok" in rows["transformers/peft"] and "ok" in rows["memory budget"]
    assert "Traceback" not in done.stderr


def test_checks_on_this_box_pass_with_a_reachable_broker(mosquitto: MosquittoBroker) -> None:
    results = by_name(run_checks(DoctorOptions(broker=BrokerSpec(url=mosquitto.url))))
    assert results["broker"].status == OK and "plain TCP, anonymous" in results["broker"].detail
    assert results["transformers/peft"].status == OK
    assert results["torch"].status in (OK, WARN)
    assert results["memory budget"].status == OK
    assert "74,498 trainable" in results["memory budget"].detail
    assert results["power sensor"].status in (OK, WARN)
    if not os.path.exists("/run/jtop.sock") and not os.path.exists("/etc/nv_tegra_release"):
        assert results["jtop"].status == SKIP and results["power mode"].status == SKIP
    assert results["clock sync"].status in (OK, WARN)
    assert not failed(list(results.values()))


def test_fake_jetson_without_jtop_or_cuda_fails_and_reads_the_rails(tmp_path: Path) -> None:
    """A JetPack 6 AGX Orin tree: a Jetson without CUDA torch or jtop service is not ready."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n"
    )
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson AGX Orin\0")
    build_ina3221_tree(
        tmp_path / "sys",
        {"VDD_GPU_SOC": (5000, 1000), "VDD_CPU_CV": (5000, 400), "VIN_SYS_5V0": (5000, 600)},
    )
    options = DoctorOptions(root=str(tmp_path), jtop_socket=str(tmp_path / "jtop.sock"))
    results = by_name(run_checks(options))
    assert "AGX Orin" in results["device"].detail and "JetPack 6" in results["device"].detail
    assert results["jtop"].status == FAIL and "jtop --install-service" in results["jtop"].detail
    assert results["power sensor"].status == OK
    assert "ina3221: module 10.00 W" in results["power sensor"].detail
    assert results["power mode"].status == WARN
    assert results["broker"].status == SKIP
    import torch

    if not torch.cuda.is_available():
        assert results["torch"].status == FAIL and "CUDA" in results["torch"].detail
    assert failed(list(results.values()))


def test_broker_probe_over_tls_with_credentials(tmp_path: Path) -> None:
    from tests.test_broker_security import HOST, deploy

    deployment = deploy(tmp_path, {"devices": ["A"]})
    try:
        env = deployment.env("A")
        spec = BrokerSpec(
            url=f"mqtts://{HOST}:{deployment.tls_port}",
            username=env["JETFED_USERNAME"],
            password=env["JETFED_PASSWORD"],
            ca_file=env["JETFED_CA_FILE"],
        )
        good = probe_broker(spec, timeout_s=5)
        assert good.status == OK and "TLS, as A" in good.detail, good.detail
        wrong = probe_broker(spec.model_copy(update={"password": "not-it"}), timeout_s=5)
        assert wrong.status == FAIL and "refused" in wrong.detail, wrong.detail
        plain = probe_broker(spec.model_copy(update={"ca_file": None}), timeout_s=5)
        assert plain.status == FAIL and "CERTIFICATE_VERIFY_FAILED" in plain.detail, plain.detail
    finally:
        deployment.broker.stop()


@pytest.mark.parametrize(
    ("transformers_version", "torch_version", "seen", "problem"),
    [
        ("5.23.0", "2.5.0a0+872d972e41.nv24.08", True, True),
        ("5.0.0", "2.1.0a0+41361538.nv23.06", False, True),
        ("4.46.3", "2.1.0a0+41361538.nv23.06", True, False),
        ("5.23.0", "2.13.0+cpu", True, False),
        ("4.46.3", "2.5.0", False, True),
    ],
)
def test_transformers_torch_compatibility(
    transformers_version: str, torch_version: str, seen: bool, problem: bool
) -> None:
    found = transformers_torch_problem(transformers_version, torch_version, seen)
    assert (found is not None) == problem
    if found is not None:
        assert "transformers<5" in found


def replay(outputs: Dict[str, str]) -> Runner:
    """Commands answer with recorded output; absent ones are "not installed"."""

    def run(command: Sequence[str]) -> Optional[str]:
        return outputs.get(command[0])

    return run


def test_clock_sync_sources() -> None:
    assert check_clock_sync(replay({"timedatectl": "yes\n"})).status == OK
    assert check_clock_sync(replay({"timedatectl": "no\n"})).status == WARN
    chrony = check_clock_sync(replay({"chronyc": CHRONY_SYNCED}))
    assert chrony.status == OK and "fast of NTP time" in chrony.detail
    unsynced = CHRONY_SYNCED.replace("Normal", "Not synchronised")
    assert check_clock_sync(replay({"chronyc": unsynced})).status == WARN
    unknown = check_clock_sync(replay({}))
    assert unknown.status == WARN and unknown.detail.startswith("unknown")


TRAIN_AND_REPORT_RSS = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)  # one allocator arena per thread: a steadier peak on 2 cores
    from jetfed.edge.data import load_split
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.models import load_tokenizer
    from jetfed.edge.train import train_local
    from jetfed.edge.telemetry.memory import peak_rss_bytes
    from jetfed.edge.wire import ModelRef, TrainingConfig

    method_name, data = sys.argv[1], sys.argv[2]
    ref = ModelRef(name_or_path="minilm", num_labels=2, max_length=64)
    method = get_method(method_name)({}, ref)
    model = method.build(None, seed=0)
    training = TrainingConfig(local_steps=3, batch_size=16)
    train_local(model, load_tokenizer(ref), load_split(data, "train"), training, 64, "cpu", 0)
    print(peak_rss_bytes())
    """
)


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_memory_estimate_is_within_2x_of_measured_rss(
    method: str, sst2_dir: Path, minilm_path: str
) -> None:
    from jetfed.edge.memory_budget import estimate_training_memory

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_REPORT_RSS, method, str(sst2_dir)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = int(done.stdout.split()[-1])
    estimate = estimate_training_memory("minilm", method, 16, 64).total_bytes
    assert 0.5 < estimate / measured < 2.0, (estimate, measured)


def test_every_registered_method_is_budgeted_from_its_own_facts() -> None:
    """The memory budget asks each method what a device holds (no list of methods outside
    edge/methods/): every registered method is accepted, and the facts follow the method."""
    from jetfed.edge.memory_budget import estimate_training_memory
    from jetfed.edge.methods.base import available_methods
    from jetfed.edge.methods.split import SplitSettings

    estimates = {m: estimate_training_memory("minilm", m, 16, 64) for m in available_methods()}
    lora, full = estimates["lora"], estimates["full"]
    assert full.trainable_params == full.total_params > lora.trainable_params
    assert estimates["federa"].weights_bytes > lora.weights_bytes  # + the fixed A₀/B₀ copy
    assert estimates["kd"].activations_bytes > lora.activations_bytes  # + the proxy batch
    assert estimates["split"].layers_on_device == SplitSettings().cut_layer
    options = DoctorOptions(method="split", lora_rank=4, cut_layer=3)
    assert options.method_config() == {"rank": 4, "cut_layer": 3}
    assert DoctorOptions(method="full", lora_rank=4).method_config() == {}


def test_demo_and_reproduction_use_each_methods_default_learning_rate(tmp_path: Path) -> None:
    from bench.reproduction import learning_rate
    from jetfed.coordinator.demo import DEMO_DATA, demo_config
    from jetfed.edge.methods.base import get_method

    for method in ("lora", "federa", "full", "split"):
        config = demo_config(
            "d", method, 2, 1, 1, str(DEMO_DATA), str(tmp_path), "iid", 1.0, None, None
        )
        expected = get_method(method).default_learning_rate
        assert config.training.learning_rate == expected == learning_rate(method)
    assert get_method("full").default_learning_rate < get_method("lora").default_learning_rate
