"""The framework comparison on one causal task: all six methods, the same fleet, the same data.

The seed papers compare parameter sharing (FedLLM: `full`, and its PEFT variants `lora`,
`federa`), logit sharing (`kd`), split learning (`split`) and server/client co-tuning
(`fedcollm`) on accuracy, communication and client compute. Here every method runs the same
instruction-tuning federation of SmolLM2-135M-Instruct over a private Mosquitto, one
`jetfed edge run` process per device (1 torch thread each):

- non-IID by task: device i holds one task (SST-2, AG News, RTE as generation, GSM8K), every row
  rendered as `{prompt, response}` with one system message, so the tasks differ only in content;
- the coordinator evaluates the response loss on a fixed mixture of the four tasks' held-out
  rows (the common metric: it needs no generation, and lower is better);
- per method: the metric per round; bytes up/down, train-phase seconds and peak RSS per device
  and round (the devices' own profile records); coordinator compute per round (aggregation +
  evaluation + the strategy's in-round work, e.g. split's server half); and rounds, bytes and
  device-seconds to a common target (the worst of the methods' best losses, so all reach it).

The profile report of all runs (`jetfed profiles report`: plots of loss vs time, bytes, memory)
is written beside the results. Ten processes on two cores are not ten devices: compare
device-seconds and bytes across methods, not wall-clock against a real fleet.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from bench.runner import DEFAULT_DATASETS, DEFAULT_OUT, table

METHODS = ("lora", "federa", "full", "split", "kd", "fedcollm")
TASKS = ("sst2", "ag_news", "rte", "gsm8k")
"""Device i's task; each folder is looked up in --datasets, then in the bundled demo_data."""
DEMO_DATA = Path(__file__).resolve().parent.parent / "coordinator" / "demo_data"
SYSTEM = "You are a helpful assistant. Answer briefly."
TRAIN_ROWS_PER_TASK = 400
MAX_LENGTH = 256
SHORT_RESPONSE_CHARS = 400
"""Rows whose response is longer (≈ 120 tokens; some GSM8K answers) are left out: a response is
never truncated, so it must fit MAX_LENGTH beside some of its prompt."""
PROXY_ROWS_PER_TASK = 8
SLM_LAYERS = 4
"""fedcollm's devices hold SmolLM2's first SLM_LAYERS layers; the coordinator's LLM is whole."""
METHOD_SETTINGS: Dict[str, Dict[str, Any]] = {
    "kd": {"proxy_split": "proxy", "proxy_size": 32, "server_steps": 4, "server_batch_size": 4},
    "fedcollm": {
        "llm": "smollm2",
        "aux_split": "proxy",
        "aux_size": 32,
        "server_steps": 4,
        "server_batch_size": 4,
    },
}
"""Per method: the `method:` keys beyond `name` this comparison runs it with (kd and fedcollm as
`jetfed demo --model smollm2` runs them, on this federation's shared proxy rows)."""


def _task_folder(task: str, datasets: Path) -> Path:
    for root in (datasets, DEMO_DATA):
        if (root / task).is_dir():
            return root / task
    raise FileNotFoundError(f"task {task} not found under {datasets} or {DEMO_DATA}")


def _rows(folder: Path, splits: Sequence[str]) -> List[Dict[str, str]]:
    """The first split that exists, rendered as {prompt, response} rows."""
    from jetfed.edge.instructions import load_instructions

    for split in splits:
        if any(folder.glob(f"{split}.*")):
            data = load_instructions(str(folder), split)
            pairs = zip(data.prompts, data.responses)
            return [{"prompt": p, "response": r} for p, r in pairs if len(r) < SHORT_RESPONSE_CHARS]
    raise FileNotFoundError(f"{folder}: none of the splits {', '.join(splits)}")


def _write(folder: Path, split: str, rows: Sequence[Dict[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.json").write_text(json.dumps({"system": SYSTEM}))
    lines = (json.dumps(row, ensure_ascii=False) for row in rows)
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_federation(
    datasets: Path, work: Path, clients: int, eval_rows_per_task: int
) -> Dict[str, Path]:
    """Per device its task's training rows; `eval`: the held-out mixture of all tasks; in every
    folder the same `proxy` split, PROXY_ROWS_PER_TASK training rows of each task that no device
    trains on (kd's public proxy set, fedcollm's auxiliary data on the coordinator).

    Held-out rows are the validation (or test) split where a task has one; a task with a single
    split (AG News' sample) keeps its last `eval_rows_per_task` rows out of training."""
    mixture: List[Dict[str, str]] = []
    proxy: List[Dict[str, str]] = []
    train_rows: Dict[str, List[Dict[str, str]]] = {}
    for task in TASKS[:clients]:
        source = _task_folder(task, datasets)
        train = _rows(source, ("train", "test"))
        held_out = _rows(source, ("validation", "test"))
        if held_out == train:
            train, held_out = train[:-eval_rows_per_task], train[-eval_rows_per_task:]
        proxy += train[-PROXY_ROWS_PER_TASK:]
        train_rows[task] = train[:-PROXY_ROWS_PER_TASK][:TRAIN_ROWS_PER_TASK]
        mixture += held_out[:eval_rows_per_task]
    folders = {f"demo-{i + 1:02d}": work / f"demo-{i + 1:02d}" for i in range(clients)}
    for index, folder in enumerate(folders.values()):
        _write(folder, "train", train_rows[TASKS[index % len(TASKS)]])
    folders["eval"] = work / "eval"
    _write(folders["eval"], "validation", mixture)
    _write(folders["eval"], "train", mixture[:1])
    for folder in folders.values():
        _write(folder, "proxy", proxy)
    return folders


def experiment(
    method: str, folders: Dict[str, Path], rounds: int, local_steps: int
) -> Dict[str, Any]:
    from jetfed.edge.methods.base import get_method

    devices = [d for d in folders if d != "eval"]
    model: Dict[str, Any] = {"name_or_path": "smollm2", "max_length": MAX_LENGTH}
    if method == "fedcollm":
        model["num_hidden_layers"] = SLM_LAYERS
    return {
        "name": f"compare-{method}",
        "seed": 0,
        "model": model,
        "method": {"name": method, **METHOD_SETTINGS.get(method, {})},
        "training": {
            "local_steps": local_steps,
            "batch_size": 4,
            "learning_rate": get_method(method).default_learning_rate,
        },
        "data": {
            "path": str(folders["eval"]),
            "partition": {"kind": "none", "num_clients": len(devices)},
            "client_paths": {d: str(folders[d]) for d in devices},
        },
        "evaluation": {"metric": "eval_loss", "generate_rows": 0},
        "rounds": {
            "count": rounds,
            "min_clients": len(devices),
            "deadline_s": 3600,
            "wait_for_devices_s": 600,
        },
    }


def loss_per_round(run: Any) -> List[float]:
    """The model the method delivers, per evaluated round: fedcollm's is the coordinator's LLM
    (its devices' SLM is a few layers of it), every other method's the global model."""
    if run.method == "fedcollm":
        return [m.extra["llm_eval_loss"] for m in run.metrics if "llm_eval_loss" in m.extra]
    return [m.eval_loss for m in run.metrics if m.eval_loss is not None]


def common_target(runs: Sequence[Any]) -> float:
    """The worst of the methods' best losses: every method reaches it."""
    return max(min(loss_per_round(run)) for run in runs)


def method_row(run: Any, target: float) -> Dict[str, Any]:
    """One method's costs, per device and round, from its run records."""
    losses = loss_per_round(run)
    device_rounds = {(p.device_id, p.round_index) for p in run.profiles}
    per_device_round = max(1, len(device_rounds))
    train_s = sum(p.duration_s for p in run.profiles if p.phase == "train")
    reached = next((i for i, loss in enumerate(losses) if loss <= target), None)
    until = [p for p in run.profiles if reached is None or p.round_index <= reached]
    coordinator_s = [
        m.aggregate_s + m.eval_s + sum(v for k, v in m.extra.items() if k.endswith("server_s"))
        for m in run.metrics
    ]
    return {
        "method": run.method,
        "loss_per_round": losses,
        "device_model_loss_per_round": [m.eval_loss for m in run.metrics],
        "best_loss": min(losses),
        "up_bytes_per_device_round": sum(p.bytes_sent for p in run.profiles) / per_device_round,
        "down_bytes_per_device_round": sum(p.bytes_received for p in run.profiles)
        / per_device_round,
        "train_s_per_device_round": train_s / per_device_round,
        "peak_rss_bytes": max((p.peak_rss_bytes or 0 for p in run.profiles), default=0),
        "coordinator_s_per_round": sum(coordinator_s) / max(1, len(coordinator_s)),
        "rounds_to_target": None if reached is None else reached + 1,
        "bytes_to_target": None
        if reached is None
        else sum(p.bytes_sent + p.bytes_received for p in until),
        "device_s_to_target": None
        if reached is None
        else sum(p.duration_s for p in until if p.phase == "train"),
    }


def run(
    quick: bool,
    datasets: Path = DEFAULT_DATASETS,
    out: Path = DEFAULT_OUT,
    methods: Optional[List[str]] = None,
    rounds: Optional[int] = None,
    local_steps: Optional[int] = None,
) -> Dict[str, Any]:
    """Quick: 2 rounds of 2 local steps, 8 held-out rows per task; full: 4 rounds of 8 steps,
    16 rows per task (`--rounds`, `--local-steps` override)."""
    import torch

    from jetfed.coordinator.config import parse_config
    from jetfed.coordinator.fleet import run_local_fleet
    from jetfed.profiles.records import load_run
    from jetfed.profiles.report import build_report

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = methods or list(METHODS)
    default_rounds, default_steps, eval_rows = (2, 2, 8) if quick else (4, 8, 16)
    rounds, local_steps = rounds or default_rounds, local_steps or default_steps
    work = out / "method_comparison"
    shutil.rmtree(work, ignore_errors=True)
    folders = build_federation(datasets, work / "data", len(TASKS), eval_rows)
    run_dirs = []
    for method in chosen:
        raw = experiment(method, folders, rounds, local_steps)
        config = parse_config(dict(raw, output_dir=str(work / "runs")), f"compare-{method}")
        run_local_fleet(config, len(TASKS), own_broker="mosquitto")
        run_dirs.append(config.run_dir)
    runs = [load_run(path) for path in run_dirs]
    target = common_target(runs)
    report = build_report(run_dirs, work / "report", target_accuracy=target)
    rows = [method_row(run, target) for run in runs]
    return {
        "model": "SmolLM2-135M-Instruct",
        "devices": len(TASKS),
        "tasks": list(TASKS),
        "rounds": rounds,
        "local_steps": local_steps,
        "target_eval_loss": target,
        "methods": rows,
        "report": str(report.markdown_path),
    }


def markdown(results: Dict[str, Any]) -> str:
    header = [
        "method",
        "best loss",
        "up MB/dev/round",
        "down MB/dev/round",
        "train s/dev/round",
        "peak RSS MB",
        "coord s/round",
        "rounds→target",
        "MB→target",
        "device s→target",
    ]
    rows = [
        [
            r["method"],
            r["best_loss"],
            r["up_bytes_per_device_round"] / 1e6,
            r["down_bytes_per_device_round"] / 1e6,
            r["train_s_per_device_round"],
            r["peak_rss_bytes"] / 1e6,
            r["coordinator_s_per_round"],
            r["rounds_to_target"],
            None if r["bytes_to_target"] is None else r["bytes_to_target"] / 1e6,
            r["device_s_to_target"],
        ]
        for r in results["methods"]
    ]
    return (
        f"{results['model']}, {results['devices']} devices (one task each: "
        f"{', '.join(results['tasks'])}), {results['rounds']} rounds × "
        f"{results['local_steps']} local steps; target eval loss "
        f"{results['target_eval_loss']:.4f} (the worst of the methods' best; fedcollm: its "
        "coordinator's LLM, whose devices hold a 4-layer SLM).\n\n"
        + table(header, rows)
        + f"\n\nPlots and per-round tables: {results['report']}\n"
    )
