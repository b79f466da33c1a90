"""`jetfed simulate CONFIG`: one run with virtual devices, or a sweep (docs/SIMULATE.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def simulate_command(
    config_path: str = typer.Argument(..., metavar="CONFIG", help="Experiment YAML."),
    override: Optional[List[str]] = typer.Option(
        None,
        "--set",
        help="section.key=value, repeatable; section.key=v1,v2 sweeps the values (a grid with "
        "every other --set given several).",
    ),
    case: Optional[List[str]] = typer.Option(
        None,
        "--case",
        help="'NAME: section.key=value ...', repeatable: settings that vary together (e.g. "
        "'ffa: aggregation.strategy=ffa method.freeze_a=true'); the cases are one axis of the "
        "grid, and paired differences compare them.",
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Run each cell with these seeds (0-4, or 0,2,7): a sweep."
    ),
    clients: Optional[int] = typer.Option(
        None, "--clients", min=1, help="Virtual devices (default: data.partition.num_clients)."
    ),
    workers: int = typer.Option(
        0,
        "--workers",
        min=0,
        help="One run: train virtual devices in this many worker processes (one model each); "
        "0: in this process, one at a time.",
    ),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", min=1, help="A sweep: runs in parallel (default: one per CPU core)."
    ),
    ray: Optional[str] = typer.Option(
        None,
        "--ray",
        metavar="auto|ADDRESS",
        help="A sweep: run on this Ray cluster instead of a local pool (pip install "
        "'jetfed\\[ray]'; paths must be the same on every node).",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="A sweep's folder (default: OUTPUT_DIR/NAME-sweep)."
    ),
    target: Optional[List[float]] = typer.Option(
        None, "--target", help="A sweep: report rounds to this metric value (repeatable)."
    ),
    last_rounds: int = typer.Option(
        5, "--last-rounds", min=1, help="A sweep's headline: the mean of the last K rounds."
    ),
    resume: bool = typer.Option(False, "--resume", help="One run: continue from its checkpoint."),
    summarize_only: bool = typer.Option(
        False, "--summarize-only", help="A sweep: summarize the finished runs, run nothing."
    ),
) -> None:
    """Run the experiment with virtual devices: the same methods, strategies, partitions and
    seeds as a deployed run, no broker; with --seeds or several --set values, a sweep."""
    from jetfed.coordinator.config import load_config
    from jetfed.coordinator.sweep import is_sweep, parse_seeds, parse_sets, run_sweep

    sets, cases = override or [], case or []
    if is_sweep(sets, seeds, cases):
        base = load_config(config_path, [f"{k}={v[0]}" for k, v in parse_sets(sets)])
        folder = out or Path(base.output_dir) / f"{base.name}-sweep"
        summary = run_sweep(
            config_path,
            sets,
            parse_seeds(seeds) if seeds is not None else None,
            folder,
            cases,
            clients=clients,
            jobs=jobs,
            ray_address=None if ray in (None, "local") else ray,
            use_ray=ray is not None,
            targets=target or (),
            last_rounds=last_rounds,
            summarize_only=summarize_only,
        )
        execution = summary["execution"]
        failed = [r for r in execution["runs"] if r["status"].startswith("failed")]
        typer.echo(
            f"sweep: {execution['ran']} runs in {execution['wall_s']:.0f} s "
            f"({execution['skipped_finished']} finished earlier, {len(failed)} failed); "
            f"summary {folder / 'summary.md'}"
        )
        for run in failed:
            typer.echo(f"  {run['name']}: {run['status']}")
        return
    run_single(config_path, sets, clients, workers, resume)


def run_single(
    config_path: str, sets: List[str], clients: Optional[int], workers: int, resume: bool
) -> None:
    from jetfed.coordinator.config import load_config
    from jetfed.coordinator.progress import RoundTable
    from jetfed.coordinator.quality import metric_name, metric_value
    from jetfed.coordinator.simulate import default_clients, simulate
    from jetfed.profiles.report import build_report

    config = load_config(config_path, sets)
    count = clients or default_clients(config)
    with RoundTable(config, count) as table:
        metrics = simulate(config, count, resume=resume, on_round=table.add, workers=workers)
    if metrics:
        metric = metric_name(config.evaluation.metric, metrics)
        value = metric_value(metrics[-1], metric)
        shown = "n/a" if value is None else f"{value:.3f}"
        typer.echo(f"done: {len(metrics)} rounds, final validation {metric} {shown}")
    report = build_report([config.run_dir], config.run_dir / "report")
    typer.echo(f"run directory {config.run_dir}; report {report.markdown_path}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
