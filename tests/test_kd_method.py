"""The `kd` method's pieces: the kd_proxy blob (dense or sparse consensus), the empty global state,
the device's proxy rows (classifier texts or instruction rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from jetfed.edge.distillation import texts_digest
from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.instructions import InstructionSet
from jetfed.edge.methods.base import get_method
from jetfed.edge.methods.kd import KdMethod, ProxyRound, proxy_rows
from jetfed.edge.tensor_codec import decode_tensors, encode_tensors
from jetfed.edge.topk import SparseLogProbs, sparse_mixture, top_k
from jetfed.edge.wire import ModelRef

REF = ModelRef(name_or_path="minilm", num_labels=2)


def write_split(folder: Path, texts: list[str], causal: bool = False) -> Path:
    """A train split of classifier rows, or of instruction rows (prompt + response)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        json.dumps(
            {"prompt": text, "response": "yes"} if causal else {"text": text, "label": i % 2}
        )
        for i, text in enumerate(texts)
    ]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_proxy_round_survives_the_wire_with_fp16_consensus() -> None:
    consensus = torch.tensor([[-0.5, -1.25], [-3.0, 0.0], [-0.125, -2.0]])
    blob = ProxyRound([4, 9, 17], b"\x07" * 32, consensus).encode()
    decoded = ProxyRound.decode(blob, num_classes=2)
    assert decoded.indices == [4, 9, 17] and decoded.texts_sha256 == b"\x07" * 32
    assert decoded.consensus is not None and torch.equal(decoded.consensus, consensus)
    first_round = ProxyRound.decode(ProxyRound([1, 2], b"\x00" * 32).encode(), num_classes=2)
    assert first_round.consensus is None
    # indices int32 + digest + fp16 consensus, plus a small JSON header
    assert len(blob) < 3 * 4 + 32 + 3 * 2 * 2 + 300


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"texts_sha256": torch.zeros(32, dtype=torch.uint8)}, "'indices'"),
        ({"indices": torch.zeros(2, dtype=torch.int64)}, "'indices'"),
        ({"indices": torch.zeros(2, dtype=torch.int32)}, "'texts_sha256'"),
        (
            {
                "indices": torch.zeros(2, dtype=torch.int32),
                "texts_sha256": torch.zeros(32, dtype=torch.uint8),
                "consensus": torch.zeros(3, 2, dtype=torch.float16),
            },
            "consensus shape",
        ),
        (
            {
                "indices": torch.zeros(1, dtype=torch.int32),
                "texts_sha256": torch.zeros(32, dtype=torch.uint8),
                "consensus": torch.tensor([[float("nan"), 0.0]], dtype=torch.float16),
            },
            "NaN",
        ),
    ],
)
def test_malformed_proxy_blob_is_a_protocol_error(
    tensors: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        ProxyRound.decode(bytes(save(tensors)), num_classes=2)
    with pytest.raises(ProtocolError, match="safetensors"):
        ProxyRound.decode(b"not safetensors", num_classes=2)


def test_nothing_is_federated_and_the_empty_global_state_is_a_valid_blob() -> None:
    method = get_method("kd")({"proxy_size": 8}, REF)
    assert isinstance(method, KdMethod) and method.strategy == "kd"
    state = method.initial_state(seed=0).global_state
    assert state == {} and method.get_state(object()) == {}
    assert decode_tensors(encode_tensors(state), expected={}) == {}


def test_settings_are_validated_with_the_field_name() -> None:
    with pytest.raises(UserError, match=r"method\.temperature"):
        KdMethod({"temperature": 0}, REF)
    with pytest.raises(UserError, match=r"method\.proxy_sise"):
        KdMethod({"proxy_sise": 64}, REF)


@pytest.mark.parametrize("causal", [False, True])
def test_device_reads_the_named_rows_and_refuses_other_data(tmp_path: Path, causal: bool) -> None:
    """The proxy rows by index, checked by digest: a device whose texts differ (a classifier's
    texts, or an instruction row's prompt) is refused with one line."""
    texts = [f"sentence number {i}" for i in range(10)]
    mine = write_split(tmp_path / "same", texts, causal)
    coordinator_rows = proxy_rows(str(mine), "train", [2, 5, 7], causal)
    proxy = ProxyRound([2, 5, 7], texts_digest(coordinator_rows))
    method = KdMethod({}, REF)
    rows = method.proxy_set(str(mine), proxy, causal)
    if isinstance(rows, InstructionSet):
        assert rows.prompts == [texts[2], texts[5], texts[7]]
    else:
        assert rows.texts_a == [texts[2], texts[5], texts[7]] and rows.labels == [0, 1, 2]
    other = write_split(tmp_path / "other", [t.upper() for t in texts], causal)
    with pytest.raises(UserError, match="differ from the coordinator's") as refused:
        KdMethod({}, REF).proxy_set(str(other), proxy, causal)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="has 10 rows"):
        KdMethod({}, REF).proxy_set(str(mine), ProxyRound([3, 12], proxy.texts_sha256), causal)
    with pytest.raises(UserError, match="--data"):
        KdMethod({}, REF).proxy_set(None, proxy, causal)


def test_a_sparse_consensus_survives_the_wire_and_a_bad_one_is_refused() -> None:
    """A causal LM's consensus (CSR: union support + tail) in the kd_proxy blob, fp16 values and
    uint16 indices, checked against the device's vocabulary."""
    vocab, generator = 50, torch.Generator().manual_seed(0)
    parts = [top_k(torch.randn(4, vocab, generator=generator), 3, 2.0) for _ in range(2)]
    consensus = sparse_mixture(parts, [1.0, 2.0])
    blob = ProxyRound([1, 3], b"\x01" * 32, consensus).encode()
    decoded = ProxyRound.decode(blob, num_classes=1, vocab=vocab).consensus
    assert isinstance(decoded, SparseLogProbs)
    assert torch.equal(decoded.indices, consensus.indices)
    assert torch.equal(decoded.offsets, consensus.offsets)
    assert torch.allclose(decoded.logprobs, consensus.logprobs, atol=1e-2, rtol=1e-3)
    with pytest.raises(ProtocolError, match="outside") as refused:
        ProxyRound.decode(blob, num_classes=1, vocab=int(consensus.indices.max()))
    assert refused.value.code == "index_out_of_range"
    with pytest.raises(ProtocolError, match="sparse consensus for a classifier"):
        ProxyRound.decode(blob, num_classes=2)
    dense = ProxyRound([1, 3], b"\x01" * 32, torch.zeros(2, 2)).encode()
    with pytest.raises(ProtocolError, match="classifier's consensus for a causal LM"):
        ProxyRound.decode(dense, num_classes=1, vocab=vocab)
