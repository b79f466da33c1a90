"""Local text-classification data and deterministic client partitioners.

A dataset is a folder with `{split}.jsonl|.csv|.parquet` (rows with `text`, or `text_a`/`text_b`,
plus an integer `label`), a single such file, or `hf:NAME[:CONFIG]` for a Hugging Face dataset.
Partitions depend only on (labels, spec), so every simulated device derives its own shard
without any data crossing the wire.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from jetfed.edge.errors import UserError
from jetfed.edge.wire import PartitionSpec

SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass
class TextDataset:
    """Parallel columns of one split; `texts_b` is set for sentence-pair tasks."""

    texts_a: List[str]
    labels: List[int]
    texts_b: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        return TextDataset(
            texts_a=[self.texts_a[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            texts_b=None if self.texts_b is None else [self.texts_b[i] for i in indices],
        )

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1 if self.labels else 0


def read_rows(path: Path) -> Iterable[Dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{line_number}: not valid JSON") from None
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        raise UserError(f"{path}: unsupported data file, use one of {', '.join(SUFFIXES)}")


def _rows_to_dataset(rows: Iterable[Dict[str, Any]], origin: str) -> TextDataset:
    texts_a: List[str] = []
    texts_b: List[str] = []
    labels: List[int] = []
    pair: Optional[bool] = None
    for number, row in enumerate(rows, 1):
        if pair is None:
            pair = "text_a" in row
            if not pair and "text" not in row:
                raise UserError(
                    f"{origin}: rows need 'text' or 'text_a'/'text_b', got {sorted(row)}"
                )
        try:
            labels.append(int(row["label"]))
            texts_a.append(str(row["text_a"] if pair else row["text"]))
            if pair:
                texts_b.append(str(row["text_b"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{origin}: row {number} lacks a text field or an integer label"
            ) from None
    if not labels:
        raise UserError(f"{origin}: no rows")
    if min(labels) < 0:
        raise UserError(f"{origin}: labels must be integers >= 0")
    return TextDataset(texts_a=texts_a, labels=labels, texts_b=texts_b if pair else None)


def split_file(folder: Path, split: str) -> Path:
    for suffix in SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    raise UserError(f"{folder}: no {split}.jsonl, {split}.csv or {split}.parquet")


def check_labels(labels: Sequence[int], num_labels: Optional[int], source: str) -> None:
    """A device's labels must be classes of the experiment's model: a label beyond its head
    would fail deep inside the loss, as an index error, on the device only."""
    if num_labels is None or not labels:
        return
    low, high = min(labels), max(labels)
    if low < 0 or high >= num_labels:
        raise UserError(
            f"--data {source}: labels {low}..{high} do not fit the experiment's model "
            f"(num_labels={num_labels}); give this device data of the experiment's task"
        )


def load_task_split(source: str, split: str, causal: bool) -> Any:
    """A split as the model's kind needs it: instruction data (`jetfed.edge.instructions`) for
    causal LMs, a TextDataset for classifiers."""
    if causal:
        from jetfed.edge.instructions import load_instructions

        return load_instructions(source, split)
    return load_split(source, split)


def load_split(source: str, split: str) -> TextDataset:
    """Load one split of a local folder/file or an `hf:` dataset."""
    if source.startswith("hf:"):
        return _load_hf(source[3:], split)
    path = Path(source).expanduser()
    if path.is_dir():
        path = split_file(path, split)
    elif not path.exists():
        raise UserError(f"data path {source!r} does not exist")
    return _rows_to_dataset(read_rows(path), str(path))


def _load_hf(name: str, split: str) -> TextDataset:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: datasets need the `datasets` package: pip install datasets") from None
    dataset_name, _, config = name.partition(":")
    table = datasets.load_dataset(dataset_name, config or None, split=split)
    rows = (
        {
            "text": row.get("text", row.get("sentence")),
            "text_a": row.get("text_a", row.get("sentence1")),
            "text_b": row.get("text_b", row.get("sentence2")),
            "label": row["label"],
        }
        for row in table
    )
    cleaned = ({k: v for k, v in row.items() if v is not None} for row in rows)
    return _rows_to_dataset(cleaned, f"hf:{name}[{split}]")


def has_split(source: str, split: str) -> bool:
    if source.startswith("hf:"):
        return True
    path = Path(source)
    return path.is_dir() and any((path / f"{split}{s}").exists() for s in SUFFIXES)


# --------------------------------------------------------------------------- partitioners


def partition(labels: Sequence[int], spec: PartitionSpec) -> List[List[int]]:
    """Sample indices per client; every sample goes to exactly one client (`none`: all to one)."""
    n = len(labels)
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "none":
        return [list(range(n))]
    if spec.kind == "iid":
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, spec.num_clients)]
    if spec.kind == "dirichlet":
        return _dirichlet(
            np.asarray(labels), spec.num_clients, spec.alpha, rng, spec.min_shard_size
        )
    return _shards(np.asarray(labels), spec.num_clients, spec.shards_per_client, rng)


def _dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_shard_size: int = 0,
) -> List[List[int]]:
    """Dirichlet(alpha) shards with a floor: each client first gets `min_shard_size` samples
    drawn uniformly at random, then the rest is split by Dirichlet(alpha) per class. At small
    alpha a plain draw leaves some clients a handful of samples (too few for a local batch),
    and redrawing until none does rarely succeeds with few classes; the floor changes the skew
    of at most min_shard_size × clients samples. 0: the plain draw, as before."""
    if min_shard_size == 0:
        return _dirichlet_draw(labels, np.arange(len(labels)), num_clients, alpha, rng)
    reserved = min_shard_size * num_clients
    if reserved > len(labels):
        raise UserError(
            f"data.partition.min_shard_size={min_shard_size} × {num_clients} clients exceeds "
            f"the {len(labels)} samples"
        )
    order = rng.permutation(len(labels))
    floors = np.split(order[:reserved], num_clients)
    rest = _dirichlet_draw(labels, np.sort(order[reserved:]), num_clients, alpha, rng)
    return [sorted(floor.tolist() + part) for floor, part in zip(floors, rest)]


def _dirichlet_draw(
    labels: np.ndarray,
    indices: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> List[List[int]]:
    """Per class, split its samples among `indices` across clients with Dirichlet(alpha)
    proportions."""
    clients: List[List[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(indices[labels[indices] == label])
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            clients[client].extend(part.tolist())
    return [sorted(shard) for shard in clients]


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> List[List[int]]:
    """Sort by label, cut into equal shards, deal each client `shards_per_client` of them."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_clients * shards_per_client)
    dealt = rng.permutation(len(shards))
    return [
        sorted(
            np.concatenate([shards[s] for s in dealt[c::num_clients]]).tolist()
            if len(dealt[c::num_clients])
            else []
        )
        for c in range(num_clients)
    ]


def client_shard(dataset: TextDataset, spec: PartitionSpec, client_index: int) -> TextDataset:
    if not 0 <= client_index < spec.num_clients and spec.kind != "none":
        raise UserError(f"client index {client_index} outside 0..{spec.num_clients - 1}")
    parts = partition(dataset.labels, spec)
    return dataset.subset(parts[0 if spec.kind == "none" else client_index])


def class_counts(
    labels: Sequence[int], parts: List[List[int]], num_classes: int
) -> List[List[int]]:
    counts = []
    for indices in parts:
        row = [0] * num_classes
        for i in indices:
            row[labels[i]] += 1
        counts.append(row)
    return counts
