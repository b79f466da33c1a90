"""The FeDeRA reproduction: FeDeRA vs LoRA vs full fine-tuning on non-IID data, over the real
protocol.

Accuracy per round comes from a simulation of each experiment (`jetfed simulate`: the same
coordinator, agents and wire over the in-memory link, ending on the bit-identical global state
of a deployed run with the same seed); time, bytes and energy per round from a short deployed
run of the same experiment (`COST_ROUNDS` rounds): a local fleet
(`jetfed.coordinator.fleet.run_local_fleet`), i.e. a private Mosquitto, the coordinator, and one
`jetfed edge run` process per client (1 torch thread each), optionally each behind an emulated
link (`--link`, root only). Costs to a target are the rounds the simulation needed times the
deployed run's mean cost per round (a round costs the same whatever the accuracy).

Data: SST-2 and 20 Newsgroups, Dirichlet α = 0.5 over 10 clients, MiniLM (≤ 64 tokens),
batch 16, the same local steps per round for every method; per-method learning rates from the
calibration in NOTES.md (LoRA 1e-3, FeDeRA 5e-4, full 2e-5). 20 Newsgroups is evaluated on a
fixed random subset of its test split (the file is sorted by class, so its first rows would be
two classes only).

Reported per method: accuracy per round; rounds-, wall-clock-, bytes- and (where a power sensor
exists) energy-to-target; and a modelled per-device time-to-target (local steps × the method's
standalone step time on one core + the device's bytes over a 100 or a 10 Mbit/s link), because ten
processes sharing two cores is not ten devices. `budget_min` caps the simulations: each gets
an equal share of what is left, and stops after the round that exhausts it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from bench.runner import DEFAULT_DATASETS, DEFAULT_OUT, table
from jetfed.coordinator.sweep import completed_rounds

CLIENTS = 10
ALPHA = 0.5
METHODS = ("federa", "lora", "full")
"""The reproduced methods; each trains at its `default_learning_rate` (calibrated in NOTES.md)."""
MODELLED_LINK_BYTES_PER_S = 100e6 / 8
SLOW_LINK_BYTES_PER_S = 10e6 / 8
"""The modelled device time is also given over a 10 Mbit/s link (weak Wi-Fi, shared uplink)."""
FIXED_TARGETS = {"sst2": (0.70, 0.75, 0.80), "20newsgroups": (0.30, 0.40, 0.50), "rte": (0.55,)}
COST_ROUNDS = 2
"""Deployed rounds per (dataset, method) for the cost columns (1 in quick mode)."""
STEP_TIME_RESERVE_S = 240.0
"""Kept from the budget for the standalone step timings after the fleets."""
RELATIVE_TARGET = 0.95
"""Also: 95 % of the best accuracy any method reached on the dataset (the papers' style)."""
NEWSGROUPS_EVAL_SAMPLES = 500


def learning_rate(method: str) -> float:
    from jetfed.edge.methods.base import get_method

    return get_method(method).default_learning_rate


@dataclass(frozen=True)
class Plan:
    datasets: List[str]
    methods: List[str]
    clients: int
    """Edge processes; they take Dirichlet clients 0..clients-1 of the CLIENTS-way split."""
    clients_per_round: int
    rounds: int
    local_steps: int
    max_eval_samples: Optional[int]
    step_time_steps: int
    seed: int = 0
    """Dirichlet partition and training seed."""
    cost_rounds: int = COST_ROUNDS
    simulation_workers: int = 0
    """Processes the simulated devices train in (0: the simulation's own, one at a time)."""


def plan(
    quick: bool,
    rounds: Optional[int],
    clients: Optional[int],
    clients_per_round: Optional[int],
    local_steps: Optional[int] = None,
    seed: int = 0,
    methods: Optional[List[str]] = None,
    datasets: Optional[List[str]] = None,
) -> Plan:
    """The default plan, narrowed to `methods`/`datasets` if given."""
    chosen_methods = methods or list(METHODS)
    chosen_datasets = datasets or ["sst2", "20newsgroups"]
    unknown = sorted(set(chosen_methods) - set(METHODS)) + sorted(
        set(chosen_datasets) - set(FIXED_TARGETS)
    )
    if unknown:
        raise ValueError(f"unknown method or dataset {unknown[0]!r}")
    if quick:
        processes = clients or 2
        return Plan(
            chosen_datasets,
            chosen_methods,
            processes,
            clients_per_round or processes,
            rounds or 2,
            local_steps or 2,
            32,
            1,
            seed,
            cost_rounds=1,
        )
    processes = clients or CLIENTS
    return Plan(
        chosen_datasets,
        chosen_methods,
        processes,
        clients_per_round or processes,
        rounds or 10,
        local_steps or 20,
        None,
        10,
        seed,
        simulation_workers=min(os.cpu_count() or 1, clients_per_round or processes),
    )


class BudgetReached(Exception):
    """Raised from the round callback: the run stops cleanly after a completed round."""


def prepare_dataset(name: str, datasets: Path, work: Path) -> Path:
    """The dataset folder a run uses; 20 Newsgroups gets a seeded random validation subset."""
    source = datasets / name
    if not (source / "train.jsonl").exists():
        raise FileNotFoundError(f"dataset {name} not found under {datasets}")
    if name != "20newsgroups":
        return source
    target = work / "datasets" / name
    target.mkdir(parents=True, exist_ok=True)
    for file in ("train.jsonl", "labels.json"):
        link = target / file
        if not link.exists():
            link.symlink_to((source / file).resolve())
    rows = (source / "test.jsonl").read_text(encoding="utf-8").splitlines()
    chosen = random.Random(0).sample(range(len(rows)), NEWSGROUPS_EVAL_SAMPLES)
    (target / "validation.jsonl").write_text("\n".join(rows[i] for i in sorted(chosen)) + "\n")
    return target


def experiment(
    dataset: str, data_dir: Path, method: str, setup: Plan, output_dir: Path
) -> Dict[str, Any]:
    return {
        "name": f"repro-{dataset}-{method}" + (f"-seed{setup.seed}" if setup.seed else ""),
        "seed": setup.seed,
        "model": {"name_or_path": "minilm", "max_length": 64},
        "method": {"name": method},
        "training": {
            "local_steps": setup.local_steps,
            "batch_size": 16,
            "learning_rate": learning_rate(method),
        },
        "data": {
            "path": str(data_dir),
            "partition": {
                "kind": "dirichlet",
                "num_clients": CLIENTS,
                "alpha": ALPHA,
                "seed": setup.seed,
            },
            "max_eval_samples": setup.max_eval_samples,
        },
        "rounds": {
            "count": setup.rounds,
            "min_clients": setup.clients_per_round,
            "clients_per_round": setup.clients_per_round,
            "deadline_s": 1800,
            "wait_for_devices_s": 600,
        },
        "output_dir": str(output_dir),
    }


def cost_experiment(raw: Dict[str, Any], rounds: int) -> Dict[str, Any]:
    """The deployed run that measures a round's time, bytes and energy: the same experiment,
    `rounds` rounds."""
    return dict(raw, name=f"{raw['name']}-cost", rounds=dict(raw["rounds"], count=rounds))


def standalone_step_s(method: str, data_dir: Path, steps: int = 5) -> float:
    """One process, one torch thread, nothing else of ours running: seconds per local step."""
    import torch

    from jetfed.edge.data import load_split
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.models import load_tokenizer
    from jetfed.edge.train import train_local
    from jetfed.edge.wire import ModelRef, TrainingConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        labels = json.loads((data_dir / "labels.json").read_text())
        ref = ModelRef(name_or_path="minilm", num_labels=len(labels), max_length=64)
        instance = get_method(method)({}, ref)
        model = instance.build(instance.initial_state(0).init, seed=0)
        tokenizer = load_tokenizer(ref)
        dataset = load_split(str(data_dir), "train").subset(range(2000))

        def timed(count: int) -> float:
            training = TrainingConfig(
                local_steps=count, batch_size=16, learning_rate=learning_rate(method)
            )
            started = time.perf_counter()
            train_local(model, tokenizer, dataset, training, 64, "cpu", seed=count)
            return time.perf_counter() - started

        timed(1)
        return (timed(steps + 1) - timed(1)) / steps
    finally:
        torch.set_num_threads(threads)


def run_one(
    raw: Dict[str, Any],
    clients: int,
    link: Optional[str],
    budget_s: float,
    resume: bool = False,
    simulation_workers: Optional[int] = None,
) -> str:
    """One fleet run, or with `simulation_workers` set a simulated one (`jetfed simulate`);
    returns how it ended ("completed", "budget", or the error). `resume` continues a run
    directory left by an earlier invocation (up to this one's round count)."""
    from jetfed.coordinator.config import parse_config
    from jetfed.coordinator.fleet import run_local_fleet
    from jetfed.coordinator.simulate import simulate

    config = parse_config(raw, raw["name"])
    done = completed_rounds(config.run_dir) if resume else 0
    if done >= config.rounds.count:
        return f"completed earlier ({done} rounds)"
    if config.run_dir.exists() and not done:
        shutil.rmtree(config.run_dir)
    started = time.monotonic()

    def on_round(metrics: Any) -> None:
        if time.monotonic() - started > budget_s and metrics.round_index + 1 < config.rounds.count:
            raise BudgetReached(f"after round {metrics.round_index}")

    try:
        if simulation_workers is not None:
            simulate(config, clients, bool(done), on_round, workers=simulation_workers)
        else:
            run_local_fleet(
                config,
                clients,
                link=link,
                own_broker="mosquitto",
                on_round=on_round,
                resume=bool(done),
            )
    except BudgetReached as exc:
        return f"budget ({exc})"
    except Exception as exc:  # one failed run must not lose the others
        return f"failed: {type(exc).__name__}: {exc}"
    return "completed"


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_target(rounds: List[Dict[str, Any]], target: float) -> Optional[Dict[str, Any]]:
    """Costs summed up to the first round whose accuracy reaches `target`; None if never. A
    cost some round lacks (no power sensor, a failed cost run) is None, never a partial sum."""
    sums: Dict[str, Optional[float]] = dict.fromkeys(TARGET_COSTS, 0.0)
    for item in rounds:
        for name, cost in TARGET_COSTS.items():
            total, value = sums[name], cost(item)
            sums[name] = None if total is None or value is None else total + value
        if item["accuracy"] is not None and item["accuracy"] >= target:
            return {"rounds": item["round_index"] + 1, **sums}
    return None


def _bytes(item: Dict[str, Any]) -> Optional[float]:
    up, down = item["bytes_up"], item["bytes_down"]
    return None if up is None or down is None else up + down


TARGET_COSTS: Dict[str, Callable[[Dict[str, Any]], Optional[float]]] = {
    "wall_s": lambda item: item["active_s"],
    "bytes": _bytes,
    "modelled_device_s": lambda item: item["modelled_device_s"],
    "modelled_device_s_slow_link": lambda item: item["modelled_device_s_slow_link"],
    "energy_j": lambda item: item["energy_j"],
}


def active_round_s(run_dir: Path) -> Dict[int, float]:
    """Per round, the devices' span (first download start → last upload end) minus the longest
    setup phase: round 0's setup is model construction (a minute when ten processes start on
    two shared cores), and round 0's `round_s` also counts waiting for devices to start."""
    spans: Dict[int, List[float]] = {}
    setup: Dict[int, float] = {}
    for record in _read_jsonl(run_dir / "profiles.jsonl"):
        index = record["round_index"]
        if record["phase"] in ("download", "upload"):
            span = spans.setdefault(index, [record["start_unix_s"], record["end_unix_s"]])
            span[0] = min(span[0], record["start_unix_s"])
            span[1] = max(span[1], record["end_unix_s"])
        elif record["phase"] == "setup":
            setup[index] = max(setup.get(index, 0.0), record["duration_s"])
    return {index: end - start - setup.get(index, 0.0) for index, (start, end) in spans.items()}


def round_energy_j(run_dir: Path) -> Dict[int, Optional[float]]:
    """Per round, the devices' energy over every phase in profiles.jsonl, upload included (the
    round's metrics close before its upload records arrive); None without a power sensor."""
    from jetfed.coordinator.records import device_totals
    from jetfed.edge.telemetry.records import PhaseRecord

    by_round: Dict[int, List[PhaseRecord]] = {}
    for raw in _read_jsonl(run_dir / "profiles.jsonl"):
        record = PhaseRecord.model_validate(raw)
        by_round.setdefault(record.round_index, []).append(record)
    return {index: device_totals(records).get("energy_j") for index, records in by_round.items()}


COST_KEYS = (
    "round_s",
    "active_s",
    "eval_s",
    "bytes_up",
    "bytes_down",
    "energy_j",
    "modelled_device_s",
    "modelled_device_s_slow_link",
)


def summarize_run(
    run_dir: Path, local_steps: int, step_s: float, cost_dir: Optional[Path] = None
) -> Dict[str, Any]:
    """Per round: accuracy and costs of `run_dir`; with `cost_dir` (a deployed run of the same
    experiment), every round's costs are that run's mean per round instead."""
    rounds = round_rows(run_dir, local_steps, step_s)
    if cost_dir is None:
        return {"rounds": rounds}
    measured = round_rows(cost_dir, local_steps, step_s)
    for key in COST_KEYS:
        values = [row[key] for row in measured]
        mean = None if not values or None in values else sum(values) / len(values)
        for row in rounds:
            row[key] = mean
    return {"rounds": rounds, "cost_rounds_measured": len(measured)}


def round_rows(run_dir: Path, local_steps: int, step_s: float) -> List[Dict[str, Any]]:
    active = active_round_s(run_dir)
    energy = round_energy_j(run_dir)
    rounds = []
    for metric in _read_jsonl(run_dir / "metrics.jsonl"):
        devices = max(1, metric["num_aggregated"])
        per_device_bytes = (metric["bytes_up"] + metric["bytes_down"]) / devices
        rounds.append(
            {
                "round_index": metric["round_index"],
                "accuracy": metric["accuracy"],
                "eval_loss": metric["eval_loss"],
                "train_loss": metric["train_loss"],
                "round_s": metric["round_s"],
                "active_s": active.get(metric["round_index"], metric["round_s"])
                + metric["eval_s"]
                + metric["aggregate_s"],
                "eval_s": metric["eval_s"],
                "bytes_up": metric["bytes_up"],
                "bytes_down": metric["bytes_down"],
                "energy_j": energy.get(metric["round_index"]),
                "modelled_device_s": local_steps * step_s
                + per_device_bytes / MODELLED_LINK_BYTES_PER_S,
                "modelled_device_s_slow_link": local_steps * step_s
                + per_device_bytes / SLOW_LINK_BYTES_PER_S,
            }
        )
    return rounds


def add_targets(dataset: str, by_method: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    best = max(
        (r["accuracy"] or 0.0 for run in by_method.values() for r in run.get("rounds", [])),
        default=0.0,
    )
    targets = {f"{t:.2f}": t for t in FIXED_TARGETS.get(dataset, ())}
    if best > 0:
        targets[f"{RELATIVE_TARGET:.0%} of best ({best * RELATIVE_TARGET:.3f})"] = (
            best * RELATIVE_TARGET
        )
    for run in by_method.values():
        run["to_target"] = {
            name: to_target(run.get("rounds", []), t) for name, t in targets.items()
        }
    return {"best_accuracy": best, "targets": targets}


def plot(dataset: str, by_method: Dict[str, Dict[str, Any]], out: Path) -> Optional[str]:
    """Accuracy vs rounds, vs wall-clock and vs bytes; one PNG per dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, run in by_method.items():
        rounds = [r for r in run.get("rounds", []) if r["accuracy"] is not None]
        if not rounds:
            continue
        accuracy = [r["accuracy"] for r in rounds]
        wall, total_bytes = [], []
        wall_s = sent = 0.0
        for item in rounds:
            wall_s += item["active_s"]
            sent += item["bytes_up"] + item["bytes_down"]
            wall.append(wall_s / 60)
            total_bytes.append(sent / 1e6)
        axes[0].plot([r["round_index"] + 1 for r in rounds], accuracy, marker="o", label=method)
        axes[1].plot(wall, accuracy, marker="o", label=method)
        axes[2].plot(total_bytes, accuracy, marker="o", label=method)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("wall-clock on this machine, excl. device start-up (min)")
    axes[2].set_xlabel("bytes on the wire, all devices (MB)")
    axes[2].set_xscale("log")
    for axis in axes:
        axis.set_ylabel("validation accuracy")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(f"{dataset}: Dirichlet α={ALPHA} over {CLIENTS} clients, MiniLM")
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"reproduction-{dataset}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


def run(
    quick: bool,
    datasets: Path = DEFAULT_DATASETS,
    link: Optional[str] = None,
    out: Path = DEFAULT_OUT,
    rounds: Optional[int] = None,
    budget_min: Optional[float] = None,
    clients: Optional[int] = None,
    clients_per_round: Optional[int] = None,
    local_steps: Optional[int] = None,
    seed: int = 0,
    methods: Optional[List[str]] = None,
    only_datasets: Optional[List[str]] = None,
    resume_runs: bool = False,
    runs_dir: Path = DEFAULT_OUT / "reproduction-runs",
) -> Dict[str, Any]:
    """Run dirs (checkpoints, exports: GBs for full fine-tuning) go to `runs_dir`; the JSON,
    Markdown and plots to `out`. `resume_runs` continues runs an earlier invocation left in
    `runs_dir` (stopped by its budget) up to `rounds`, and reports every run from its files."""
    setup = plan(
        quick, rounds, clients, clients_per_round, local_steps, seed, methods, only_datasets
    )
    work = runs_dir
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    budget_s = budget_min * 60 if budget_min else float("inf")
    data_dirs = {name: prepare_dataset(name, datasets, work) for name in setup.datasets}
    results: Dict[str, Any] = {
        "setup": {
            "clients": setup.clients,
            "clients_per_round": setup.clients_per_round,
            "dirichlet_clients": CLIENTS,
            "alpha": ALPHA,
            "rounds": setup.rounds,
            "seed": setup.seed,
            "local_steps": setup.local_steps,
            "batch_size": 16,
            "max_length": 64,
            "max_eval_samples": setup.max_eval_samples,
            "newsgroups_eval_samples": NEWSGROUPS_EVAL_SAMPLES,
            "learning_rates": {m: learning_rate(m) for m in setup.methods},
            "accuracy_from": "jetfed simulate (virtual devices)",
            "cost_rounds": setup.cost_rounds,
            "simulation_workers": setup.simulation_workers,
            "link": link or "loopback",
            "budget_min": budget_min,
            "modelled_link_mbit_s": MODELLED_LINK_BYTES_PER_S * 8 / 1e6,
            "slow_link_mbit_s": SLOW_LINK_BYTES_PER_S * 8 / 1e6,
        },
        "datasets": {},
    }
    # Full fine-tuning last: it is the slowest per round, and runs that end early (round cap)
    # leave their share of the budget to the runs after them.
    pending = sorted(
        ((d, m) for d in setup.datasets for m in setup.methods), key=lambda dm: dm[1] == "full"
    )
    for index, (dataset, method) in enumerate(pending):
        left_s = budget_s - (time.monotonic() - started) - STEP_TIME_RESERVE_S
        raw = experiment(dataset, data_dirs[dataset], method, setup, work / "runs")
        cost = cost_experiment(raw, setup.cost_rounds)
        run_started = time.monotonic()
        share_s = left_s / (len(pending) - index)
        workers = setup.simulation_workers
        ended = run_one(raw, setup.clients, None, share_s, resume_runs, simulation_workers=workers)
        simulated_s = time.monotonic() - run_started
        cost_ended = run_one(cost, setup.clients, link, float("inf"), resume_runs)
        entry = results["datasets"].setdefault(dataset, {"methods": {}})
        entry["methods"][method] = {
            "ended": ended,
            "cost_run_ended": cost_ended,
            "run_wall_s": time.monotonic() - run_started,
            "simulation_wall_s": simulated_s,
            "learning_rate": raw["training"]["learning_rate"],
            "run_dir": str(Path(raw["output_dir"]) / raw["name"]),
            "cost_run_dir": str(Path(cost["output_dir"]) / cost["name"]),
        }
        (work / "reproduction.partial.json").write_text(json.dumps(results, indent=2) + "\n")
    # Measured after the fleets, so fleet processes do not slow it (other users still may).
    results["load_average_at_step_timing"] = os.getloadavg()[0]
    results["standalone_step_s"] = {
        dataset: {
            method: standalone_step_s(method, data_dirs[dataset], setup.step_time_steps)
            for method in setup.methods
        }
        for dataset in setup.datasets
    }
    for dataset, entry in results["datasets"].items():
        for method, summary in entry["methods"].items():
            step_s = results["standalone_step_s"][dataset][method]
            summary.update(
                summarize_run(
                    Path(summary["run_dir"]),
                    setup.local_steps,
                    step_s,
                    Path(summary["cost_run_dir"]),
                )
            )
        entry.update(add_targets(dataset, entry["methods"]))
        entry["plot"] = plot(dataset, entry["methods"], out)
    results["total_wall_s"] = time.monotonic() - started
    return results


def _fmt_target(hit: Optional[Dict[str, Any]]) -> List[Any]:
    if hit is None:
        return ["not reached", None, None, None, None, None]
    energy = hit["energy_j"]
    return [
        hit["rounds"],
        hit["wall_s"],
        hit["bytes"] / 1e6,
        hit["modelled_device_s"],
        hit.get("modelled_device_s_slow_link"),  # absent in reports from before it existed
        "no sensor" if energy is None else energy,
    ]


def _earlier_note(results: Dict[str, Any]) -> str:
    """Runs continued or skipped with --resume-runs spent most of their time in an earlier call."""
    runs = [run for entry in results["datasets"].values() for run in entry["methods"].values()]
    if not any(run["ended"].startswith("completed earlier") for run in runs):
        return ""
    return " in this invocation (--resume-runs: the rest ran in an earlier one)"


def _sources_note(setup: Dict[str, Any]) -> str:
    if "accuracy_from" not in setup:  # reports from before the simulation engine
        return "Accuracy and costs from the same deployed runs."
    return (
        f"Accuracy per round from {setup['accuracy_from']}; time, bytes and energy per round: "
        f"the mean of {setup['cost_rounds']} deployed round(s) of the same experiment, "
        "times the rounds to each target."
    )


def markdown(results: Dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        f"{setup['clients']} edge processes, {setup['clients_per_round']} per round (Dirichlet "
        f"α={setup['alpha']} over {setup['dirichlet_clients']} clients; the processes hold "
        f"clients 0–{setup['clients'] - 1}), {setup['local_steps']} local steps × batch "
        f"{setup['batch_size']} per round, ≤ {setup['max_length']} tokens, link "
        f"{setup['link']}, learning rates {setup['learning_rates']}, seed "
        f"{setup.get('seed', 0)}. Total "
        f"{results['total_wall_s'] / 60:.1f} min{_earlier_note(results)}.",
        "",
        _sources_note(setup),
        "",
    ]
    for dataset, entry in results["datasets"].items():
        lines += [f"## {dataset}", ""]
        header = ["method", "lr", "rounds run", "accuracy per round", "best", "ended"]
        rows = []
        for method, run in entry["methods"].items():
            accuracy = [r["accuracy"] for r in run["rounds"]]
            rows.append(
                [
                    method,
                    run["learning_rate"],
                    len(run["rounds"]),
                    " ".join(f"{a:.3f}" for a in accuracy if a is not None),
                    max((a for a in accuracy if a is not None), default=None),
                    run["ended"],
                ]
            )
        lines += [table(header, rows), ""]
        target_rows = [
            [target, method, *_fmt_target(run.get("to_target", {}).get(target))]
            for target in entry.get("targets", {})
            for method, run in entry["methods"].items()
        ]
        header = [
            "target accuracy",
            "method",
            "rounds",
            "wall-clock s (this machine)",
            "MB on the wire",
            f"modelled device s ({setup['modelled_link_mbit_s']:.0f} Mbit/s)",
            f"… ({setup.get('slow_link_mbit_s', SLOW_LINK_BYTES_PER_S * 8 / 1e6):.0f} Mbit/s)",
            "energy J",
        ]
        lines += ["To target:", "", table(header, target_rows), ""]
        if entry.get("plot"):
            lines += [f"![{dataset}]({Path(entry['plot']).name})", ""]
    step_rows = [
        [dataset, method, seconds]
        for dataset, by_method in results["standalone_step_s"].items()
        for method, seconds in by_method.items()
    ]
    lines += [
        "Standalone step time (1 thread):",
        "",
        table(["dataset", "method", "s/step"], step_rows),
    ]
    return "\n".join(lines)
