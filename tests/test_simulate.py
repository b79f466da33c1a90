"""`jetfed simulate`: virtual devices share one model (or one per worker process) and train the
same bits either way; sweeps plan a grid, run it on a local pool or Ray, resume, and summarize.
(The simulated run against the deployed one, bit for bit: tests/test_reproducibility.py.)"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from jetfed.coordinator.config import parse_config
from jetfed.coordinator.demo import DEMO_DATA
from jetfed.coordinator.rundir import RunDir
from jetfed.coordinator.simulate import simulate
from jetfed.coordinator.sweep import parse_seeds, plan_sweep, run_sweep, split_values
from jetfed.edge.errors import UserError
from jetfed.edge.methods.lora import LoraMethod
from tests.fleet import wait_for


def tiny(name: str, output_dir: Path, **rounds: Any) -> Dict[str, Any]:
    """A one-layer MiniLM, 4 Dirichlet clients, 2 local steps of 4 rows."""
    return {
        "name": name,
        "model": {"name_or_path": "minilm", "max_length": 32, "num_hidden_layers": 1},
        "method": {"name": "lora"},
        "training": {"local_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        "data": {
            "path": str(DEMO_DATA),
            "partition": {"kind": "dirichlet", "num_clients": 4, "alpha": 1.0},
            "max_eval_samples": 16,
        },
        "rounds": {"count": 1, "min_clients": 2, "wait_for_devices_s": 30, **rounds},
        "output_dir": str(output_dir),
    }


def final_adapter(run_dir: Path, round_index: int = 0) -> Dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"global/round-{round_index:04d}/adapter_model.safetensors"))


def test_virtual_devices_share_one_model_and_record_the_step(
    tmp_path: Path, minilm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: List[int] = []
    build = LoraMethod.build
    monkeypatch.setattr(
        LoraMethod, "build", lambda self, init, seed: builds.append(seed) or build(self, init, seed)
    )
    config = parse_config(tiny("shared", tmp_path, clients_per_round=4, min_clients=4), "test")
    (metrics,) = simulate(config)
    assert metrics.num_aggregated == 4
    # the coordinator's initial state and evaluation model, then one model for 4 devices
    assert len(builds) == 3
    assert metrics.extra["lora_scaling"] == 2.0  # α 16 / r 8, recorded every round
    assert metrics.extra["update_norm"] > 0 and metrics.extra["delta_w_norm"] > 0
    trained = {r.device_id for r in RunDir(config.run_dir).read_profiles() if r.phase == "train"}
    assert trained == {"demo-01", "demo-02", "demo-03", "demo-04"}


@pytest.mark.slow
def test_worker_processes_train_the_same_bits(tmp_path: Path, minilm_path: str) -> None:
    """Slow (16 s): the spawned worker imports torch and builds its own model."""
    adapters = []
    for workers in (0, 1):
        config = parse_config(tiny(f"workers-{workers}", tmp_path, clients_per_round=2), "test")
        (metrics,) = simulate(config, workers=workers)
        assert metrics.num_aggregated == 2
        adapters.append(final_adapter(config.run_dir))
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def test_seeds_values_and_set_errors(tmp_path: Path) -> None:
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    assert split_values("1e-4, 5e-4") == ["1e-4", "5e-4"]
    assert split_values("[query,value],query") == ["[query,value]", "query"]
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tiny("grid", tmp_path / "runs")))
    sets = ["training.learning_rate=1e-4,5e-4", "data.partition.alpha=0.1,0.5"]
    runs = plan_sweep(str(path), sets, [0, 1, 2], tmp_path / "sweep")
    assert len(runs) == 12 and len({run.name for run in runs}) == 12
    assert "seed=2" in runs[2].overrides and "data.partition.seed=2" in runs[2].overrides
    for bad, blamed in (
        ("training.learnin_rate=1,2", "--set training.learnin_rate=1: training.learnin_rate"),
        ("training.learning_rate=abc,1", "--set training.learning_rate=abc: training.learning"),
    ):
        with pytest.raises(UserError) as error:
            plan_sweep(str(path), [bad], [0], tmp_path / "sweep")
        assert str(error.value).startswith(blamed) and "\n" not in str(error.value)


def sweep_config(tmp_path: Path) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tiny("sweep", tmp_path / "runs", clients_per_round=2)))
    return path


def test_local_pool_sweep_resumes_and_summarizes(tmp_path: Path, minilm_path: str) -> None:
    path = sweep_config(tmp_path)
    out = tmp_path / "sweep"
    args = (str(path), ["method.name=lora,federa"], [0, 1], out)
    summary = run_sweep(*args, jobs=2, targets=[0.5])
    assert summary["execution"]["ran"] == 4
    assert all(run["status"] == "completed" for run in summary["execution"]["runs"])
    (pair,) = summary["paired"]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("federa", "lora", [0, 1])
    assert pair["last"]["n"] == 2 and pair["last"]["ci95"] is not None
    cell = summary["cells"][0]
    assert cell["per_round"][0]["n"] == 2 and "0.5" in cell["to_target"]
    assert (out / "summary.md").read_text().count("federa − lora") == 1
    assert Path(summary["plots"][0]).exists()
    again = run_sweep(*args, jobs=2, targets=[0.5])
    assert again["execution"]["ran"] == 0 and again["execution"]["skipped_finished"] == 4
    assert json.loads((out / "summary.json").read_text())["cells"] == again["cells"]
    more = run_sweep(
        str(path), ["method.name=lora,federa"], [0, 1, 2], out, targets=[0.5], summarize_only=True
    )
    assert more["execution"]["ran"] == 0 and len(more["unfinished"]) == 2
    assert more["cells"] == again["cells"]


def test_a_killed_sweep_takes_its_workers_with_it(tmp_path: Path, minilm_path: str) -> None:
    """A signal to the sweep's own process (`kill PID`, unlike Ctrl-C to its group) must not
    leave a worker training on, into the run folder a resumed sweep writes too."""
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tiny("orphan", tmp_path / "runs", count=100_000)))
    out = tmp_path / "sweep"
    command = ["simulate", str(path), "--seeds", "0", "--jobs", "1", "--out", str(out)]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "jetfed", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: List[psutil.Process] = []

    def a_round_finished() -> bool:
        return any(path.stat().st_size for path in (out / "runs").glob("*/metrics.jsonl"))

    try:
        wait_for(a_round_finished, 120, "a finished round")
        workers = psutil.Process(sweep.pid).children(recursive=True)
        assert workers
        sweep.kill()
        sweep.wait()
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers still running after the sweep was killed: {alive}"
    finally:
        sweep.kill()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


@pytest.mark.slow
def test_ray_sweep(tmp_path: Path, minilm_path: str) -> None:
    """Two runs as Ray tasks on a local Ray started in this process (ray.init(); slow: Ray's
    start-up alone takes 10-20 s here)."""
    ray = pytest.importorskip("ray")
    try:
        summary = run_sweep(
            str(sweep_config(tmp_path)), [], [0, 1], tmp_path / "sweep", use_ray=True
        )
    finally:
        ray.shutdown()
    assert summary["execution"]["backend"] == "ray" and summary["execution"]["ran"] == 2
    assert all(run["status"] == "completed" for run in summary["execution"]["runs"])
    assert summary["cells"][0]["last"]["n"] == 2


def test_cli_set_mistake_is_one_line(tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    path = sweep_config(tmp_path)
    result = run_cli(["simulate", str(path), "--seeds", "0-1", "--set", "training.lr=1e-4,5e-4"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "jetfed: error: --set training.lr=1e-4: training.lr: unknown field (check the spelling)"
    ]


def test_cases_bundle_settings_that_vary_together(tmp_path: Path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tiny("cases", tmp_path / "runs")))
    cases = [
        "fedavg: aggregation.strategy=fedavg",
        "ffa: aggregation.strategy=ffa   method.freeze_a=true",
        "mixed: aggregation.strategy=flexlora method.rank=16 assignment.ranks=[16, 8, 4]"
        " assignment.devices={demo-01: {rank: 4}, demo-02: {rank: 8}}",
    ]
    runs = plan_sweep(str(path), ["training.learning_rate=1e-4,5e-4"], [0, 1], tmp_path, cases)
    assert len(runs) == 12 and len({run.name for run in runs}) == 12
    ffa = next(run for run in runs if dict(run.cell)["case"] == "ffa")
    assert {"aggregation.strategy=ffa", "method.freeze_a=true"} <= set(ffa.overrides)
    mixed = next(run for run in runs if dict(run.cell)["case"] == "mixed")
    assert "assignment.devices={demo-01: {rank: 4}, demo-02: {rank: 8}}" in mixed.overrides
    edited = plan_sweep(str(path), [], [0], tmp_path, ["ffa: aggregation.strategy=ffa"])
    assert edited[0].name not in {run.name for run in runs}  # an edited case is a new run
    for bad_sets, bad_cases, blamed in (
        ([], ["ffa aggregation.strategy=ffa"], "--case 'ffa aggregation.strategy=ffa' must"),
        ([], ["a: x=1", "a: x=2"], "--case a is given twice"),
        (["method.rank=4"], ["r: method.rank=8"], "--case r sets method.rank, which --set"),
    ):
        with pytest.raises(UserError) as error:
            plan_sweep(str(path), bad_sets, [0], tmp_path, bad_cases)
        assert blamed in str(error.value) and "\n" not in str(error.value)


def test_a_case_sweep_compares_cases_and_their_cost(tmp_path: Path, minilm_path: str) -> None:
    """FedAvg against FFA-LoRA over the same seeds: the paired difference is between the cases,
    and the cost table shows what FFA is for (half the upload, no aggregation error)."""
    cases = [
        "fedavg: aggregation.strategy=fedavg",
        "ffa: aggregation.strategy=ffa method.freeze_a=true",
    ]
    summary = run_sweep(str(sweep_config(tmp_path)), [], [0, 1], tmp_path / "sweep", cases, jobs=2)
    assert all(run["status"] == "completed" for run in summary["execution"]["runs"])
    (pair,) = summary["paired"]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("fedavg", "ffa", [0, 1])
    cost = {cell["settings"]["case"]: cell["cost"] for cell in summary["cells"]}
    assert cost["ffa"]["bytes_up_per_round"] < 0.75 * cost["fedavg"]["bytes_up_per_round"]
    assert cost["ffa"]["aggregation_error_worst"] < 1e-5 < cost["fedavg"]["aggregation_error_mean"]
    assert "## Cost per round" in (tmp_path / "sweep" / "summary.md").read_text()
