"""The CUDA path checked on a real GPU (issue #23); `scripts/gpu_check.sh` sets up and calls this.

Checks, each with tiny sizes so all of them fit in ≤ 8 minutes of a lent GPU:

- one round of every method (`METHODS`) on MiniLM and on SmolLM2, each a real local fleet
  (`jetfed.coordinator.fleet.run_local_fleet`: the embedded amqtt broker, the coordinator here,
  device processes running `jetfed edge run`), read back from the run's metrics and profiles:
  the device's s/step, peak GPU memory (`torch.cuda.max_memory_allocated`) and mean W of its
  train phase;
- the causal LoRA step time (bench/causal_lm.py's loop, `train_local`) in bf16 autocast and fp32;
- `--deterministic`'s kernels: two seeded LoRA trainings give the same bits;
- NVML telemetry through the real backend (power and GPU memory over a busy window);
- ONNX Runtime's CUDA execution provider for `jetfed edge bench-inference` (a MiniLM round
  exported with `export_onnx`); an onnxruntime build without it is reported, not failed.

The weights are too big to carry to the GPU machine (88-94 MB packages), so the models are built
from their carried config with random (seeded) weights, embeddings at unit scale
(`random_weight_model`): timings and memory are the architecture's, accuracy is meaningless.
`--allow-cpu` runs the same checks on the CPU (a rehearsal); rows that need a GPU are `n/a`
there. Without it, no CUDA device is one line and
exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
GPU_DIR = REPO_ROOT / ".gpu"
MODELS = ("minilm", "smollm2")
METHODS = ("lora", "federa", "full", "split", "kd", "fedcollm")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "chat_template.jinja",
)
"""What `prepare_models` carries of a packaged model: everything but the weights."""
WHEELS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "paho-mqtt",
    "amqtt",
    "dacite",
    "pwdlib",
    "transitions",
    "websockets",
    "cryptography",
    "cffi",
    "pycparser",
)
"""Distributions jetfed (with the embedded amqtt broker) needs that the GPU image lacks or has
too old (pydantic 2.13 needs typing-extensions ≥ 4.14); pinned to the versions installed here."""
CLIENTS = 1
ROUNDS = 1
LOCAL_STEPS = 4
BATCH_SIZE = 4
MAX_LENGTH = 32
EVAL_SAMPLES = 16
STEP_TIME_STEPS = 10
STEP_TIME_WARMUP = 2
STEP_TIME_MAX_LENGTH = 64
NVML_WINDOW_S = 2.0
ROUND_DEADLINE_S = {True: 90.0, False: 600.0}
"""Per round, on CUDA (a round there takes seconds) and on a loaded CPU (a SmolLM2 round of a
rehearsal took a minute or more)."""
BUDGET_S = 420.0
"""On CUDA, checks not started by then fail as over budget: the run must fit ≤ 8 min of device
time."""
NO_CUDA = "no CUDA device"
PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "n/a"


@dataclass
class Row:
    """One line of the table."""

    check: str
    model: str
    dtype: str
    s_per_step: Optional[float] = None
    peak_gpu_memory_bytes: Optional[int] = None
    mean_power_w: Optional[float] = None
    status: str = FAIL
    note: str = ""


def wheel_requirements() -> List[str]:
    """`name==version` of each of WHEELS as installed here (what `--prepare` downloads)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]


def prepare_models(gpu_dir: Path) -> Dict[str, int]:
    """Copy the packaged models' config and tokenizer files (no weights) into gpu_dir/NAME;
    returns bytes written per model."""
    from jetfed.edge.models import resolve_model_path

    written = {}
    for name in MODELS:
        source = Path(resolve_model_path(name))
        target = gpu_dir / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for file in MODEL_FILES:
            if (source / file).exists():
                shutil.copy2(source / file, target / file)
        written[name] = sum(f.stat().st_size for f in target.iterdir())
    return written


def random_weight_model(spec_dir: Path, out_dir: Path) -> Path:
    """The architecture in spec_dir/config.json with seeded random weights, saved with its
    tokenizer files as a folder every jetfed loader takes."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from jetfed.edge.models import quiet_transformers

    if (out_dir / "config.json").exists():
        return out_dir
    if not (spec_dir / "config.json").exists():
        raise SystemExit(f"{spec_dir}/config.json is missing: run scripts/gpu_check.sh --prepare")
    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(spec_dir))
        causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
        torch.manual_seed(0)
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
        # Unit-RMS embeddings, as a trained model's residual stream has: at the init's std 0.02
        # RMSNorm's backward (∝ 1/rms) multiplies the gradient ~10× a layer through SmolLM2's
        # 30 layers, inf by the 6th, and every round was refused for NaN updates.
        model.get_input_embeddings().weight.data.normal_(0.0, 1.0)
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging))
    for file in spec_dir.iterdir():
        if file.name != "config.json":
            shutil.copy2(file, staging / file.name)
    staging.rename(out_dir)
    return out_dir


def tiny_defaults() -> Any:
    from jetfed.coordinator.demo import DemoDefaults

    return DemoDefaults(
        ROUNDS,
        LOCAL_STEPS,
        BATCH_SIZE,
        MAX_LENGTH,
        EVAL_SAMPLES,
        slm_layers=2,
        method_settings={
            "kd": {"proxy_size": 8, "server_steps": 2, "server_batch_size": BATCH_SIZE},
            "fedcollm": {"aux_size": 8, "server_steps": 2, "server_batch_size": BATCH_SIZE},
        },
    )


def compute_dtype(device: str) -> str:
    """What devices train in: `ModelRef.dtype` auto autocasts on CUDA (models.autocast_dtype)."""
    from jetfed.edge.models import autocast_dtype
    from jetfed.edge.wire import ModelRef

    return dtype_label(autocast_dtype(ModelRef(name_or_path="x", num_labels=1), device))


def dtype_label(autocast: Optional[Any]) -> str:
    """`bfloat16 autocast` for a torch dtype, `fp32` for None."""
    return "fp32" if autocast is None else f"{str(autocast).split('.')[-1]} autocast"


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_warning(log_dir: Path) -> str:
    """The last WARNING or ERROR line of the run's device logs (why a round failed)."""
    lines = [
        line
        for log in sorted(log_dir.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if " WARNING " in line or " ERROR " in line
    ]
    return lines[-1][:300] if lines else f"no warning in {log_dir}"


def fleet_row(method: str, model: str, model_dir: Path, work: Path, device: str) -> Row:
    """One round of `method` on a local fleet; the device's train phase gives the numbers."""
    from jetfed.coordinator.demo import DEMO_DATA, demo_config
    from jetfed.coordinator.fleet import run_local_fleet

    row = Row(check=method, model=model, dtype=compute_dtype(device))
    name = f"gpu-{method}-{model}"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # an earlier check's run
    config = demo_config(
        name,
        method,
        CLIENTS,
        ROUNDS,
        LOCAL_STEPS,
        str(DEMO_DATA),
        str(work / "runs"),
        "iid",
        1.0,
        EVAL_SAMPLES,
        None,
        model_name=str(model_dir),
        defaults=tiny_defaults(),
    )
    # a refused or lost update holds a round open until its deadline (900 s by default)
    rounds = {"deadline_s": ROUND_DEADLINE_S[device.startswith("cuda")]}
    rounds["wait_for_devices_s"] = rounds["deadline_s"]
    config = config.model_copy(update={"rounds": config.rounds.model_copy(update=rounds)})
    metrics = run_local_fleet(config, CLIENTS)
    aggregated = [m for m in metrics if m.status == "aggregated" and m.num_aggregated == CLIENTS]
    trains = [r for r in read_jsonl(config.run_dir / "profiles.jsonl") if r.get("phase") == "train"]
    if trains:
        train = trains[0]
        steps = train.get("extra", {}).get("steps") or LOCAL_STEPS
        row.s_per_step = train["duration_s"] / steps
        row.peak_gpu_memory_bytes = train.get("peak_gpu_memory_bytes")
        row.mean_power_w = train.get("mean_power_w")
    if not aggregated:
        row.note = f"no aggregated round: {last_warning(config.run_dir / 'logs')}"
    elif not trains:
        row.note = "no train phase in profiles.jsonl"
    elif device.startswith("cuda") and row.peak_gpu_memory_bytes is None:
        row.note = "the train record has no peak GPU memory"
    else:
        row.status = PASS
    return row


def step_time_row(model_dir: Path, dtype: str, device: str) -> Row:
    """The causal LoRA step (train_local, bench/causal_lm.py's settings at tiny sizes), timed
    after warm-up steps with the GPU synchronised."""
    import torch

    from bench.causal_lm import LEARNING_RATE, MAX_GRAD_NORM
    from jetfed.coordinator.demo import DEMO_DATA
    from jetfed.edge.instructions import load_instructions
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.models import autocast_dtype, load_tokenizer
    from jetfed.edge.train import train_local
    from jetfed.edge.wire import ModelRef, TrainingConfig

    ref = ModelRef(
        name_or_path=str(model_dir), num_labels=1, max_length=STEP_TIME_MAX_LENGTH, dtype=dtype
    )
    autocast = autocast_dtype(ref, device)
    row = Row(check="causal lora step", model="smollm2", dtype=dtype_label(autocast))
    if dtype != "fp32" and autocast is None:
        row.dtype, row.status, row.note = f"{dtype} autocast", NOT_APPLICABLE, "CUDA only"
        return row
    data = load_instructions(str(DEMO_DATA), "train").subset(range(256))
    model = get_method("lora")({}, ref).build(None, seed=0)
    tokenizer = load_tokenizer(ref)

    def run(steps: int) -> float:
        training = TrainingConfig(
            local_steps=steps,
            batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            max_grad_norm=MAX_GRAD_NORM,
        )
        synchronize(device)
        started = time.perf_counter()
        train_local(model, tokenizer, data, training, ref.max_length, device, 0, autocast=autocast)
        synchronize(device)
        return time.perf_counter() - started

    run(STEP_TIME_WARMUP)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with power_window(device) as window:
        row.s_per_step = run(STEP_TIME_STEPS) / STEP_TIME_STEPS
    row.mean_power_w = window.get("mean_power_w")
    if device.startswith("cuda"):
        row.peak_gpu_memory_bytes = int(torch.cuda.max_memory_allocated())
    masters = {str(p.dtype) for p in model.parameters() if p.requires_grad}
    row.status = PASS if masters == {"torch.float32"} else FAIL
    row.note = f"trainable weights {', '.join(sorted(masters))}"
    return row


def deterministic_trainings(model_dir: Path, device: str) -> Dict[str, Any]:
    """Two LoRA trainings of one seed with deterministic kernels: their weights' largest
    difference (0.0: the same bits). Run in a fresh process (`determinism_row`): cuBLAS reads
    its workspace setting when it starts."""
    import torch

    from jetfed.coordinator.demo import DEMO_DATA
    from jetfed.edge.determinism import use_deterministic_kernels
    from jetfed.edge.instructions import load_instructions
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.models import autocast_dtype, load_tokenizer
    from jetfed.edge.train import train_local
    from jetfed.edge.wire import ModelRef, TrainingConfig

    use_deterministic_kernels()
    if device == "cpu":
        torch.set_num_threads(1)
    ref = ModelRef(name_or_path=str(model_dir), num_labels=1, max_length=STEP_TIME_MAX_LENGTH)
    data = load_instructions(str(DEMO_DATA), "train").subset(range(64))
    tokenizer = load_tokenizer(ref)
    training = TrainingConfig(local_steps=LOCAL_STEPS, batch_size=BATCH_SIZE)
    method = get_method("lora")({}, ref)
    initial = method.initial_state(0)
    states = []
    for _ in range(2):  # as a device starts a round: the model, then the global state
        model = method.build(initial.init, seed=0)
        method.set_state(model, initial.global_state)
        autocast = autocast_dtype(ref, device)
        train_local(model, tokenizer, data, training, ref.max_length, device, 0, autocast=autocast)
        states.append({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
    first, second = states
    diff = max(float((first[n] - second[n]).abs().max()) for n in first)
    return {"max_abs_diff": diff, "dtype": compute_dtype(device)}


def determinism_row(model_dir: Path, device: str) -> Row:
    """`--deterministic`'s promise on this device: two trainings, one seed, the same bits."""
    command = [sys.executable, "-m", "bench.gpu_check", "determinism", "--model-dir"]
    command += [str(model_dir), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    row = Row(check="deterministic kernels", model="smollm2", dtype=compute_dtype(device))
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        row.note = lines[-1] if lines else f"exit status {done.returncode}"
        return row
    diff = json.loads(done.stdout.strip().splitlines()[-1])["max_abs_diff"]
    row.status = PASS if diff == 0.0 else FAIL
    row.note = f"two trainings of one seed differ by at most {diff:g}"
    return row


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class power_window:
    """`with power_window(device) as summary:` — NVML's mean W over the block on CUDA (filled
    into the dict on exit); nothing on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.summary: Dict[str, Any] = {}
        self._sampler: Any = None
        self._window: Any = None

    def __enter__(self) -> Dict[str, Any]:
        if self.device.startswith("cuda"):
            from jetfed.edge.telemetry.sampler import Sampler

            self._sampler = Sampler.auto("nvml")
            self._window = self._sampler.open_window()
        return self.summary

    def __exit__(self, *exc_info: Any) -> None:
        if self._sampler is not None:
            summary = self._sampler.close_window(self._window)
            self._sampler.stop()
            self.summary.update(asdict(summary))


def nvml_row(device: str) -> Row:
    """The real NVML backend over a window of matrix products: power and GPU memory."""
    import torch

    from jetfed.edge.errors import UserError

    row = Row(check="nvml telemetry", model="-", dtype="bf16")
    if not device.startswith("cuda"):
        row.status, row.note = NOT_APPLICABLE, "no NVIDIA GPU (CPU rehearsal)"
        return row
    try:
        with power_window(device) as summary:
            a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
            deadline = time.monotonic() + NVML_WINDOW_S
            while time.monotonic() < deadline:
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
    except UserError as exc:
        row.note = str(exc)
        return row
    row.mean_power_w = summary.get("mean_power_w")
    row.peak_gpu_memory_bytes = summary.get("peak_gpu_memory_bytes")
    row.note = f"{summary.get('sample_count', 0)} samples"
    if row.mean_power_w is not None and row.peak_gpu_memory_bytes:
        row.status = PASS
    return row


def ort_row(run_dir: Path, work: Path, device: str) -> Row:
    """Export the MiniLM LoRA round and run `jetfed edge bench-inference` on the CUDA EP."""
    import onnxruntime

    from jetfed.coordinator.onnx_export import export_onnx

    row = Row(check="ort bench-inference", model="minilm", dtype="fp32")
    if not (run_dir / "global").is_dir():
        row.status, row.note = NOT_APPLICABLE, "exports the lora MiniLM round, which did not run"
        return row
    available = onnxruntime.get_available_providers()
    has_cuda_ep = "CUDAExecutionProvider" in available
    exported = export_onnx(run_dir, out_path=work / "minilm.onnx")
    result_path = work / "bench-inference.json"
    providers = "cuda" if has_cuda_ep and device.startswith("cuda") else "cpu"
    command = [sys.executable, "-m", "jetfed", "edge", "bench-inference", str(exported.onnx_path)]
    command += ["--providers", providers, "--iterations", "50", "--min-seconds", "1"]
    command += ["--seq-len", str(MAX_LENGTH), "--json", str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        row.note = lines[-1] if lines else f"exit status {done.returncode}"
        return row
    result = json.loads(result_path.read_text())
    row.s_per_step = result["latency_mean_ms"] / 1000.0
    row.mean_power_w = result.get("mean_power_w")
    row.note = f"ran on {result['provider_used']}"
    if not has_cuda_ep:
        row.status = NOT_APPLICABLE
        row.note += f"; this onnxruntime has no CUDAExecutionProvider ({', '.join(available)})"
    elif device.startswith("cuda") and result["provider_used"] != "CUDAExecutionProvider":
        row.note += ": the CUDA EP did not load"
    else:
        row.status = PASS
    return row


def machine(device: str) -> Dict[str, Any]:
    """What ran the check: named in docs/RESULTS.md beside the table."""
    import platform

    import torch

    facts: Dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
        facts["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    for name in ("transformers", "peft", "onnxruntime"):
        try:
            facts[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            facts[name] = None
    return facts


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: List[Row]) -> str:
    """The one table: method, model, dtype, s/step, peak GPU memory, mean W, pass/fail."""
    lines = [
        "| check | model | dtype | s/step | peak GPU memory | mean W | result | note |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        cells = [r.check, r.model, r.dtype, _num(r.s_per_step, 4), _mib(r.peak_gpu_memory_bytes)]
        cells += [_num(r.mean_power_w, 1), r.status, r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_checks(gpu_dir: Path, work: Path, device: str, methods: List[str]) -> List[Row]:
    """Every check in order, each isolated: one that raises is a failed row, and the rest run
    while the budget lasts."""
    started = time.monotonic()
    os.environ.setdefault("JETFED_IDLE_BASELINE_S", "0")
    # devices pick their backend as deployed ones do (NVML where it reads power); the NVML row
    # opens it by name, so a GPU whose NVML has no power fails that row, not every round
    os.environ.setdefault("JETFED_TELEMETRY", "auto")
    models = {name: random_weight_model(gpu_dir / name, work / "models" / name) for name in MODELS}
    # the GPU's own checks first, the ONNX export right after the MiniLM rounds it exports: over
    # budget, the last SmolLM2 rounds are what is lost
    plan: List[Tuple[str, str, Callable[[], Row]]] = [
        ("nvml telemetry", "-", partial(nvml_row, device))
    ]
    for dtype in ("bf16", "fp32"):
        check = partial(step_time_row, models["smollm2"], dtype, device)
        plan.append(("causal lora step", "smollm2", check))
    check = partial(determinism_row, models["smollm2"], device)
    plan.append(("deterministic kernels", "smollm2", check))
    for model in MODELS:
        for method in methods:
            check = partial(fleet_row, method, model, models[model], work, device)
            plan.append((method, model, check))
        if model == "minilm":
            check = partial(ort_row, work / "runs" / "gpu-lora-minilm", work, device)
            plan.append(("ort bench-inference", "minilm", check))
    budget_s = BUDGET_S if device.startswith("cuda") else float("inf")  # a rehearsal takes long
    rows = []
    for label, model, check in plan:
        if time.monotonic() - started > budget_s:
            rows.append(Row(check=label, model=model, dtype="-", note="over the time budget"))
            continue
        try:
            row = check()
        except Exception as exc:  # one broken check must not lose the table
            row = Row(check=label, model=model, dtype="-")
            row.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        print(table([row]).splitlines()[-1], flush=True)
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("wheels", help="print name==version of each wheel the GPU image lacks")
    prepare = sub.add_parser("prepare-models", help="config + tokenizer files into GPU_DIR")
    prepare.add_argument("--gpu-dir", type=Path, default=GPU_DIR)
    determinism = sub.add_parser("determinism", help="(internal) two seeded trainings")
    determinism.add_argument("--model-dir", type=Path, required=True)
    determinism.add_argument("--device", default="cuda")
    run = sub.add_parser("run", help="every check; the table on stdout, JSON under --out")
    run.add_argument("--allow-cpu", action="store_true", help="rehearse on the CPU")
    run.add_argument("--gpu-dir", type=Path, default=GPU_DIR)
    run.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "gpu_check")
    run.add_argument("--work", type=Path, default=Path("/tmp/jetfed-gpu-check"))
    run.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        print("\n".join(wheel_requirements()))
        return 0
    if args.command == "prepare-models":
        for name, size in prepare_models(args.gpu_dir).items():
            print(f"{args.gpu_dir / name}: {size / 2**20:.1f} MiB (config and tokenizer)")
        return 0
    if args.command == "determinism":
        print(json.dumps(deterministic_trainings(args.model_dir, args.device)))
        return 0
    import torch

    if not torch.cuda.is_available():
        if not args.allow_cpu:
            print(f"{NO_CUDA}: torch {torch.__version__} sees no GPU (--allow-cpu: on the CPU)")
            return 2
        torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"gpu_check on {device}: models built from config with random weights (timings and "
        "memory are the architecture's, accuracy is meaningless)",
        flush=True,
    )
    args.work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    rows = run_checks(args.gpu_dir, args.work, device, methods)
    report = table(rows)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(device), "rows": [asdict(r) for r in rows]}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(report + "\n")
    failed = [r for r in rows if r.status == FAIL]
    print(f"{len(rows) - len(failed)}/{len(rows)} rows pass or n/a; JSON in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
