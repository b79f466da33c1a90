"""Export a run's global model to ONNX, with the federated adapter merged into the base.

A LoRA/FeDeRA round saved in PEFT format (`runs/<exp>/global/round-NNNN/adapter_config.json`) is
loaded onto its base model and merged with `merge_and_unload`, so the ONNX graph is a plain
classifier with no adapter branches; a `full` round is a saved transformers model and is
exported as it is. Parity: the ONNX Runtime (CPU) logits are compared with the logits of the
model as the run saved it (the unmerged PEFT model), on two batches of different shapes, so the
check covers the merge, the export and the dynamic batch/sequence axes together.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml

from jetfed.edge.errors import UserError
from jetfed.edge.wire import ModelRef

DEFAULT_OPSET = 17
"""17 is the newest opset TensorRT 8.5 (JetPack 5) parses; ONNX Runtime ≥ 1.14 runs it too."""
PARITY_TOLERANCE = 1e-4
EXTERNAL_DATA_ABOVE_BYTES = 1 << 30
"""ONNX protobufs cannot exceed 2 GiB; bigger models keep their weights in a side file."""
PARITY_TEXTS = (
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat, which makes two hours feel like four",
    "ok",
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_SUFFIXES = ("classifier.weight", "score.weight")


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduces PyTorch."""

    onnx_path: Path
    round_index: int
    source: str
    opset: int
    input_names: List[str]
    max_abs_diff: float
    size_bytes: int
    export_s: float

    @property
    def parity_ok(self) -> bool:
        return self.max_abs_diff < PARITY_TOLERANCE


def round_dirs(run_dir: Path) -> Dict[int, Path]:
    """Saved global models by round index (`global/round-NNNN`)."""
    found: Dict[int, Path] = {}
    for path in (run_dir / "global").glob("round-*"):
        suffix = path.name[len("round-") :]
        if suffix.isdigit() and path.is_dir():
            found[int(suffix)] = path
    return found


def pick_round(run_dir: Path, round_index: Optional[int]) -> Tuple[int, Path]:
    """The requested round's folder, or the latest one."""
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"RUN_DIR {str(run_dir)!r} is not a run directory (no config.yaml)")
    rounds = round_dirs(run_dir)
    if not rounds:
        raise UserError(f"{run_dir}: no global/round-NNNN folder yet (no round completed)")
    if round_index is None:
        round_index = max(rounds)
    if round_index not in rounds:
        raise UserError(
            f"--round {round_index}: not saved; available: {', '.join(map(str, sorted(rounds)))}"
        )
    return round_index, rounds[round_index]


def model_ref_of_run(run_dir: Path, num_labels: int) -> ModelRef:
    """The base model the run fine-tuned, from its config.yaml `model:` section."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    model = raw.get("model") or {}
    return ModelRef(
        name_or_path=model.get("name_or_path", "minilm"),
        revision=model.get("revision"),
        num_labels=model.get("num_labels") or num_labels,
        max_length=model.get("max_length", 64),
        num_hidden_layers=model.get("num_hidden_layers"),
    )


def adapter_num_labels(adapter_dir: Path) -> int:
    """Output classes of the saved task head (the adapter file carries it as modules_to_save)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as handle:  # type: ignore[no-untyped-call]
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            if key.endswith(HEAD_SUFFIXES):
                return int(handle.get_slice(key).get_shape()[0])
    raise UserError(f"{adapter_dir}: the adapter has no task head (classifier) to export")


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.onnx's exporter prints progress lines and warnings; library code stays quiet."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_round_model(run_dir: Path, model_dir: Path) -> Tuple[Any, Any, ModelRef, str]:
    """(model as saved, tokenizer, base ModelRef, source kind) for one round's folder."""
    from jetfed.edge.models import load_classifier, load_tokenizer, quiet_transformers

    if (model_dir / ADAPTER_CONFIG).exists():
        from jetfed.coordinator.strategies.exact import load_exported_adapter

        ref = model_ref_of_run(run_dir, adapter_num_labels(model_dir))
        model = load_exported_adapter(load_classifier(ref), model_dir)
        return model.eval(), load_tokenizer(ref), ref, "peft-adapter"
    if (model_dir / "config.json").exists():
        import torch
        from transformers import AutoModelForSequenceClassification

        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), dtype=torch.float32
            )
        ref = model_ref_of_run(run_dir, int(model.config.num_labels))
        return model.eval(), load_tokenizer(ref), ref, "full-model"
    raise UserError(f"{model_dir}: neither a PEFT adapter nor a saved transformers model")


def logits_module(model: Any, input_names: List[str]) -> Any:
    """A module whose positional inputs are the tokenizer's tensors and whose only output is
    the logits (ONNX graphs take and return flat tensors)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(input_names, inputs))).logits

    return LogitsOnly().eval()


def _encode(tokenizer: Any, texts: List[str], max_length: int) -> Dict[str, Any]:
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, padding=True, return_tensors="np"
    )
    return {name: encoded[name] for name in tokenizer.model_input_names if name in encoded}


def _torch_logits(model: Any, inputs: Dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        tensors = {name: torch.from_numpy(value) for name, value in inputs.items()}
        return model(**tensors).logits.numpy()


def export_onnx(
    run_dir: Path,
    round_index: Optional[int] = None,
    out_path: Optional[Path] = None,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Merge, export with dynamic batch and sequence axes, and check parity on ONNX Runtime."""
    import numpy as np
    import torch
    from torch.export import Dim

    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as exc:
        raise UserError(
            f"export-onnx needs {exc.name}: pip install 'jetfed[onnx]' "
            "(onnx, onnxscript, onnxruntime)"
        ) from None
    if opset < DEFAULT_OPSET:
        raise UserError(f"--opset must be >= {DEFAULT_OPSET}, got {opset}")
    round_index, model_dir = pick_round(run_dir, round_index)
    out_path = out_path or run_dir / "onnx" / f"round-{round_index:04d}.onnx"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer, ref, source = load_round_model(run_dir, model_dir)
    batches = [
        _encode(tokenizer, list(PARITY_TEXTS), ref.max_length),
        _encode(tokenizer, [PARITY_TEXTS[0]], ref.max_length),
    ]
    expected = [_torch_logits(model, batch) for batch in batches]
    if source == "peft-adapter":
        model = model.merge_and_unload().eval()
    input_names = list(batches[0])
    batch, sequence = Dim("batch"), Dim("sequence")
    example = tuple(torch.from_numpy(batches[0][name]) for name in input_names)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    started_s = time.monotonic()
    with _quiet_export():
        torch.onnx.export(
            logits_module(model, input_names),
            example,
            str(out_path),
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=["logits"],
            dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in input_names),),  # *inputs
            external_data=weight_bytes > EXTERNAL_DATA_ABOVE_BYTES,
            verbose=False,
        )
    export_s = time.monotonic() - started_s
    session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    max_abs_diff = max(
        float(np.abs(session.run(["logits"], inputs)[0] - want).max())
        for inputs, want in zip(batches, expected)
    )
    (out_path.with_suffix(".json")).write_text(
        json.dumps(
            {
                "run_dir": str(run_dir),
                "round_index": round_index,
                "source": source,
                "base_model": ref.name_or_path,
                "max_length": ref.max_length,
                "num_labels": ref.num_labels,
                "input_names": input_names,
                "opset": opset,
                "max_abs_diff": max_abs_diff,
            },
            indent=2,
        )
    )
    return ExportResult(
        onnx_path=out_path,
        round_index=round_index,
        source=source,
        opset=opset,
        input_names=input_names,
        max_abs_diff=max_abs_diff,
        size_bytes=out_path.stat().st_size,
        export_s=export_s,
    )
