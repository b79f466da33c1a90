"""The metric a run is judged by: named, or the best recorded; to-target in the right direction;
and the local fleet's per-device data folders."""

from __future__ import annotations

from jetfed.coordinator.config import parse_config
from jetfed.coordinator.quality import metric_name, metric_value, reaches
from jetfed.coordinator.records import RoundMetrics
from jetfed.profiles.summary import RoundCost, to_target


def _round(index: int, **extra: float) -> RoundMetrics:
    return RoundMetrics(round_index=index, status="aggregated", method="lora", extra=extra)


def _cost(index: int, value: float) -> RoundCost:
    return RoundCost(index, value, 10.0, 10.0 * (index + 1), 100, 100, None, {}, None)


def test_the_metric_is_named_or_the_best_recorded() -> None:
    rounds = [_round(0, perplexity=9.0, exact_match=0.5)]
    assert metric_name(None, rounds) == "exact_match"
    assert metric_name("perplexity", rounds) == "perplexity"
    assert metric_name(None, [_round(0, perplexity=9.0)]) == "perplexity"
    assert metric_name(None, []) == "accuracy"
    assert metric_value(rounds[0], "exact_match") == 0.5
    assert metric_value(rounds[0], "accuracy") is None


def test_to_target_is_lower_is_better_for_perplexity() -> None:
    assert reaches(4.0, 5.0, "perplexity") and not reaches(6.0, 5.0, "perplexity")
    assert reaches(0.8, 0.75, "exact_match") and not reaches(None, 0.1, "rouge_l")
    costs = [_cost(0, 9.0), _cost(1, 4.5), _cost(2, 3.0)]
    row = to_target("lora", costs, 5.0, "perplexity")
    assert row.reached and row.rounds == 2 and row.time_s == 20.0


def test_client_paths_give_each_local_device_its_own_folder() -> None:
    config = parse_config(
        {
            "name": "mt",
            "data": {"path": "sst2", "client_paths": {"demo-02": "ag_news"}},
        }
    )
    assert config.data.path_for("demo-01") == "sst2"
    assert config.data.path_for("demo-02") == "ag_news"
