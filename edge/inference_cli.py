"""`jetfed edge bench-inference MODEL.onnx`: latency, throughput and energy of ONNX inference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import typer

from jetfed.edge.errors import flag_error

if TYPE_CHECKING:
    from jetfed.edge.inference import BenchResult


def _fmt(value: Optional[float], unit: str, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}g} {unit}"


def result_rows(result: BenchResult) -> List[Tuple[str, str]]:
    """The table's (metric, value) rows; energy rows say n/a without a power sensor."""
    settings = result.settings
    return [
        ("model", settings.model_path),
        ("provider used", result.provider_used),
        ("providers requested", ", ".join(result.providers_requested)),
        ("shape", f"batch {settings.batch_size} × seq {settings.seq_len}"),
        ("runs", f"{result.iterations} in {result.duration_s:.2f} s"),
        ("setup + warm-up", _fmt(result.setup_s, "s")),
        ("latency p50", _fmt(result.latency_p50_ms, "ms")),
        ("latency p95", _fmt(result.latency_p95_ms, "ms")),
        ("throughput", _fmt(result.throughput_per_s, "inferences/s")),
        ("energy / inference", _fmt(result.energy_per_inference_j, "mJ", 1000.0)),
        ("energy / batch", _fmt(result.energy_per_batch_j, "mJ", 1000.0)),
        ("mean power", _fmt(result.mean_power_w, "W")),
        ("peak RSS", _fmt(result.peak_rss_bytes, "MB", 1e-6)),
        ("telemetry", f"{result.telemetry_backend} ({result.telemetry_samples} samples)"),
        ("power mode", result.context.nvpmodel_mode or "n/a"),
    ]


def bench_inference_command(
    model: Path = typer.Argument(..., metavar="MODEL.onnx", help="From `jetfed export-onnx`."),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    seq_len: int = typer.Option(64, "--seq-len", min=1),
    iterations: int = typer.Option(100, "--iterations", min=1, help="Timed runs (at least)."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed runs first."),
    min_seconds: float = typer.Option(
        3.0, "--min-seconds", min=0, help="Keep running until this long (enough power samples)."
    ),
    providers: Optional[str] = typer.Option(
        None, "--providers", help="Comma list, best first: tensorrt,cuda,cpu (default: all here)."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU intra-op threads."),
    telemetry: str = typer.Option("auto", "--telemetry", help="auto, jtop, tegrastats, psutil..."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result here."),
) -> None:
    """Run the model with ONNX Runtime on the best provider and report what it cost."""
    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from jetfed.edge.inference import BenchSettings, bench_inference

    try:
        settings = BenchSettings(
            model_path=str(model),
            batch_size=batch_size,
            seq_len=seq_len,
            iterations=iterations,
            warmup=warmup,
            min_seconds=min_seconds,
            providers=[p for p in providers.split(",") if p.strip()] if providers else None,
            threads=threads,
            telemetry=telemetry,
        )
    except ValidationError as exc:
        raise flag_error(exc) from None
    result = bench_inference(settings)
    table = Table(title=f"ONNX Runtime {result.onnxruntime_version} inference")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result_rows(result):
        table.add_row(name, value)
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(result.model_dump_json(indent=2))


def register(app: typer.Typer) -> None:
    from jetfed.edge.cli import group

    group.command("bench-inference")(bench_inference_command)
