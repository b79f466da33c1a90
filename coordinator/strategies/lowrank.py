"""LoRA factor maths shared by the LoRA-aware strategies (fedavg's error, ffa, exact, flexlora).

A device k of rank rₖ and scaling sₖ = alpha/rₖ starts from the global factors (A, B) given
at its rank and uploads deltas ΔAₖ, ΔBₖ; its adapter adds sₖ·BₖAₖ to a frozen weight, with
Bₖ = B + ΔBₖ, Aₖ = A + ΔAₖ. With pₖ = nₖ / Σ n the exact mean update of a layer is

    P̄ = Σ pₖ sₖ BₖAₖ = [p₁s₁B₁ … p_K s_K B_K] · [A₁; …; A_K]     (one matmul, device-id order)

and a strategy's global factors (B̄, Ā) at rank R, scaling s, lose

    error = ‖P̄ − s·B̄Ā‖_F / ‖P̄‖_F

(FedAvg's mean(B)·mean(A) ≠ mean(B·A); 0 for ffa and exact by construction). Products are
formed in float32 (`COMPUTE`: fp32 BLAS takes half fp64's time, and its ~1e-7 relative rounding
is far below any error worth reporting) with the devices in id order, so results are
bit-identical whatever order updates arrived in. `split` turns a product back into factors
the way FeDeRA does (PiSSA's B = U√(S/s), A = √(S/s)Vᵀ), so that the first r columns/rows of
a global factor pair are the best rank-r part of its product and a device of rank r < R
starts from `at_rank`'s slice.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from jetfed.coordinator.strategies.base import AcceptedUpdate, Strategy
from jetfed.edge.methods.base import FederatedMethod, Tensors
from jetfed.edge.methods.lora import A_SUFFIX, B_SUFFIX, factor_names
from jetfed.edge.tensorfile import whole_tensors

COMPUTE = torch.float32
"""The dtype of factor sums, products and SVDs (module doc)."""
BASE_SUFFIX = ".base_layer.weight"
"""A PEFT LoRA layer's frozen weight, where `exact` folds its residual."""

Scaling = Callable[[int], float]
"""rank → s = alpha/rank (alpha fixed by the method's settings)."""
TensorSpec = Dict[str, Tuple[int, ...]]


def method_scaling(method: Optional[FederatedMethod]) -> Scaling:
    """s(rank) = the method's alpha/rank at any rank (its own formula, whatever alpha means);
    1 without a LoRA method (aggregation-only benches: every device at one scale)."""
    config = getattr(method, "config", None)
    if config is None or not hasattr(config, "scaling"):
        return lambda rank: 1.0
    return functools.lru_cache(maxsize=None)(
        lambda rank: float(config.model_copy(update={"rank": rank}).scaling)
    )


def adapted_layers(names: Mapping[str, object]) -> List[str]:
    """Prefixes of the LoRA layers among `names` (by their B factor: ffa uploads no A)."""
    return sorted(name[: -len(B_SUFFIX)] for name in names if name.endswith(B_SUFFIX))


def is_factor(name: str) -> bool:
    return name.endswith((A_SUFFIX, B_SUFFIX))


def rank_of(tensors: Mapping[str, torch.Tensor], prefix: str) -> int:
    """The rank of a layer's factors (B is out × r)."""
    return int(tensors[prefix + B_SUFFIX].shape[1])


def spec_at_rank(spec: TensorSpec, rank: int) -> TensorSpec:
    """An update spec with every LoRA factor at `rank` (A: r × in, B: out × r)."""
    moved: TensorSpec = {}
    for name, shape in spec.items():
        if name.endswith(A_SUFFIX):
            moved[name] = (rank, *shape[1:])
        elif name.endswith(B_SUFFIX):
            moved[name] = (shape[0], rank)
        else:
            moved[name] = shape
    return moved


def at_rank(state: Tensors, rank: int, scaling: Scaling) -> Tensors:
    """The global state (rank R) as a device of rank r ≤ R starts from: the first r rows of A
    and columns of B, each times √(s_R/s_r) so that s_r·B_rA_r = s_R·B[:, :r]A[:r]."""
    moved: Tensors = {}
    for name, value in state.items():
        if name.endswith(B_SUFFIX) and value.shape[1] < rank:
            raise ValueError(f"{name} has rank {value.shape[1]} < {rank}")
        if name.endswith(A_SUFFIX):
            full = int(value.shape[0])
            factor = math.sqrt(scaling(full) / scaling(rank))
            moved[name] = (value[:rank].double() * factor).float()
        elif name.endswith(B_SUFFIX):
            full = int(value.shape[1])
            factor = math.sqrt(scaling(full) / scaling(rank))
            moved[name] = (value[:, :rank].double() * factor).float()
        else:
            moved[name] = value
    return moved


def sample_weights(updates: List[AcceptedUpdate]) -> Tuple[List[AcceptedUpdate], List[float]]:
    """Updates in device-id order and their pₖ = nₖ / Σ n."""
    ordered = sorted(updates, key=lambda item: item.update.device_id)
    total = float(sum(item.update.num_samples for item in ordered))
    return ordered, [item.update.num_samples / total for item in ordered]


@dataclass
class LayerFactors:
    """One adapted layer's device factors side by side (`layer_factors`' order): `b` = [B₁ … B_K]
    (out × Σrₖ), `a` = [A₁; …; A_K] (Σrₖ × in), with the devices' ranks rₖ, sample weights pₖ
    and scalings sₖ."""

    b: torch.Tensor
    a: torch.Tensor
    ranks: List[int]
    weights: List[float]
    scalings: List[float]

    def factors(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(Bₖ, Aₖ) of each device: views into `b` and `a`."""
        first = 0
        for rank in self.ranks:
            yield self.b[:, first : first + rank], self.a[first : first + rank]
            first += rank

    def stacked(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """[p₁s₁B₁ … p_K s_K B_K] and [A₁; …; A_K]: their product is P̄ = Σ pₖsₖBₖAₖ."""
        columns = torch.tensor(
            [
                p * s
                for p, s, rank in zip(self.weights, self.scalings, self.ranks)
                for _ in range(rank)
            ],
            dtype=self.b.dtype,
        )
        return self.b * columns, self.a

    def mean_product(self) -> torch.Tensor:
        b, a = self.stacked()
        return b @ a


def relative_error(target: torch.Tensor, approximation: torch.Tensor) -> float:
    """‖target − approximation‖_F / ‖target‖_F (0 when the target is 0)."""
    norm = float(torch.linalg.matrix_norm(target))
    if norm == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(target - approximation)) / norm


def heads_of(state: Tensors) -> Tensors:
    """The tensors that are no LoRA factor (a classifier's head): plain FedAvg."""
    return {name: value for name, value in state.items() if not is_factor(name)}


def split(
    svd: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int, scaling: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, A) at `rank` with s·BA the best rank-r part of U S Vᵀ: B = U√(S/s), A = √(S/s)Vᵀ
    (zero columns/rows where the product has fewer than `rank` singular values)."""
    u, s, vh = svd
    kept = min(rank, int(s.shape[0]))
    root = torch.sqrt(s[:kept] / scaling)
    b = torch.zeros(u.shape[0], rank, dtype=u.dtype)
    a = torch.zeros(rank, vh.shape[1], dtype=u.dtype)
    b[:, :kept] = u[:, :kept] * root[None, :]
    a[:kept] = root[:, None] * vh[:kept]
    return b, a


def layer_factors(
    start: Mapping[str, torch.Tensor],
    updates: List[AcceptedUpdate],
    scaling: Scaling,
    frozen: Optional[Mapping[str, torch.Tensor]] = None,
    starts: Optional[Mapping[int, Mapping[str, torch.Tensor]]] = None,
) -> Iterator[Tuple[str, LayerFactors]]:
    """(prefix, factors) per adapted layer, made as they are asked for (a layer's matrices can
    go before the next one's are made): every device's Bₖ = B + ΔBₖ, Aₖ = A + ΔAₖ side by side,
    devices grouped by rank, in id order within a rank (a fixed order, so the sums are
    bit-identical whatever order updates arrived in; grouped, a rank's starting factors are
    added to all its devices in one broadcast).

    Each upload is read once (`whole_tensors`), and a layer's deltas leave the uploads as they
    are concatenated, so memory stays at about one copy of the uploads; a few ops per layer
    instead of a few per device and layer (12,000 for 100 SmolLM2 q,v devices: their dispatch
    cost more than the data). `starts` (rank → state) gives the starting factors of devices
    at ranks other than the global one (flexlora); a frozen A (ffa) comes from `frozen`."""
    ordered, weights = sample_weights(updates)
    uploads = [dict(whole_tensors(item.tensors)) for item in ordered]
    prefixes = adapted_layers(start)
    ranks = [int(upload[prefixes[0] + B_SUFFIX].shape[1]) for upload in uploads]
    order = sorted(range(len(ordered)), key=lambda k: ranks[k])  # stable: id order kept
    uploads = [uploads[k] for k in order]
    weights = [weights[k] for k in order]
    ranks = [ranks[k] for k in order]
    groups = [(rank, len(list(members))) for rank, members in itertools.groupby(ranks)]
    scalings = [scaling(rank) for rank in ranks]
    for prefix in prefixes:
        name_a, name_b = factor_names(prefix)
        out, inp = start[name_b].shape[0], _a_of(start, frozen, name_a).shape[1]
        b = torch.cat(_deltas(uploads, name_b, [(out, rank) for rank in ranks]), dim=1)
        if name_a in uploads[0]:
            a = torch.cat(_deltas(uploads, name_a, [(rank, inp) for rank in ranks]))
        else:  # ffa: A frozen, Aₖ = A
            a = torch.zeros(sum(ranks), inp, dtype=COMPUTE)
        first = 0
        for rank, count in groups:
            origin = start if starts is None or rank not in starts else starts[rank]
            columns = slice(first, first + rank * count)
            b[:, columns].view(out, count, rank).add_(origin[name_b].unsqueeze(1))
            a[columns].view(count, rank, inp).add_(_a_of(origin, frozen, name_a))
            first += rank * count
        yield prefix, LayerFactors(b, a, ranks, weights, scalings)


def _a_of(
    start: Mapping[str, torch.Tensor], frozen: Optional[Mapping[str, torch.Tensor]], name: str
) -> torch.Tensor:
    """A layer's A: from `frozen` when it is there (ffa), else from `start`."""
    return (frozen if frozen is not None and name in frozen else start)[name]


def _deltas(
    uploads: List[Dict[str, torch.Tensor]], name: str, shapes: List[Tuple[int, int]]
) -> List[torch.Tensor]:
    """Each upload's delta `name` (fp32), popped, its shape asserted (a (1, in) delta would
    broadcast silently)."""
    deltas = []
    for upload, shape in zip(uploads, shapes):
        delta = upload.pop(name)
        if tuple(delta.shape) != shape:
            raise ValueError(  # the intake checked every upload: a strategy's or caller's bug
                f"{name}: delta {tuple(delta.shape)} on {shape}"
            )
        deltas.append(delta.to(COMPUTE))
    return deltas


def factor_errors(
    layers: Iterator[Tuple[str, LayerFactors]],
    result: Mapping[str, torch.Tensor],
    scaling: float,
    frozen: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, float]:
    """Per layer ‖P̄ − s·B̄Ā‖/‖P̄‖ for the global factors in `result` (A from `frozen` if absent)."""
    errors: Dict[str, float] = {}
    for prefix, layer in layers:
        name_a, name_b = factor_names(prefix)
        a = result[name_a] if name_a in result else (frozen or {})[name_a]
        approximation = scaling * (result[name_b].to(COMPUTE) @ a.to(COMPUTE))
        errors[prefix] = relative_error(layer.mean_product(), approximation)
    return errors


def averaged_factor_errors(
    strategy: Strategy, start: Tensors, updates: List[AcceptedUpdate], result: Tensors
) -> Dict[str, float]:
    """The error of factors averaged separately (fedavg, ffa), one rank for every device."""
    layers = adapted_layers(start)
    if not layers:
        return {}
    scaling = method_scaling(strategy.ctx.method)
    rank = rank_of(start, layers[0])
    per_layer = layer_factors(start, updates, scaling, frozen=strategy.ctx.init)
    return factor_errors(per_layer, result, scaling(rank), frozen=strategy.ctx.init)
