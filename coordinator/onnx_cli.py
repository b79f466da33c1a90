"""`jetfed export-onnx`: a run's global model as one ONNX file for on-device inference."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from jetfed.coordinator.onnx_export import DEFAULT_OPSET, PARITY_TOLERANCE


def export_onnx_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="runs/<experiment>"),
    round_index: Optional[int] = typer.Option(
        None, "--round", min=0, help="N of global/round-NNNN (as in metrics.jsonl); default: last."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="ONNX file (default: RUN_DIR/onnx/round-NNNN.onnx)."
    ),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset (>= 17)."),
) -> None:
    """Merge the global adapter into the base, export ONNX and check parity with PyTorch."""
    from jetfed.coordinator.onnx_export import export_onnx

    result = export_onnx(run_dir, round_index, out, opset)
    typer.echo(
        f"round {result.round_index} ({result.source}) → {result.onnx_path} "
        f"({result.size_bytes / 1e6:.1f} MB, opset {result.opset}, "
        f"inputs {', '.join(result.input_names)}, {result.export_s:.1f} s)"
    )
    verdict = "ok" if result.parity_ok else "FAILED"
    typer.echo(
        f"parity vs PyTorch: max abs diff {result.max_abs_diff:.3g} "
        f"(tolerance {PARITY_TOLERANCE:g}) {verdict}"
    )
    if not result.parity_ok:
        sys.exit(1)


def register(app: typer.Typer) -> None:
    app.command("export-onnx")(export_onnx_command)
