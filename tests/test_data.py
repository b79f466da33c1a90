"""Data loading (JSONL/CSV/Parquet) and the partitioners' properties, on the real datasets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from jetfed.edge.data import class_counts, client_shard, load_split, partition
from jetfed.edge.errors import UserError
from jetfed.edge.wire import PartitionSpec


def test_loads_real_single_and_pair_tasks(sst2_dir: Path) -> None:
    sst2 = load_split(str(sst2_dir), "validation")
    assert len(sst2) == 872 and sst2.texts_b is None and sst2.num_classes == 2
    rte = load_split(str(sst2_dir.parent / "rte"), "validation")
    assert len(rte) == 277 and rte.texts_b is not None and len(rte.texts_b) == 277


def test_csv_and_parquet_equal_jsonl(tmp_path: Path, sst2_dir: Path) -> None:
    rows = [json.loads(line) for line in (sst2_dir / "validation.jsonl").open()][:50]
    with (tmp_path / "validation.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    from_csv = load_split(str(tmp_path), "validation")
    from_parquet = load_split(str(tmp_path), "train")
    assert from_csv.texts_a == from_parquet.texts_a == [r["text"] for r in rows]
    assert from_csv.labels == from_parquet.labels == [r["label"] for r in rows]


def test_bad_data_is_a_one_line_user_error(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"sentence": "x", "label": 0}\n')
    with pytest.raises(UserError, match=r"'text' or 'text_a'"):
        load_split(str(tmp_path), "train")
    (tmp_path / "train.jsonl").write_text('{"text": "x", "label": "pos"}\n')
    with pytest.raises(UserError, match="integer label"):
        load_split(str(tmp_path), "train")
    with pytest.raises(UserError, match=r"no validation\.jsonl"):
        load_split(str(tmp_path), "validation")
    with pytest.raises(UserError, match="does not exist"):
        load_split(str(tmp_path / "missing"), "train")


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_every_sample_assigned_exactly_once(kind: str, sst2_dir: Path) -> None:
    labels = load_split(str(sst2_dir), "validation").labels
    parts = partition(labels, PartitionSpec(kind=kind, num_clients=7, alpha=0.5, seed=3))
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(labels)))
    assert parts == partition(labels, PartitionSpec(kind=kind, num_clients=7, alpha=0.5, seed=3))


def _mean_skew(labels: list, alpha: float) -> float:
    """Mean over clients of the largest class share: 1/classes when balanced, 1 when pure."""
    parts = partition(labels, PartitionSpec(kind="dirichlet", num_clients=10, alpha=alpha, seed=0))
    counts = np.array(class_counts(labels, parts, 4), dtype=float)
    sizes = counts.sum(1)
    return float((counts.max(1)[sizes > 0] / sizes[sizes > 0]).mean())


def test_dirichlet_skew_grows_as_alpha_shrinks(sst2_dir: Path) -> None:
    labels = load_split(str(sst2_dir.parent / "ag_news"), "test").labels
    skews = [_mean_skew(labels, alpha) for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.3 and skews[2] > 0.7


def test_shards_give_few_classes_per_client(sst2_dir: Path) -> None:
    labels = load_split(str(sst2_dir.parent / "ag_news"), "test").labels
    parts = partition(labels, PartitionSpec(kind="shards", num_clients=8, shards_per_client=1))
    counts = class_counts(labels, parts, 4)
    assert all(sum(1 for c in row if c) <= 2 for row in counts)


def test_client_shard_matches_partition(sst2_dir: Path) -> None:
    dataset = load_split(str(sst2_dir), "validation")
    spec = PartitionSpec(kind="iid", num_clients=4, seed=1)
    shard = client_shard(dataset, spec, 2)
    assert shard.labels == [dataset.labels[i] for i in partition(dataset.labels, spec)[2]]
    with pytest.raises(UserError, match="client index"):
        client_shard(dataset, spec, 4)


def test_the_tests_datasets_ship_with_the_repository(sst2_dir: Path) -> None:
    """A fresh clone has no ../shared: the samples the tests load are in the repository, small,
    and each README names its source, licence and how it was drawn."""
    samples = sst2_dir.parent
    repo_root = Path(__file__).resolve().parent.parent
    assert repo_root in samples.resolve().parents
    files = [path for path in samples.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 1_500_000
    for name in ("sst2", "rte", "ag_news"):
        readme = (samples / name / "README.md").read_text()
        assert "Source" in readme and "Licence" in readme and "rows" in readme, name
        assert (samples / name / "labels.json").exists()
