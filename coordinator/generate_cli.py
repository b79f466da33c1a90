"""`jetfed generate RUN_DIR --prompt ...`: answer a prompt with a run's tuned causal LM.

The round's folder is loaded as users would load it: a LoRA/FeDeRA adapter with
`PeftModel.from_pretrained` on the run's base model, a `full` round as a plain transformers
model. The prompt is rendered with the same chat template the run trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple

import typer

from jetfed.edge.instructions import DEFAULT_SYSTEM


def load_tuned(run_dir: Path, round_index: Optional[int] = None) -> Tuple[Any, Any, int]:
    """(model, tokenizer, round index) of a run's saved global causal LM."""
    from jetfed.coordinator.config import causal_lm_config, model_ref_of
    from jetfed.coordinator.onnx_export import ADAPTER_CONFIG, pick_round
    from jetfed.coordinator.rundir import RunDir
    from jetfed.edge.errors import UserError
    from jetfed.edge.models import load_causal_lm, load_tokenizer, quiet_transformers

    round_index, folder = pick_round(run_dir, round_index)
    config = RunDir(run_dir).load_config()
    if not causal_lm_config(config):
        raise UserError(f"{run_dir}: {config.model.name_or_path} is not a causal LM")
    ref = model_ref_of(config, num_labels=1).model_copy(update={"gradient_checkpointing": False})
    model: Any
    with quiet_transformers():
        if (folder / ADAPTER_CONFIG).exists():
            from jetfed.coordinator.strategies.exact import load_exported_adapter

            model = load_exported_adapter(load_causal_lm(ref), folder)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    return model, load_tokenizer(ref), round_index


def answer(model: Any, tokenizer: Any, prompt: str, system: str, max_new_tokens: int) -> str:
    """The greedy answer to one prompt."""
    from jetfed.edge.causal_lm import generate
    from jetfed.edge.instructions import prompt_text

    text = prompt_text(tokenizer, system, prompt)
    batch = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    return generate(model, tokenizer, dict(batch), max_new_tokens)[0]


def generate_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="runs/<experiment>"),
    prompt: str = typer.Option(..., "--prompt", help="The user's message."),
    system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="The system message."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, max=4096),
    round_index: Optional[int] = typer.Option(
        None, "--round", min=0, help="N of global/round-NNNN; default: the last saved."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
) -> None:
    """Answer PROMPT with the run's tuned model (greedy decoding)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer, _ = load_tuned(run_dir, round_index)
    typer.echo(answer(model, tokenizer, prompt, system, max_new_tokens))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
