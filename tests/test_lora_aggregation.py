"""The LoRA-aware strategies (fedavg's error, ffa, exact, flexlora) against hand computations
on small random factors: non-square layers, 2–5 devices, unequal sample counts, scaling
s = alpha/r ≠ 1, and the same bits whatever order the updates arrived in."""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from jetfed.coordinator.strategies.base import AcceptedUpdate, ServerContext, make_strategy
from jetfed.coordinator.strategies.lowrank import at_rank, method_scaling
from jetfed.edge.errors import UserError
from jetfed.edge.methods.base import Tensors
from jetfed.edge.methods.lora import LoraMethod
from jetfed.edge.wire import ModelRef
from tests.test_strategies import accepted

LAYERS = {"m.l0.q": (6, 4), "m.l1.mlp": (5, 9)}
"""prefix → (out, in): both non-square, one wider than tall."""
RANK, ALPHA = 3, 6.0
HEAD = "classifier.weight"


def lora(rank: int = RANK, **extra: object) -> LoraMethod:
    return LoraMethod(
        {"rank": rank, "alpha": ALPHA, **extra}, ModelRef(name_or_path="x", num_labels=2)
    )


def names(prefix: str) -> Tuple[str, str]:
    return f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"


def random_state(gen: torch.Generator, rank: int = RANK, with_a: bool = True) -> Tensors:
    state: Tensors = {HEAD: torch.randn(2, 4, generator=gen)}
    for prefix, (out, inp) in LAYERS.items():
        name_a, name_b = names(prefix)
        if with_a:
            state[name_a] = torch.randn(rank, inp, generator=gen)
        state[name_b] = torch.randn(out, rank, generator=gen)
    return state


def fleet(
    gen: torch.Generator, count: int, ranks: Optional[List[int]] = None, with_a: bool = True
) -> List[AcceptedUpdate]:
    samples = [7, 120, 33, 2, 58][:count]
    ranks = ranks or [RANK] * count
    return [
        accepted(n, {name: 0.3 * t for name, t in random_state(gen, r, with_a).items()})
        for n, r in zip(samples, ranks)
    ]


def weights(updates: List[AcceptedUpdate]) -> List[float]:
    total = sum(item.update.num_samples for item in updates)
    return [item.update.num_samples / total for item in updates]


def hand_mean_product(
    start: Tensors,
    updates: List[AcceptedUpdate],
    prefix: str,
    frozen_a: Optional[Tensors] = None,
    starts: Optional[Dict[str, Tensors]] = None,
) -> torch.Tensor:
    """Σ pₖ sₖ BₖAₖ, one device at a time (no stacking), each from `start` or from its own
    starting state in `starts` (device id →)."""
    scaling = method_scaling(lora())
    name_a, name_b = names(prefix)
    total = torch.zeros(LAYERS[prefix], dtype=torch.float64)
    for item, p in zip(updates, weights(updates)):
        origin = (starts or {}).get(item.update.device_id, start)
        b = origin[name_b].double() + item.tensors[name_b].double()
        if frozen_a is None:
            a = origin[name_a].double() + item.tensors[name_a].double()
        else:
            a = frozen_a[name_a].double()
        total += p * scaling(b.shape[1]) * (b @ a)
    return total


def hand_factor_mean(state: Tensors, updates: List[AcceptedUpdate], name: str) -> torch.Tensor:
    return state[name].double() + sum(
        p * item.tensors[name].double() for item, p in zip(updates, weights(updates))
    )


def aggregate_in_every_order(strategy_name: str, state: Tensors, updates, **ctx) -> Tensors:
    """The result, checked bit-identical over (up to 24) arrival orders."""
    results = []
    for order in itertools.islice(itertools.permutations(updates), 24):
        strategy = make_strategy(strategy_name, ServerContext.aggregation_only(**ctx))
        results.append((strategy.aggregate(0, state, list(order)), strategy.layer_errors))
    first, errors = results[0]
    for other, other_errors in results[1:]:
        assert all(torch.equal(first[name], other[name]) for name in first)
        assert errors == other_errors
    assert {name: tuple(t.shape) for name, t in first.items()} == {
        name: tuple(t.shape) for name, t in state.items()
    }
    return first


def product(state: Tensors, prefix: str) -> torch.Tensor:
    """s·BA of one layer."""
    name_a, name_b = names(prefix)
    return ALPHA / RANK * (state[name_b].double() @ state[name_a].double())


def relative(target: torch.Tensor, approx: torch.Tensor) -> float:
    return float((target - approx).norm() / target.norm())


@pytest.mark.parametrize("count", [2, 3, 5])
def test_fedavg_averages_factors_and_reports_their_error(count: int) -> None:
    gen = torch.Generator().manual_seed(count)
    state, updates = random_state(gen), fleet(gen, count)
    strategy = make_strategy("fedavg", ServerContext.aggregation_only(method=lora()))
    new = strategy.aggregate(0, state, updates)
    aggregate_in_every_order("fedavg", state, updates, method=lora())
    for prefix in LAYERS:
        name_a, name_b = names(prefix)
        a, b = hand_factor_mean(state, updates, name_a), hand_factor_mean(state, updates, name_b)
        assert torch.allclose(new[name_a].double(), a, atol=1e-6)
        assert torch.allclose(new[name_b].double(), b, atol=1e-6)
        exact = hand_mean_product(state, updates, prefix)
        expected = relative(exact, ALPHA / RANK * (b @ a))
        assert strategy.layer_errors[prefix] == pytest.approx(expected, rel=1e-5)
        assert expected > 1e-3  # mean(B)·mean(A) ≠ mean(B·A)
    assert torch.allclose(new[HEAD].double(), hand_factor_mean(state, updates, HEAD), atol=1e-6)


def test_ffa_averages_b_only_and_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    frozen = {n: t for n, t in random_state(gen).items() if "lora_A" in n}
    state, updates = random_state(gen, with_a=False), fleet(gen, 4, with_a=False)
    method = lora(freeze_a=True)
    new = aggregate_in_every_order("ffa", state, updates, method=method, init=frozen)
    strategy = make_strategy("ffa", ServerContext.aggregation_only(method=method, init=frozen))
    strategy.aggregate(0, state, updates)
    for prefix in LAYERS:
        name_a, name_b = names(prefix)
        assert name_a not in new
        b = hand_factor_mean(state, updates, name_b)
        assert torch.allclose(new[name_b].double(), b, atol=1e-6)
        exact = hand_mean_product(state, updates, prefix, frozen_a=frozen)
        assert torch.allclose(exact, ALPHA / RANK * (b @ frozen[name_a].double()), atol=1e-9)
        assert strategy.layer_errors[prefix] < 1e-6
    with pytest.raises(UserError, match="freeze_a"):
        make_strategy("ffa", ServerContext.aggregation_only(method=lora()))


@pytest.mark.parametrize("count", [2, 5])
def test_exact_fold_makes_the_effective_weight_the_mean_product(count: int) -> None:
    gen = torch.Generator().manual_seed(10 + count)
    state = random_state(gen)
    base = {prefix: torch.randn(shape, generator=gen) for prefix, shape in LAYERS.items()}
    strategy = make_strategy("exact", ServerContext.aggregation_only(method=lora()))
    target = {prefix: base[prefix].double() + product(state, prefix) for prefix in LAYERS}
    for round_index in range(2):  # the fold accumulates over rounds
        updates = fleet(gen, count)
        for prefix in LAYERS:  # the effective weight moves by the exact mean change
            mean = hand_mean_product(state, updates, prefix)
            target[prefix] += mean - product(state, prefix)
        state = strategy.aggregate(round_index, state, updates)
        assert max(strategy.layer_errors.values()) < 1e-6
        for prefix in LAYERS:
            fold = strategy.fold[prefix + ".base_layer.weight"].double()
            effective = base[prefix].double() + fold + product(state, prefix)
            assert torch.allclose(effective, target[prefix], atol=1e-5)
    assert set(aggregate_in_every_order("exact", state, fleet(gen, 3), method=lora()))


def test_exact_svd_is_the_truncated_mean_product() -> None:
    gen = torch.Generator().manual_seed(3)
    state, updates = random_state(gen), fleet(gen, 3)
    settings = {"mode": "svd"}
    new = aggregate_in_every_order("exact", state, updates, settings=settings, method=lora())
    for prefix in LAYERS:
        name_a, name_b = names(prefix)
        mean = hand_mean_product(state, updates, prefix)
        u, s, vh = torch.linalg.svd(mean)
        best = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK]
        got = ALPHA / RANK * (new[name_b].double() @ new[name_a].double())
        assert torch.allclose(got, best, atol=1e-5)


@pytest.mark.parametrize("mode", ["svd", "zero_pad"])
def test_flexlora_federates_ranks_1_2_3(mode: str) -> None:
    gen = torch.Generator().manual_seed(4)
    ranks = [1, 3, 2, 3]
    scaling = method_scaling(lora())
    state, updates = random_state(gen), fleet(gen, 4, ranks)
    starts = {r: at_rank(state, r, scaling) for r in set(ranks)}
    for r, start in starts.items():  # each device starts from its share of the global product
        for prefix in LAYERS:
            name_a, name_b = names(prefix)
            mine = scaling(r) * (start[name_b].double() @ start[name_a].double())
            full = scaling(RANK) * (state[name_b][:, :r].double() @ state[name_a][:r].double())
            assert torch.allclose(mine, full, atol=1e-5)
    new = aggregate_in_every_order(
        "flexlora", state, updates, settings={"heterogeneous": mode}, method=lora()
    )
    for prefix in LAYERS:
        name_a, name_b = names(prefix)
        by_device = {u.update.device_id: starts[r] for u, r in zip(updates, ranks)}
        mean = hand_mean_product(state, updates, prefix, starts=by_device)
        got = scaling(RANK) * (new[name_b].double() @ new[name_a].double())
        if mode == "svd":
            u, s, vh = torch.linalg.svd(mean)
            assert torch.allclose(got, u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK], atol=1e-5)
        else:
            b_mean = torch.zeros(LAYERS[prefix][0], RANK, dtype=torch.float64)
            a_mean = torch.zeros(RANK, LAYERS[prefix][1], dtype=torch.float64)
            for item, p, r in zip(updates, weights(updates), ranks):
                back = (scaling(r) / scaling(RANK)) ** 0.5
                start = starts[r]
                b_mean[:, :r] += p * back * (start[name_b].double() + item.tensors[name_b].double())
                a_mean[:r] += p * back * (start[name_a].double() + item.tensors[name_a].double())
            assert torch.allclose(new[name_b].double(), b_mean, atol=1e-6)
            assert torch.allclose(new[name_a].double(), a_mean, atol=1e-6)


def test_flexlora_refuses_a_rank_above_the_global_one() -> None:
    strategy = make_strategy("flexlora", ServerContext.aggregation_only(method=lora()))
    with pytest.raises(UserError, match=r"above method\.rank"):
        strategy.device_state(random_state(torch.Generator().manual_seed(0)), RANK + 1)
    with pytest.raises(UserError, match="flexlora"):
        make_strategy("fedavg", ServerContext.aggregation_only()).device_state({}, 2)


def test_exact_effective_weight_of_a_real_model(minilm_path: str) -> None:
    """On MiniLM (query/value adapters, s = 16/8): after `exact`, the device model's effective
    weight (base with the fold + s·B̄Ā) is W + s·Σ pₖBₖAₖ to 1e-5."""
    from jetfed.edge.methods.lora import fold_into_base

    torch.set_num_threads(1)
    ref = ModelRef(name_or_path="minilm", num_labels=2, max_length=32, num_hidden_layers=1)
    method = LoraMethod({"rank": 8, "alpha": 16}, ref)
    model = method.build(None, seed=0)
    state = method.get_state(model)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(5)
    updates = [
        accepted(
            n,
            {name: 0.05 * torch.randn(t.shape, generator=gen) for name, t in state.items()},
        )
        for n in (3, 40, 11)
    ]
    strategy = make_strategy("exact", ServerContext.aggregation_only(method=method))
    new = strategy.aggregate(0, state, updates)
    before = {name: params[name].detach().double().clone() for name in strategy.fold}
    method.set_state(model, new)
    fold_into_base(model, strategy.fold)
    assert len(strategy.fold) == 2  # query and value of the one layer
    for base_name in strategy.fold:
        prefix = base_name[: -len(".base_layer.weight")]
        name_a, name_b = names(prefix)
        effective = params[base_name].double() + 2.0 * (
            params[name_b].double() @ params[name_a].double()
        )
        mean = sum(
            p
            * 2.0
            * (
                (state[name_b] + u.tensors[name_b]).double()
                @ (state[name_a] + u.tensors[name_a]).double()
            )
            for u, p in zip(updates, weights(updates))
        )
        assert torch.allclose(effective, before[base_name] + mean, atol=1e-5, rtol=0)


def test_factors_that_do_not_fit_the_layer_are_a_strategy_error() -> None:
    gen = torch.Generator().manual_seed(6)
    state, updates = random_state(gen), fleet(gen, 2)
    name_a, _ = names("m.l1.mlp")
    updates[1].tensors[name_a] = torch.zeros(RANK, 1)  # would broadcast over 9 columns
    strategy = make_strategy("exact", ServerContext.aggregation_only(method=lora()))
    with pytest.raises(ValueError, match=r"m\.l1\.mlp\.lora_A.*\(3, 1\) on \(3, 9\)"):
        strategy.aggregate(0, state, updates)
    assert strategy.fold == {}  # m.l0.q came first and was fine: nothing of it was folded


@pytest.mark.parametrize("name", ["clipped_fedavg", "median", "trimmed_mean"])
def test_robust_strategies_report_the_error_too(name: str) -> None:
    gen = torch.Generator().manual_seed(7)
    state, updates = random_state(gen), fleet(gen, 5)
    settings = {"clip_norm": 1e6} if name == "clipped_fedavg" else {}
    strategy = make_strategy(name, ServerContext.aggregation_only(settings, method=lora()))
    strategy.aggregate(0, state, updates)
    assert set(strategy.layer_errors) == set(LAYERS)
    assert all(0 < error < 10 for error in strategy.layer_errors.values())


def test_exact_fold_survives_a_resume_and_travels_as_one_blob() -> None:
    from jetfed.edge.methods.lora import FOLD_BLOB
    from jetfed.edge.tensor_codec import decode_tensors

    gen = torch.Generator().manual_seed(8)
    state = random_state(gen)
    strategy = make_strategy("exact", ServerContext.aggregation_only(method=lora()))
    assert strategy.configure_round(0, state) == {}  # nothing folded yet, nothing to fetch
    state = strategy.aggregate(0, state, fleet(gen, 3))
    blob = strategy.configure_round(1, state)[FOLD_BLOB]
    resumed = make_strategy("exact", ServerContext.aggregation_only(method=lora()))
    resumed.load_state(strategy.state())
    assert resumed.configure_round(1, state) == {FOLD_BLOB: blob}
    travelled = decode_tensors(blob)
    assert set(travelled) == {prefix + ".base_layer.weight" for prefix in LAYERS}
    assert all(tuple(travelled[p + ".base_layer.weight"].shape) == LAYERS[p] for p in LAYERS)
