"""`jetfed profiles ...` commands. `group` is module-level so other modules can add commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

group = typer.Typer(help="Energy and time profiles.", no_args_is_help=True)


@group.command("energy")
def energy(
    tegrastats: Path = typer.Option(..., "--tegrastats", help="A tegrastats log file."),
    interval_ms: Optional[int] = typer.Option(
        None,
        "--interval-ms",
        help="tegrastats --interval used; only needed when lines carry no usable timestamps "
        "(default 1000).",
    ),
) -> None:
    """Energy (J), duration and mean/peak power of a tegrastats log, as JSON.

    Per rail and for the module: on AGX Orin module = VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0
    (VDDQ_VDD2_1V8AO is inside VIN_SYS_5V0); on Orin NX/Nano it is VDD_IN.
    """
    from jetfed.profiles.energy import analyse_tegrastats_file

    typer.echo(analyse_tegrastats_file(tegrastats, interval_ms).model_dump_json(indent=2))


@group.command("report")
def report(
    run_dirs: List[Path] = typer.Argument(
        ..., metavar="RUN_DIR...", help="runs/<experiment> folders."
    ),
    target_accuracy: Optional[float] = typer.Option(
        None,
        "--target-accuracy",
        help="Accuracy for the *-to-target table (default: the best every evaluated run reached).",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: RUN_DIR/report, or beside the first run)."
    ),
    round_index: Optional[int] = typer.Option(
        None, "--round", help="Round index (0-based) of the power trace plot (default: last)."
    ),
) -> None:
    """report.md, report.html and PNG plots comparing runs: accuracy vs time and energy,
    time/energy/bytes-to-target, energy per phase, power traces, peak memory, bytes per round."""
    from jetfed.profiles.report import build_report, default_out_dir

    result = build_report(run_dirs, out or default_out_dir(run_dirs), target_accuracy, round_index)
    typer.echo(f"report: {result.markdown_path}")
    typer.echo(f"        {result.html_path}")


@group.command("serve")
def serve(
    run_dirs: List[Path] = typer.Argument(
        ..., metavar="RUN_DIR...", help="runs/<experiment> folders (finished or running)."
    ),
    address: str = typer.Option(
        "127.0.0.1:8080", "--ui", metavar="HOST:PORT", help="Where to serve the page."
    ),
    ui_token: Optional[str] = typer.Option(
        None,
        "--ui-token",
        envvar="JETFED_UI_TOKEN",
        help="Token the page asks of browsers beyond loopback (default: generated, printed once).",
    ),
    target_accuracy: Optional[float] = typer.Option(
        None, "--target-accuracy", help="Accuracy of the *-to-target line (default as report)."
    ),
) -> None:
    """The live page over finished runs (compare them), until Ctrl-C: the report's numbers."""
    import time

    from jetfed.coordinator.ui.server import UiServer, parse_address
    from jetfed.coordinator.ui.state import LiveState
    from jetfed.profiles.records import load_run

    for path in run_dirs:
        load_run(path)  # one line naming a folder that is not a run
    host, port = parse_address(address)
    title = "jetfed runs: " + ", ".join(path.name for path in run_dirs)
    state = LiveState(title, run_dirs, live=False, target_accuracy=target_accuracy)
    with UiServer(state, host, port, ui_token) as server:
        typer.echo(server.banner() + " (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="profiles")
