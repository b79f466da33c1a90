"""How concentrated the LoRA target weights' spectra are: the share of ‖W‖²_F in the top-r
singular directions, per layer, for MiniLM and SmolLM2-135M's query and value projections.

FeDeRA initialises the adapter from the top-r SVD of W (PiSSA); where the top-r directions hold
a small share of the energy (a flat spectrum), that init differs least from any other, so the
method should matter least. The study reports this before comparing FeDeRA with LoRA.
"""

from __future__ import annotations

from typing import Any, Dict, List

from bench.runner import table

RANKS = (8, 16)
MODELS = {"minilm": ("query", "value"), "smollm2": ("q_proj", "v_proj")}


def top_share(weight: Any, rank: int) -> float:
    import torch

    energy = torch.linalg.svdvals(weight.detach().double()).pow(2)
    return float(energy[:rank].sum() / energy.sum())


def spectra(name: str, targets: tuple) -> Dict[str, Any]:
    from jetfed.edge.models import load_model
    from jetfed.edge.wire import ModelRef

    model = load_model(ModelRef(name_or_path=name, num_labels=2, kind="classifier"))
    rows: Dict[str, List[Dict[str, float]]] = {target: [] for target in targets}
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf in rows and hasattr(module, "weight"):
            shape = tuple(module.weight.shape)
            shares = {f"top{r}": top_share(module.weight, r) for r in RANKS}
            rows[leaf].append({"shape": shape, **shares})
    return {"layers": len(next(iter(rows.values()))), "by_target": rows}


def run(quick: bool) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    return {name: spectra(name, targets) for name, targets in MODELS.items()}


def markdown(results: Dict[str, Any]) -> str:
    rows = []
    for name, result in results.items():
        for target, layers in result["by_target"].items():
            for rank in RANKS:
                shares = [layer[f"top{rank}"] for layer in layers]
                rows.append(
                    [
                        name,
                        target,
                        "×".join(map(str, layers[0]["shape"])),
                        rank,
                        min(shares),
                        sum(shares) / len(shares),
                        max(shares),
                    ]
                )
    header = ["model", "weight", "shape", "r", "top-r share min", "mean", "max"]
    return "Share of ‖W‖²_F in the top-r singular directions, over layers.\n\n" + table(
        header, rows
    )
