"""A sweep's summary (`jetfed simulate ... --seeds`): per cell the run metric per round as
mean ± 95 % CI over seeds, the mean of the last K rounds and the final round, rounds to each
target, mean bytes up/down per round and aggregation error (LoRA methods), and paired
differences between methods (or between `--case`s, when the sweep has them) that ran with the
same seeds.

The CI is Student's t over the n seeds of a cell: mean ± t₀.₉₇₅(n−1)·s/√n (scipy.stats.t), none
for n = 1. A paired difference takes, per seed, method A's number minus method B's in cells
that agree on every other setting (same seed, hence the same partition and device seeds), and
gives the same t-interval over those differences: an interval that excludes 0 says which method
is ahead at 95 %, one that contains 0 says the sweep cannot tell. The last-K mean is the
headline number, not the best round, which rewards noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jetfed.coordinator.quality import metric_name, metric_value, reaches
from jetfed.coordinator.records import RoundMetrics
from jetfed.profiles.document import Block, Heading, Image, Paragraph, TableBlock, to_markdown

CONFIDENCE = 0.95
METHOD_KEY = "method.name"
CASE_KEY = "case"


@dataclass
class SweepEntry:
    settings: Dict[str, str]
    """The swept settings of its cell."""
    seed: Optional[int]
    run_dir: Path
    label: str


def read_rounds(run_dir: Path) -> List[RoundMetrics]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [RoundMetrics.model_validate_json(line) for line in lines if line.strip()]


def mean_ci(values: Sequence[float]) -> Dict[str, Any]:
    """n, mean, the 95 % CI half-width (None for n < 2) and the values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None, "values": []}
    mean = sum(values) / n
    half = None
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": half, "values": list(values)}


def per_round(runs: Sequence[Sequence[Optional[float]]]) -> List[Dict[str, Any]]:
    """`mean_ci` over the runs of each round (1-based `round`), as long as the longest run."""
    length = max((len(run) for run in runs), default=0)
    return [
        dict(
            mean_ci([v for run in runs if len(run) > i and (v := run[i]) is not None]),
            round=i + 1,
        )
        for i in range(length)
    ]


def rounds_to(values: Sequence[Optional[float]], target: float, metric: str) -> Optional[int]:
    """The first round (1-based) whose metric reaches `target`; None if none did."""
    return next((i + 1 for i, value in enumerate(values) if reaches(value, target, metric)), None)


def _last_mean(values: Sequence[Optional[float]], last: int) -> Optional[float]:
    tail = [v for v in values[-last:] if v is not None]
    return sum(tail) / len(tail) if tail else None


def summarize_sweep(
    entries: Sequence[SweepEntry],
    out_dir: Path,
    metric: Optional[str] = None,
    targets: Sequence[float] = (),
    last_rounds: int = 5,
    unfinished: Sequence[str] = (),
) -> Dict[str, Any]:
    """Write summary.md, summary.json and one PNG per group of cells to `out_dir`; `entries`
    are finished runs, `unfinished` names the others (left out)."""
    rounds = {id(entry): read_rounds(entry.run_dir) for entry in entries}
    name = metric_name(metric, [m for ms in rounds.values() for m in ms])
    series = {id(entry): [metric_value(m, name) for m in rounds[id(entry)]] for entry in entries}
    cells: Dict[str, List[SweepEntry]] = {}
    for entry in entries:
        cells.setdefault(entry.label, []).append(entry)
    cell_rows = [
        dict(
            _cell(label, members, series, name, targets, last_rounds),
            cost=_cost([rounds[id(e)] for e in members if series[id(e)]]),
        )
        for label, members in cells.items()
    ]
    summary: Dict[str, Any] = {
        "metric": name,
        "confidence": CONFIDENCE,
        "last_rounds": last_rounds,
        "targets": list(targets),
        "cells": cell_rows,
        "paired": _paired(cells, series, last_rounds),
        "unfinished": list(unfinished),
    }
    summary["plots"] = _plots(cells, series, name, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown(summary))
    return summary


def _cell(
    label: str,
    members: Sequence[SweepEntry],
    series: Dict[int, List[Optional[float]]],
    metric: str,
    targets: Sequence[float],
    last_rounds: int,
) -> Dict[str, Any]:
    finished = [e for e in members if series[id(e)]]
    rounds = per_round([series[id(e)] for e in finished])
    last = [_last_mean(series[id(e)], last_rounds) for e in finished]
    final = [series[id(e)][-1] for e in finished]
    to_target = {}
    for target in targets:
        hits = [rounds_to(series[id(e)], target, metric) for e in finished]
        reached = sorted(h for h in hits if h is not None)
        to_target[f"{target:g}"] = {
            "reached": len(reached),
            "of": len(finished),
            "rounds": hits,
            "median_rounds": reached[len(reached) // 2] if reached else None,
        }
    return {
        "label": label,
        "settings": members[0].settings,
        "seeds": [e.seed for e in finished],
        "runs": len(members),
        "rounds": len(rounds),
        "per_round": rounds,
        "last": mean_ci([v for v in last if v is not None]),
        "final": mean_ci([v for v in final if v is not None]),
        "to_target": to_target,
    }


def _cost(runs: Sequence[Sequence[RoundMetrics]]) -> Dict[str, Optional[float]]:
    """Per round, averaged over the cell's rounds and runs: bytes each way and, for LoRA
    methods, the aggregation error (mean over layers, and the worst layer)."""
    rounds = [m for run in runs for m in run]
    errors = [m.aggregation_error for m in rounds if m.aggregation_error is not None]

    def mean(values: Sequence[float]) -> Optional[float]:
        return sum(values) / len(values) if values else None

    return {
        "bytes_up_per_round": mean([m.bytes_up for m in rounds]),
        "bytes_down_per_round": mean([m.bytes_down for m in rounds]),
        "aggregation_error_mean": mean([e.mean for e in errors]),
        "aggregation_error_worst": mean([e.worst for e in errors]),
    }


def compared_key(cells: Dict[str, List[SweepEntry]]) -> str:
    """What a paired difference and a plot's lines compare: the cases when the sweep has them,
    else the method."""
    has_cases = any(CASE_KEY in members[0].settings for members in cells.values())
    return CASE_KEY if has_cases else METHOD_KEY


def _groups(cells: Dict[str, List[SweepEntry]]) -> Dict[str, Dict[str, List[SweepEntry]]]:
    """Cells that differ only in the compared key (`compared_key`), by the rest of their
    settings; compared value → members."""
    key = compared_key(cells)
    groups: Dict[str, Dict[str, List[SweepEntry]]] = {}
    for members in cells.values():
        settings = members[0].settings
        rest = ", ".join(f"{k}={v}" for k, v in settings.items() if k != key)
        groups.setdefault(rest or "(all)", {})[settings.get(key, "")] = members
    return groups


def _paired(
    cells: Dict[str, List[SweepEntry]],
    series: Dict[int, List[Optional[float]]],
    last_rounds: int,
) -> List[Dict[str, Any]]:
    rows = []
    for group, methods in _groups(cells).items():
        for a, b in combinations(sorted(methods), 2):
            by_seed_a = {e.seed: series[id(e)] for e in methods[a] if series[id(e)]}
            by_seed_b = {e.seed: series[id(e)] for e in methods[b] if series[id(e)]}
            seeds = sorted(set(by_seed_a) & set(by_seed_b), key=lambda s: (s is None, s))
            pairs: List[Tuple[List[Optional[float]], List[Optional[float]]]] = [
                (by_seed_a[s], by_seed_b[s]) for s in seeds
            ]
            last = [(_last_mean(x, last_rounds), _last_mean(y, last_rounds)) for x, y in pairs]
            final = [(x[-1], y[-1]) for x, y in pairs]
            length = min((min(len(x), len(y)) for x, y in pairs), default=0)
            rows.append(
                {
                    "group": group,
                    "a": a,
                    "b": b,
                    "seeds": seeds,
                    "last": mean_ci(_differences(last)),
                    "final": mean_ci(_differences(final)),
                    "per_round": [
                        dict(mean_ci(_differences([(x[i], y[i]) for x, y in pairs])), round=i + 1)
                        for i in range(length)
                    ],
                }
            )
    return rows


def _differences(pairs: Sequence[Tuple[Optional[float], Optional[float]]]) -> List[float]:
    return [x - y for x, y in pairs if x is not None and y is not None]


def verdict(stats: Dict[str, Any], a: str, b: str) -> str:
    """What a difference a − b with its CI says."""
    mean, half = stats["mean"], stats["ci95"]
    if mean is None:
        return "no pairs"
    if half is None:
        return "one seed: no CI"
    if mean - half > 0:
        return f"{a} > {b}"
    if mean + half < 0:
        return f"{a} < {b}"
    return "not resolved (CI contains 0)"


def _fmt(stats: Dict[str, Any], digits: int = 3) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["ci95"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f}"


def markdown(summary: Dict[str, Any]) -> str:
    metric, last = summary["metric"], summary["last_rounds"]
    blocks: List[Block] = [
        Heading(1, f"Sweep summary: {metric}"),
        Paragraph(
            f"Mean ± 95 % CI over seeds (Student's t); last-{last} = the mean of each run's "
            f"last {last} rounds."
        ),
    ]
    if summary["unfinished"]:
        names = ", ".join(summary["unfinished"])
        blocks.append(Paragraph(f"Not finished, left out: {names}."))
    header = ["cell", "seeds", f"last-{last} mean", "final round"]
    header += [f"rounds to {t:g}: reached, median" for t in summary["targets"]]
    rows = []
    for cell in summary["cells"]:
        row = [cell["label"], str(len(cell["seeds"])), _fmt(cell["last"]), _fmt(cell["final"])]
        for target in summary["targets"]:
            hit = cell["to_target"][f"{target:g}"]
            row.append(f"{hit['reached']}/{hit['of']}, {hit['median_rounds'] or '–'}")
        rows.append(row)
    blocks.append(TableBlock(header, rows))
    blocks += [Heading(2, "Cost per round"), TableBlock(*_cost_table(summary["cells"]))]
    if summary["paired"]:
        blocks.append(Heading(2, "Paired differences (same seeds, same partitions)"))
        header = ["settings", "difference", "seeds", f"last-{last}", "final", "verdict (last)"]
        rows = [
            [
                pair["group"],
                f"{pair['a']} − {pair['b']}",
                str(len(pair["seeds"])),
                _fmt(pair["last"], 4),
                _fmt(pair["final"], 4),
                verdict(pair["last"], pair["a"], pair["b"]),
            ]
            for pair in summary["paired"]
        ]
        blocks.append(TableBlock(header, rows))
    cells = summary["cells"]
    length = max((cell["rounds"] for cell in cells), default=0)
    rows = [
        [str(index + 1)]
        + [_fmt(cell["per_round"][index]) if index < cell["rounds"] else "" for cell in cells]
        for index in range(length)
    ]
    blocks += [Heading(2, "Per round"), TableBlock(["round"] + [c["label"] for c in cells], rows)]
    blocks += [Image(Path(plot).stem, Path(plot).name) for plot in summary["plots"]]
    return to_markdown(blocks)


def _cost_table(cells: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    def number(value: Optional[float], unit: float, digits: str) -> str:
        return "–" if value is None else f"{value / unit:{digits}}"

    header = ["cell", "MB up", "MB down", "aggregation error mean", "worst layer"]
    rows = [
        [
            cell["label"],
            number(cell["cost"]["bytes_up_per_round"], 1e6, ".3f"),
            number(cell["cost"]["bytes_down_per_round"], 1e6, ".3f"),
            number(cell["cost"]["aggregation_error_mean"], 1, ".2e"),
            number(cell["cost"]["aggregation_error_worst"], 1, ".2e"),
        ]
        for cell in cells
    ]
    return header, rows


def _plots(
    cells: Dict[str, List[SweepEntry]],
    series: Dict[int, List[Optional[float]]],
    metric: str,
    out_dir: Path,
) -> List[str]:
    """One PNG per group of cells that differ only in the method: mean and 95 % CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, (group, methods) in enumerate(_groups(cells).items()):
        figure, axis = plt.subplots(figsize=(7, 4.2))
        for method, members in sorted(methods.items()):
            label = method or "runs"
            finished = [series[id(e)] for e in members if series[id(e)]]
            stats = per_round(finished)
            xs = [i + 1 for i, st in enumerate(stats) if st["mean"] is not None]
            means = [st["mean"] for st in stats if st["mean"] is not None]
            halves = [st["ci95"] or 0.0 for st in stats if st["mean"] is not None]
            axis.plot(xs, means, marker="o", markersize=3, label=f"{label} (n={len(finished)})")
            axis.fill_between(
                xs,
                [m - h for m, h in zip(means, halves)],
                [m + h for m, h in zip(means, halves)],
                alpha=0.2,
            )
        axis.set_xlabel("round")
        axis.set_ylabel(f"{metric} (mean ± 95 % CI over seeds)")
        axis.set_title(group, fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = out_dir / f"sweep-{number:02d}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(str(path))
    return paths
