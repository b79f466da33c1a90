"""`jetfed profiles ...` commands. `group` is module-level so other modules can add commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    from profiles.energy import analyse_tegrastats_file

    typer.echo(analyse_tegrastats_file(tegrastats, interval_ms).model_dump_json(indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="profiles")
