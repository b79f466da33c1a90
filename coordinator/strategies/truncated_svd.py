"""The top-r singular triplets of a layer's mean product P̄ (out × in), for `exact`'s and
`flexlora`'s svd modes (`aggregation.svd_solver`).

The strategies keep r of min(out, in) triplets (r = 8 or 16 of 576 for SmolLM2), so a full
LAPACK SVD computes ~40× more than they use. `subspace` (default) finds them by subspace
iteration with k = 2r columns (Halko, Martinsson & Tropp 2011, alg. 4.4):

    Q₀ = orth(P̄Ω),   Cᵢ = QᵢᵀP̄ = uᵢ Sᵢ vᵢᵀ (a small k × in SVD),   Qᵢ₊₁ = orth(P̄Cᵢᵀ)

Ω is an in × k Gaussian drawn from a generator with a fixed seed, so the result is a function
of P̄ alone: bit-identical across runs and arrival orders like the rest of the aggregate. Step i
gives the rank-r candidate Uᵢ = Qᵢuᵢ, Sᵢ, vᵢᵀ (first r) and its truncation error
eᵢ = ‖P̄ − UᵢSᵢvᵢᵀ‖_F, measured directly (out·in·r multiply-adds: ‖P̄‖² − ΣSᵢ² would cancel
in fp32 when eᵢ ≪ ‖P̄‖). eᵢ decreases geometrically towards the optimum; the iteration stops
once a step gains less than `TOLERANCE`·eᵢ, or once eᵢ ≤ `TOLERANCE`·‖P̄‖ (below what fp32
factors resolve). The error is then within 1e-6 relative of the exact SVD's, or within
1e-6·‖P̄‖ where the optimum is itself that small; a dense fp32 SVD does no better there
(tests/test_truncated_svd.py: trained-like, decaying, gapped and low-rank spectra). With a gap
after σᵣ it takes 2–4 steps of ~2·out·in·k multiply-adds; on a spectrum flat around σᵣ it
crawls, and after `MAX_STEPS` the exact SVD takes over, so the answer is never worse than
`dense`'s (SmolLM2 q_proj: ~3 ms per layer instead of ~45 ms, ~10 ms more when it falls back).

`dense` is that exact SVD and the reference: LAPACK on the QR-compressed m × m core while
m = Σrₖ < min(out, in) (exact, O((out + in)·m²)), else on P̄ itself.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Tuple

import torch

from jetfed.coordinator.strategies.base import StrategySettings

SvdSolver = Literal["subspace", "dense"]
Triplets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(U: out × r, S: r, Vᵀ: r × in)."""

SKETCH_SEED = 0
TOLERANCE = 1e-6
MAX_STEPS = 8
CORE_STEPS = 8
"""The QR core's SVD is preferred while it costs no more than this many r-column products."""


class SvdSettings(StrategySettings):
    """The `aggregation:` key of the strategies that truncate P̄ by SVD."""

    svd_solver: SvdSolver = "subspace"
    """subspace: the top-r triplets by seeded subspace iteration (the exact SVD where it does
    not converge); dense: LAPACK's full SVD, the reference."""


def top_singular(
    product: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    rank: int,
    solver: SvdSolver = "subspace",
) -> Triplets:
    """The `rank` largest singular triplets of `product` = b·a (fewer if its sides are shorter).

    `subspace` leaves to the exact SVD what that does as cheaply: a small m × m core (its
    ~(out + in)·m² against a few subspace steps' ~2r·out·in each; measured crossover at
    m ≈ 100–150 for 576 × 576 and r = 8, e.g. 10 devices of rank 8)."""
    out, inp = product.shape
    cheap_core = (out + inp) * b.shape[1] ** 2 <= CORE_STEPS * rank * out * inp
    if solver == "subspace" and 2 * rank < min(out, inp) and not cheap_core:
        found = subspace_triplets(product, rank)
        if found is not None:
            return found
    u, s, vh = dense_svd(product, b, a)
    return u[:, :rank], s[:rank], vh[:rank]


def dense_svd(product: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> Triplets:
    """Thin SVD of b·a (out × m times m × in): of the m × m core when m < min(out, in) (the
    product has rank ≤ m; QR of both factors leaves that core), else of `product`."""
    if b.shape[1] < min(b.shape[0], a.shape[1]):
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        return q_b @ u, s, vh @ q_a.T
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    return u, s, vh


def subspace_triplets(product: torch.Tensor, rank: int) -> Optional[Triplets]:
    """Subspace iteration (module doc); None when it has not converged after MAX_STEPS."""
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    sketch = torch.randn(product.shape[1], 2 * rank, generator=generator, dtype=product.dtype)
    norm = float(torch.linalg.matrix_norm(product))
    basis = torch.linalg.qr(product @ sketch).Q
    previous = math.inf
    for _ in range(MAX_STEPS):
        # C = QᵀP̄ through its transpose: LAPACK's SVD is ~3× faster on a tall matrix
        core_t = product.T @ basis
        v, s, uh = torch.linalg.svd(core_t, full_matrices=False)
        found = (basis @ uh[:rank].T, s[:rank], v[:, :rank].T)
        residual = torch.addmm(product, found[0] * found[1], found[2], alpha=-1.0)
        error = float(torch.linalg.matrix_norm(residual))
        if previous - error <= TOLERANCE * error or error <= TOLERANCE * norm:
            return found
        previous = error
        basis = torch.linalg.qr(product @ core_t).Q
    return None
