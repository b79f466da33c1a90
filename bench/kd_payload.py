"""kd on a causal LM: bytes a device uploads per round, and what the consensus costs to send.

Goal: for 256 proxy rows × 128 response tokens at k = 16, the upload is ≤ 2.5 MB. The payload is
the real one: SmolLM2's top-k log-probs at T = 2 (`jetfed.edge.distillation.proxy_top_k` on real
GSM8K rows, the model truncated for speed: the size depends on the token count and k only),
tiled to 256 × 128 tokens and written exactly as the agent writes it
(`jetfed.edge.tensorfile.write_tensor_file`, floats fp16, indices uint16). Quick mode computes
the top-k of 8 real rows (≈ 800 response tokens) and tiles them; the full run of 256 rows.

Also measured: the coordinator's validation of that payload (`read_top_k`: index range, log-probs,
tail, duplicates, mass), and the next round's download, the `kd_proxy` blob with the sparse
consensus of 2 devices (a 2-layer and a 3-layer SmolLM2 standing in for two devices' models),
whose union support is 16 to 32 words a token.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

from bench.runner import DEFAULT_DATASETS, table

GOAL_BYTES = 2.5e6
PROXY_ROWS, RESPONSE_TOKENS, K, TEMPERATURE = 256, 128, 16, 2.0


def real_top_k(layers: int, rows: int, datasets: Path) -> Any:
    """SmolLM2 (first `layers` layers) top-k at every response token of `rows` GSM8K rows."""
    from jetfed.edge.distillation import proxy_top_k
    from jetfed.edge.instructions import load_instructions
    from jetfed.edge.models import load_model, load_tokenizer
    from jetfed.edge.wire import ModelRef

    ref = ModelRef(name_or_path="smollm2", num_labels=1, max_length=256, num_hidden_layers=layers)
    source = datasets / "gsm8k"
    if not source.exists():
        source = Path(__file__).resolve().parent.parent / "coordinator" / "demo_data" / "gsm8k"
    data = load_instructions(str(source), "train").subset(range(rows))
    return proxy_top_k(load_model(ref), load_tokenizer(ref), data, 256, "cpu", K, TEMPERATURE)


def tiled(dist: Any, tokens: int) -> Any:
    """`dist`'s tokens repeated to `tokens` tokens (sizes depend on the count, not the values)."""
    import torch

    return dist.select(torch.arange(tokens) % dist.num_tokens)


def file_bytes(tensors: Dict[str, Any], dtype: str = "fp16") -> int:
    from jetfed.edge.tensorfile import write_tensor_file

    with tempfile.TemporaryDirectory() as tmp:
        return write_tensor_file(os.path.join(tmp, "payload.safetensors"), tensors, dtype)


def run(quick: bool, datasets: Path = DEFAULT_DATASETS, threads: int = 1) -> Dict[str, Any]:
    import torch

    from jetfed.edge.methods.kd import ProxyRound
    from jetfed.edge.tensorfile import INDEX_DTYPES, UPDATE_DTYPES, TensorFile, write_tensor_file
    from jetfed.edge.topk import read_top_k, sparse_mixture

    torch.set_num_threads(threads)
    tokens = PROXY_ROWS * RESPONSE_TOKENS
    rows = 8 if quick else 256
    started = time.perf_counter()
    devices = [real_top_k(layers, rows, datasets) for layers in (2, 3)]
    compute_s = time.perf_counter() - started
    measured = min(device.num_tokens for device in devices)
    uploads = [tiled(device, tokens) for device in devices]
    tensors = uploads[0].top_k_tensors()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "update.safetensors")
        upload_bytes = write_tensor_file(path, tensors, "fp16")
        spec = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        started = time.perf_counter()
        received = TensorFile(path, spec, (*UPDATE_DTYPES, *INDEX_DTYPES))
        read_top_k(received, uploads[0].vocab, received.is_index("indices"))
        check_s = time.perf_counter() - started
    consensus = sparse_mixture(uploads, [1.0, 1.0])
    widths = (consensus.offsets[1:] - consensus.offsets[:-1]).float()
    proxy_blob = ProxyRound(list(range(PROXY_ROWS)), b"\0" * 32, consensus).encode()
    dense_bytes = tokens * uploads[0].vocab * 2
    return {
        "goal_bytes": GOAL_BYTES,
        "proxy_rows": PROXY_ROWS,
        "response_tokens_per_row": RESPONSE_TOKENS,
        "k": K,
        "vocab": uploads[0].vocab,
        "real_tokens_computed": measured,
        "top_k_compute_s": compute_s,
        "upload_bytes": upload_bytes,
        "upload_bytes_per_token": upload_bytes / tokens,
        "dense_fp16_bytes": dense_bytes,
        "check_s": check_s,
        "consensus_union_width_mean": float(widths.mean()),
        "consensus_union_width_max": int(widths.max()),
        "download_proxy_blob_bytes": len(proxy_blob),
        "goal_met": upload_bytes <= GOAL_BYTES,
        "torch_threads": threads,
    }


def markdown(results: Dict[str, Any]) -> str:
    tokens = results["proxy_rows"] * results["response_tokens_per_row"]
    rows = [
        [label, f"{value:,}", value / tokens]
        for label, value in (
            ("upload per device per round (top-k + tail)", results["upload_bytes"]),
            ("the whole vocabulary in fp16, for comparison", results["dense_fp16_bytes"]),
            ("download: kd_proxy blob, 2-device consensus", results["download_proxy_blob_bytes"]),
        )
    ]
    return "\n".join(
        [
            f"{results['proxy_rows']} proxy rows × {results['response_tokens_per_row']} response "
            f"tokens, k = {results['k']}, vocabulary {results['vocab']:,} (SmolLM2); real top-k "
            f"of {results['real_tokens_computed']:,} GSM8K response tokens, tiled.",
            "",
            table(["what", "bytes", "bytes per token"], rows),
            "",
            f"Goal ≤ {results['goal_bytes'] / 1e6:g} MB: "
            + ("met" if results["goal_met"] else "NOT met")
            + f". Coordinator check of one upload: {results['check_s'] * 1e3:.0f} ms. Consensus "
            f"union support: mean {results['consensus_union_width_mean']:.1f}, max "
            f"{results['consensus_union_width_max']} words a token.",
        ]
    )
