"""The subspace solver of `exact`/`flexlora` svd: as good as the exact SVD, deterministic."""

from __future__ import annotations

import math
from typing import Tuple

import pytest
import torch

from jetfed.coordinator.strategies.base import ServerContext, make_strategy
from jetfed.coordinator.strategies.lowrank import method_scaling
from jetfed.coordinator.strategies.truncated_svd import subspace_triplets, top_singular
from tests.test_lora_aggregation import accepted, aggregate_in_every_order, lora, names

OUT, IN = 160, 128


def with_spectrum(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An OUT × IN fp32 matrix with singular values `values` (len IN) and random vectors."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(OUT, IN, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(IN, IN, generator=gen, dtype=torch.float64)).Q
    return ((u * values) @ v.T).float()


INDEX = torch.arange(IN, dtype=torch.float64)
TOP = torch.tensor([10.0, 8, 6, 5, 4, 3, 2.5, 2], dtype=torch.float64)
SPECTRA = {
    # a round of trained adapters: a few strong directions, a small decaying rest
    "trained": torch.cat([TOP, 1e-3 * torch.exp(-INDEX[8:] / 20)]),
    "decaying": torch.exp(-INDEX / 4),
    "slowly decaying": 1 / (1 + INDEX),
    "flat after a gap": torch.cat([torch.full((8,), 3.0), torch.ones(IN - 8)]).double(),
    "rank 5": torch.cat([TOP[:5], torch.zeros(IN - 5)]),
}


def truncation_errors(matrix: torch.Tensor, rank: int, found) -> Tuple[float, float]:
    """(relative error of the found rank-r part, the optimum), both in fp64."""
    exact = matrix.double()
    values = torch.linalg.svdvals(exact)
    optimum = math.sqrt(float((values[rank:] ** 2).sum() / (values**2).sum()))
    u, s, vh = (t.double() for t in found)
    error = float(torch.linalg.matrix_norm(exact - (u * s) @ vh) / torch.linalg.matrix_norm(exact))
    return error, optimum


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("rank", [8, 16])
def test_subspace_iteration_truncates_as_well_as_the_exact_svd(spectrum: str, rank: int) -> None:
    matrix = with_spectrum(SPECTRA[spectrum])
    found = subspace_triplets(matrix, rank)
    assert found is not None  # converged: these spectra have a gap after σᵣ or decay
    assert tuple(found[0].shape) == (OUT, rank) and tuple(found[2].shape) == (rank, IN)
    error, optimum = truncation_errors(matrix, rank, found)
    # within 1e-6 relative of the optimum, or of ‖P̄‖ where fp32 cannot resolve more
    assert error <= optimum * (1 + 1e-6) + 1e-6
    assert all(torch.equal(x, y) for x, y in zip(found, subspace_triplets(matrix, rank)))


def test_a_flat_spectrum_falls_back_to_the_exact_svd() -> None:
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(OUT, IN, generator=gen)  # σ₈ ≈ σ₉ ≈ …: subspace iteration crawls
    assert subspace_triplets(matrix, 8) is None
    found = top_singular(matrix, matrix, torch.eye(IN), 8)
    _, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    assert torch.equal(found[1], s[:8])
    error, optimum = truncation_errors(matrix, 8, found)
    assert error <= optimum * (1 + 1e-6)


LAYERS = {"m.l0.q": (48, 40), "m.l1.v": (24, 40)}


def fleet(count: int, ranks, seed: int):
    """A global state at rank max(ranks) and `count` updates cycling through `ranks`, sized so
    that the subspace solver runs (2r < min(out, in) and Σrₖ too large for the QR core); the
    hand-computation tests' layers are too small for it."""
    gen = torch.Generator().manual_seed(seed)
    full = max(ranks)

    def state(rank: int, scale: float) -> dict:
        tensors = {}
        for prefix, (out, inp) in LAYERS.items():
            name_a, name_b = names(prefix)
            tensors[name_a] = scale * torch.randn(rank, inp, generator=gen)
            tensors[name_b] = scale * torch.randn(out, rank, generator=gen)
        return tensors

    updates = [accepted(10 + 7 * k, state(ranks[k % len(ranks)], 0.3)) for k in range(count)]
    return state(full, 1.0), updates


@pytest.mark.parametrize(
    ("strategy", "settings", "ranks"),
    [("exact", {"mode": "svd"}, [4]), ("flexlora", {"heterogeneous": "svd"}, [2, 4, 3])],
)
def test_the_subspace_solver_aggregates_like_the_dense_one(strategy, settings, ranks) -> None:
    full = max(ranks)
    state, updates = fleet(12, ranks, seed=7)
    method = lora(rank=full)
    fast = aggregate_in_every_order(strategy, state, updates, settings=settings, method=method)
    dense_settings = {**settings, "svd_solver": "dense"}
    dense = make_strategy(strategy, ServerContext.aggregation_only(dense_settings, method))
    reference = dense.aggregate(0, state, updates)
    fast_strategy = make_strategy(strategy, ServerContext.aggregation_only(settings, method))
    assert all(
        torch.equal(fast[n], t) for n, t in fast_strategy.aggregate(0, state, updates).items()
    )
    assert not all(torch.equal(fast[n], t) for n, t in reference.items())  # another path ran
    scaling = method_scaling(method)(full)
    for prefix in LAYERS:
        name_a, name_b = names(prefix)
        got = scaling * (fast[name_b].double() @ fast[name_a].double())
        want = scaling * (reference[name_b].double() @ reference[name_a].double())
        assert torch.allclose(got, want, atol=1e-5)
        assert fast_strategy.layer_errors[prefix] == pytest.approx(
            dense.layer_errors[prefix], rel=1e-5
        )
        assert 0.01 < fast_strategy.layer_errors[prefix] < 1
