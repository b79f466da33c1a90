"""Causal-LM training on SmolLM2-135M-Instruct: step time, peak memory, bytes per round.

- Step time: `jetfed.edge.train.train_local` (response-only lm_head) vs a bare PEFT loop that calls
  `model(**batch).loss` (Hugging Face's full [batch, tokens, vocab] logits) on the SAME batches
  (SST-2 as generation, batch 8, ≤ 128 tokens, LoRA q_proj,v_proj r8, AdamW lr 1e-3, clipping 1.0),
  interleaved repetitions, medians compared (goal: within 5 %).
- Peak RSS of a training process at batch 8 × 256 tokens (every row exactly 256 tokens: a GSM8K
  answer after enough GSM8K questions, the prompt cut from the left), one process per
  configuration so each peak is its own: LoRA q,v (goal ≤ 3 GB), LoRA all-linear, full
  fine-tuning, each with and without `model.gradient_checkpointing`, and LoRA q,v through the
  naive full-logits loss for comparison.
- Bytes per device per round: each method's federated state as safetensors (what travels down,
  and up as the delta), fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from bench.runner import DEFAULT_DATASETS, table
from bench.stats import summary

GOAL_PCT = 5.0
RSS_GOAL_BYTES = 3 * 10**9
BATCH_SIZE = 8
STEP_MAX_LENGTH = 128
RSS_MAX_LENGTH = 256
LEARNING_RATE = 1e-3
SHORT_ANSWER_CHARS = 400
"""GSM8K answers under this many characters (≈ 120 tokens) leave room for a prompt in 256."""
MAX_GRAD_NORM = 1.0
RSS_CONFIGS = {
    "lora q,v": ("lora", {}, False, False),
    "lora q,v, gradient checkpointing": ("lora", {}, False, True),
    "lora all-linear": ("lora", {"target_modules": "all-linear"}, False, False),
    "lora all-linear, gradient checkpointing": (
        "lora",
        {"target_modules": "all-linear"},
        False,
        True,
    ),
    "full": ("full", {}, False, False),
    "full, gradient checkpointing": ("full", {}, False, True),
    "lora q,v, naive full-logits loss": ("lora", {}, True, False),
}
"""label → (method, method settings, naive HF loss, model.gradient_checkpointing)."""
BYTES_CONFIGS = {
    "lora q,v": ("lora", {}),
    "lora all-linear": ("lora", {"target_modules": "all-linear"}),
    "federa q,v": ("federa", {}),
    "full": ("full", {}),
}


def _ref(max_length: int, checkpointing: bool = False) -> Any:
    from jetfed.edge.wire import ModelRef

    return ModelRef(
        name_or_path="smollm2",
        num_labels=1,
        max_length=max_length,
        gradient_checkpointing=checkpointing,
    )


def long_rows(datasets: Path, count: int) -> Any:
    """`count` rows of exactly RSS_MAX_LENGTH tokens once rendered: answer i after questions."""
    from jetfed.edge.instructions import load_instructions, rows_to_instructions

    gsm8k = load_instructions(str(datasets / "gsm8k"), "train")
    short = [i for i, answer in enumerate(gsm8k.responses) if len(answer) < SHORT_ANSWER_CHARS]
    rows = []
    for i in short[:count]:
        questions = "\n\n".join(gsm8k.prompts[i : i + 8])
        rows.append({"prompt": questions, "response": gsm8k.responses[i]})
    return rows_to_instructions(rows, "gsm8k-long")


def bare_peft_loop(model: Any, batches: List[Dict[str, Any]], seed: int) -> None:
    """What someone would write by hand around a PEFT causal LM: HF's own loss."""
    import torch

    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    for batch in batches:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
    model.eval()


def step_times(datasets: Path, steps: int, repeats: int) -> Dict[str, Any]:
    from jetfed.edge.instructions import load_instructions
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.models import load_tokenizer
    from jetfed.edge.train import batch_indices, make_batch, train_local
    from jetfed.edge.wire import TrainingConfig

    ref = _ref(STEP_MAX_LENGTH)
    data = load_instructions(str(datasets / "sst2"), "train").subset(range(512))
    model = get_method("lora")({}, ref).build(None, seed=0)
    tokenizer = load_tokenizer(ref)
    training = TrainingConfig(
        local_steps=steps,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        max_grad_norm=MAX_GRAD_NORM,
    )

    def edge_loop(seed: int) -> None:
        train_local(model, tokenizer, data, training, STEP_MAX_LENGTH, "cpu", seed)

    def bare_loop(seed: int) -> None:
        batches = [
            make_batch(tokenizer, data, indices, STEP_MAX_LENGTH, "cpu")
            for indices in batch_indices(len(data), BATCH_SIZE, steps, seed)
        ]
        bare_peft_loop(model, batches, seed)

    loops: Dict[str, Callable[[int], None]] = {"bare": bare_loop, "train_local": edge_loop}
    per_step: Dict[str, List[float]] = {name: [] for name in loops}
    names = list(loops)
    for rep in range(repeats):
        for name in names[rep % 2 :] + names[: rep % 2]:
            started = time.perf_counter()
            loops[name](rep + 1)
            per_step[name].append((time.perf_counter() - started) / steps)
    stats = {name: summary(values) for name, values in per_step.items()}
    overhead = 100.0 * (stats["train_local"]["median"] / stats["bare"]["median"] - 1.0)
    return {"step_s": stats, "overhead_pct": overhead, "meets_goal": overhead <= GOAL_PCT}


def peak_child(method_name: str, settings: Dict[str, Any], naive: bool, checkpointing: bool,
               steps: int, datasets: Path) -> Dict[str, Any]:  # fmt: skip
    """One configuration's training, run as its own process by `peak_rss`."""
    import torch

    from jetfed.edge.methods.base import get_method
    from jetfed.edge.models import load_tokenizer
    from jetfed.edge.telemetry.memory import peak_rss_bytes
    from jetfed.edge.train import make_batch, train_local
    from jetfed.edge.wire import TrainingConfig

    torch.set_num_threads(1)
    ref = _ref(RSS_MAX_LENGTH, checkpointing)
    data = long_rows(datasets, BATCH_SIZE * steps)
    method = get_method(method_name)(settings, ref)
    model = method.build(method.initial_state(0).init, seed=0)
    tokenizer = load_tokenizer(ref)
    rows = [list(range(i * BATCH_SIZE, (i + 1) * BATCH_SIZE)) for i in range(steps)]
    batches = [make_batch(tokenizer, data, indices, RSS_MAX_LENGTH, "cpu") for indices in rows]
    if naive:
        bare_peft_loop(model, batches, 0)
    else:
        lr = 2e-5 if method_name == "full" else LEARNING_RATE
        training = TrainingConfig(local_steps=steps, batch_size=BATCH_SIZE, learning_rate=lr)
        train_local(model, tokenizer, data, training, RSS_MAX_LENGTH, "cpu", 0)
    return {
        "peak_rss_bytes": peak_rss_bytes(),
        "tokens_per_row": sorted({int(b["attention_mask"].sum(1).max()) for b in batches}),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from bench.causal_lm import peak_child
args = json.loads(sys.argv[1])
print(json.dumps(peak_child(*args[:5], Path(args[5]))))
"""


def peak_rss(datasets: Path, steps: int) -> Dict[str, Any]:
    """Each configuration in its own process (a peak is per process)."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    results = {}
    for label, (method, settings, naive, checkpointing) in RSS_CONFIGS.items():
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT,
             json.dumps([method, settings, naive, checkpointing, steps, str(datasets)])],
            capture_output=True, text=True, env=env, cwd=repo, check=True,
        )  # fmt: skip
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        results[label]["wall_s"] = time.perf_counter() - started
    return results


def bytes_per_round() -> Dict[str, Any]:
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.tensor_codec import encode_tensors

    results = {}
    for label, (method_name, settings) in BYTES_CONFIGS.items():
        method = get_method(method_name)(settings, _ref(STEP_MAX_LENGTH))
        state = method.initial_state(seed=0)
        payload = len(encode_tensors(state.global_state))
        init = len(encode_tensors(state.init)) if state.init is not None else 0
        results[label] = {
            "state_bytes": payload,
            "per_device_per_round_bytes": 2 * payload,
            "once_per_run_bytes": init,
        }
    return results


def run(quick: bool, datasets: Path = DEFAULT_DATASETS, threads: int = 1) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    steps, repeats = (2, 3) if quick else (4, 5)
    return {
        "goal_pct": GOAL_PCT,
        "rss_goal_bytes": RSS_GOAL_BYTES,
        "torch_threads": threads,
        "steps_per_repetition": steps,
        "repetitions": repeats,
        "step": step_times(datasets, steps, repeats),
        "peak_rss": peak_rss(datasets, 1 if quick else 2),
        "bytes": bytes_per_round(),
    }


def markdown(results: Dict[str, Any]) -> str:
    step = results["step"]
    step_rows = [
        [name, item["median"], item["min"], item["max"]] for name, item in step["step_s"].items()
    ]
    rss_rows = [
        [label, item["peak_rss_bytes"] / 1e9, item["trainable_params"], str(item["tokens_per_row"])]
        for label, item in results["peak_rss"].items()
    ]
    byte_rows = [
        [label, item["state_bytes"] / 1e6, item["per_device_per_round_bytes"] / 1e6,
         item["once_per_run_bytes"] / 1e6]
        for label, item in results["bytes"].items()
    ]  # fmt: skip
    peaks = {label: item["peak_rss_bytes"] for label, item in results["peak_rss"].items()}
    verdicts = [
        f"{label} {peaks[label] / 1e9:.2f} GB "
        + ("met" if peaks[label] <= RSS_GOAL_BYTES else "NOT met")
        for label in ("lora q,v", "lora q,v, gradient checkpointing")
        if label in peaks
    ]
    return "\n".join(
        [
            f"SmolLM2-135M-Instruct, {results['torch_threads']} torch thread(s).",
            "",
            f"Step time, SST-2 as generation, batch {BATCH_SIZE} ≤ {STEP_MAX_LENGTH} tokens, "
            "LoRA q,v r8, "
            f"{results['steps_per_repetition']} steps × {results['repetitions']} interleaved "
            "repetitions (s/step):",
            "",
            table(["loop", "median", "min", "max"], step_rows),
            "",
            f"train_local vs bare: {step['overhead_pct']:+.1f} % (goal ≤ {GOAL_PCT:.0f} %: "
            f"{'met' if step['meets_goal'] else 'NOT met'}).",
            "",
            f"Peak RSS of a training process, batch {BATCH_SIZE} × {RSS_MAX_LENGTH} tokens:",
            "",
            table(["configuration", "peak RSS GB", "trainable", "tokens/row"], rss_rows),
            "",
            f"LoRA q,v goal ≤ {RSS_GOAL_BYTES / 1e9:.0f} GB: {'; '.join(verdicts)}.",
            "",
            "Bytes per device per round (fp32 state down + delta up; FeDeRA's factors once):",
            "",
            table(["method", "state MB", "per device per round MB", "once per run MB"], byte_rows),
        ]
    )
