"""Sweeps: one experiment YAML × a grid of settings × seeds, each run simulated
(`jetfed.coordinator.simulate`), in parallel on a local process pool or an existing Ray cluster.

`--set KEY=V1,V2` gives a setting several values (commas inside [...] or {...} belong to one
YAML value); `--case "NAME: KEY=V KEY=V"` names a bundle of settings that only make sense
together (FFA-LoRA is `aggregation.strategy=ffa` *and* `method.freeze_a=true`), and the cases
are one more axis of the grid, called `case`. The grid is every combination, and each
combination (a *cell*) runs once per seed. A run's seed is the experiment's `seed` and, unless
`--set data.partition.seed=...` fixes it, the partition's too: the spread over seeds is the
spread over partitions and training, and two methods run with the same seed see the same
partition and device seeds (paired).

Runs live in OUT/runs/<name> with a name derived from the cell and seed, so a sweep is
resumable: a finished run (its checkpoint at the last round) is never rerun, an interrupted one
continues from its checkpoint. Execution is `concurrent.futures.ProcessPoolExecutor` (one run
per process, one torch thread each) or Ray tasks (`--ray auto|ADDRESS`, `pip install
jetfed[ray]`); the summary (mean ± 95 % CI per round, rounds-to-target, paired differences) is
`jetfed.profiles.sweep`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from jetfed.coordinator.config import load_config
from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event
from jetfed.edge.parent_watch import spawned_pool
from jetfed.profiles.sweep import CASE_KEY

logger = logging.getLogger(__name__)

SEED_KEYS = ("seed", "data.partition.seed")
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class SweepRun:
    """One simulated run of the grid: a cell (the swept settings, in `--set` order) × a seed."""

    name: str
    cell: Tuple[Tuple[str, str], ...]
    seed: Optional[int]
    overrides: Tuple[str, ...]
    run_dir: str
    rounds: int

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.cell) or "(base)"


def parse_seeds(text: str) -> List[int]:
    """`0-4`, `0,2,7` or `3` → the seeds, in order, without repeats."""
    seeds: List[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise UserError(f"--seeds {text!r}: expected 0-4, 0,2,7 or 3") from None
        if low < 0 or high < low or high - low >= MAX_SEEDS:
            raise UserError(f"--seeds {text!r}: a range is LOW-HIGH with 0 <= LOW <= HIGH")
        seeds.extend(seed for seed in range(low, high + 1) if seed not in seeds)
    return seeds


def split_values(text: str, separator: str = ",") -> List[str]:
    """`a,b,[c,d]` → [`a`, `b`, `[c,d]`]: separators at bracket depth 0 separate values
    (`separator=" "`: any whitespace, runs of it counting once)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if depth == 0 and (char == separator or (separator == " " and char.isspace())):
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    stripped = [value.strip() for value in values]
    return [value for value in stripped if value] if separator == " " else stripped


def parse_sets(sets: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """`KEY=V1,V2` options → [(KEY, [V1, V2])], in order; a key given twice is a mistake."""
    grid: List[Tuple[str, List[str]]] = []
    for option in sets:
        key, sep, values = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {option!r} must look like section.key=value[,value...]")
        if any(key == seen for seen, _ in grid):
            raise UserError(f"--set {key} is given twice: list its values once, comma-separated")
        grid.append((key, split_values(values)))
    return grid


def parse_cases(cases: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """`NAME: KEY=V KEY=V` options → [(NAME, [KEY=V, ...])], in order (values with spaces go in
    YAML flow brackets: `assignment.devices={demo-01: {rank: 4}}`)."""
    parsed: List[Tuple[str, List[str]]] = []
    for option in cases:
        name, sep, rest = option.partition(":")
        name = name.strip()
        settings = split_values(rest, " ")
        if not sep or not name or not settings or any("=" not in s for s in settings):
            raise UserError(f"--case {option!r} must look like 'NAME: section.key=value ...'")
        if any(name == seen for seen, _ in parsed):
            raise UserError(f"--case {name} is given twice: give each case its own name")
        parsed.append((name, settings))
    return parsed


def is_sweep(sets: Sequence[str], seeds: Optional[str], cases: Sequence[str] = ()) -> bool:
    many = any(len(values) > 1 for _, values in parse_sets(sets))
    return seeds is not None or bool(cases) or many


def run_name(base: str, cell: Sequence[Tuple[str, str]], seed: Optional[int]) -> str:
    """Stable for a cell and seed (whatever else the grid holds), so reruns find their runs."""
    digest = hashlib.sha256(json.dumps(list(cell)).encode()).hexdigest()[:8]
    suffix = "" if seed is None else f"-s{seed}"
    return f"{base[:40]}-{digest}{suffix}"


def plan_sweep(
    config_path: str,
    sets: Sequence[str],
    seeds: Optional[Sequence[int]],
    out_dir: Path,
    cases: Sequence[str] = (),
) -> List[SweepRun]:
    """Every run of the grid, each one's config validated now: a bad `--set` or `--case`
    (unknown key, bad value) is one line naming it before anything runs."""
    grid = parse_sets(sets)
    case_settings = dict(parse_cases(cases))
    set_keys = {key for key, _ in grid}
    for name, settings in case_settings.items():
        for key in {setting.partition("=")[0].strip() for setting in settings} & set_keys:
            raise UserError(f"--case {name} sets {key}, which --set sets too: keep one")
    base = load_config(config_path, [f"{key}={values[0]}" for key, values in grid])
    swept = [(key, values) for key, values in grid if len(values) > 1]
    if case_settings:
        swept.insert(0, (CASE_KEY, list(case_settings)))
    fixed = [f"{key}={values[0]}" for key, values in grid if len(values) == 1]
    seed_keys = [key for key in SEED_KEYS if all(key != k for k, _ in grid)]
    runs = []
    for combination in itertools.product(*(values for _, values in swept)):
        cell = tuple(zip((key for key, _ in swept), combination))
        cell_overrides = [
            setting
            for key, value in cell
            for setting in (case_settings[value] if key == CASE_KEY else [f"{key}={value}"])
        ]
        # A case's settings are part of its runs' identity: an edited case is a new run.
        identity = cell + tuple((CASE_KEY, setting) for setting in cell_overrides if cases)
        for seed in seeds if seeds is not None else [None]:
            name = run_name(base.name, identity, seed)
            seeded = [] if seed is None else [f"{key}={seed}" for key in seed_keys]
            overrides = (
                *fixed,
                *cell_overrides,
                *seeded,
                f"name={name}",
                f"output_dir={out_dir / 'runs'}",
            )
            config = load_config(config_path, list(overrides))
            runs.append(
                SweepRun(name, cell, seed, overrides, str(config.run_dir), config.rounds.count)
            )
    return runs


def completed_rounds(run_dir: Path) -> int:
    """Rounds a run directory's checkpoint says are done (0 without one)."""
    state = run_dir / "checkpoint" / "state.json"
    return int(json.loads(state.read_text())["completed_round"]) + 1 if state.exists() else 0


def run_one(config_path: str, overrides: Sequence[str], clients: Optional[int]) -> Dict[str, Any]:
    """One run of a sweep, in a pool process or a Ray worker: continue it from its checkpoint
    if an earlier sweep left one, start afresh otherwise."""
    import torch

    from jetfed.coordinator.simulate import simulate

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    logging.getLogger("jetfed").setLevel(logging.WARNING)
    config = load_config(config_path, list(overrides))
    done = completed_rounds(config.run_dir)
    if done >= config.rounds.count:
        return {"name": config.name, "status": "completed earlier", "wall_s": 0.0}
    if config.run_dir.exists() and not done:
        shutil.rmtree(config.run_dir)
    started = time.monotonic()
    try:
        simulate(config, clients, resume=bool(done))
    except Exception as exc:  # one failed run must not lose the others
        status = f"failed: {type(exc).__name__}: {exc}"
    else:
        status = "completed"
    return {"name": config.name, "status": status, "wall_s": time.monotonic() - started}


Submit = Callable[[str, Sequence[SweepRun], Optional[int]], List[Dict[str, Any]]]


def run_local_pool(
    config_path: str, runs: Sequence[SweepRun], clients: Optional[int], jobs: int
) -> List[Dict[str, Any]]:
    """The runs on `jobs` processes (spawned: no torch state inherited, ended with this one),
    as they finish."""
    results = []
    with spawned_pool(max(1, jobs)) as pool:
        futures = [pool.submit(run_one, config_path, run.overrides, clients) for run in runs]
        for future in as_completed(futures):
            results.append(future.result())
            log_event(logger, logging.INFO, "sweep.run_done", **results[-1])
    return results


def run_on_ray(
    config_path: str, runs: Sequence[SweepRun], clients: Optional[int], address: Optional[str]
) -> List[Dict[str, Any]]:
    """The runs as Ray tasks of one CPU each on the cluster at `address` (`auto`: the one this
    machine belongs to; None: a local Ray started here). The config, data and OUT folder must
    be at the same paths on every node (a shared file system)."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'jetfed[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_one)
    pending = [remote.remote(config_path, run.overrides, clients) for run in runs]
    results = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(ready[0]))
        log_event(logger, logging.INFO, "sweep.run_done", **results[-1])
    return results


def default_jobs() -> int:
    """One run per core: each trains with one torch thread."""
    return os.cpu_count() or 1


def run_sweep(
    config_path: str,
    sets: Sequence[str],
    seeds: Optional[Sequence[int]],
    out_dir: Path,
    cases: Sequence[str] = (),
    clients: Optional[int] = None,
    jobs: Optional[int] = None,
    ray_address: Optional[str] = None,
    use_ray: bool = False,
    targets: Sequence[float] = (),
    last_rounds: int = 5,
    summarize_only: bool = False,
) -> Dict[str, Any]:
    """Plan, run what is not finished (nothing with `summarize_only`), summarize the finished
    runs (a run stopped half-way would bias the last rounds); returns the summary (also in
    OUT)."""
    from jetfed.profiles.sweep import SweepEntry, summarize_sweep

    runs = plan_sweep(config_path, sets, seeds, out_dir, cases)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = [run for run in runs if completed_rounds(Path(run.run_dir)) < run.rounds]
    manifest = {
        "config": str(Path(config_path).resolve()),
        "sets": list(sets),
        "cases": list(cases),
        "seeds": list(seeds) if seeds is not None else None,
        "runs": [dict(asdict(run), label=run.label) for run in runs],
    }
    (out_dir / "sweep.json").write_text(json.dumps(manifest, indent=2) + "\n")
    started = time.monotonic()
    if summarize_only:
        pending = []
    if pending and use_ray:
        results = run_on_ray(config_path, pending, clients, ray_address)
    elif pending:
        results = run_local_pool(config_path, pending, clients, jobs or default_jobs())
    else:
        results = []
    finished = [run for run in runs if completed_rounds(Path(run.run_dir)) >= run.rounds]
    entries = [
        SweepEntry(dict(run.cell), run.seed, Path(run.run_dir), run.label) for run in finished
    ]
    metric = load_config(config_path, list(runs[0].overrides)).evaluation.metric
    unfinished = [run.name for run in runs if run not in finished]
    summary = summarize_sweep(entries, out_dir, metric, targets, last_rounds, unfinished)
    summary["execution"] = {
        "backend": "ray" if use_ray else "local pool",
        "jobs": None if use_ray else (jobs or default_jobs()),
        "ran": len(pending),
        "skipped_finished": len(runs) - len(pending),
        "wall_s": time.monotonic() - started,
        "runs": results,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
