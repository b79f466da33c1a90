"""Split learning: gradients equal the unsplit model's (MiniLM, other encoder families, SmolLM2
and a tiny Gemma 3 decoder); the server's retry cache and lanes.

The math runs in-process through the same objects the method and the strategy use
(`SplitBatchLoss` on the device, `SplitServer.handle` on the coordinator, the safetensors
messages between them); only MQTT is left out (tests/test_split_integration.py has it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest
import torch

from jetfed.coordinator.strategies.split import SplitServer
from jetfed.edge.causal_lm import response_loss
from jetfed.edge.data import load_split
from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.exchange import Exchange
from jetfed.edge.instructions import instruction_batch, load_instructions, row_tokens
from jetfed.edge.methods.split import (
    ExchangeTransport,
    SplitBatchLoss,
    SplitHeader,
    SplitMethod,
    decode_split_message,
    encode_split_message,
)
from jetfed.edge.models import is_causal_lm, load_tokenizer
from jetfed.edge.split_layout import SplitLayout
from jetfed.edge.topics import Topics
from jetfed.edge.train import tokenize_batch
from jetfed.edge.transfer import TransferTimeout
from jetfed.edge.wire import ModelRef
from tests.conftest import DATASETS
from tests.llm import SMOLLM2, require_smollm2

MAX_LENGTH = 48
LLM_LAYERS = 3
LLM = SMOLLM2.model_copy(update={"max_length": MAX_LENGTH, "num_hidden_layers": LLM_LAYERS})


class LocalTransport:
    """The device's request → the server's `handle`, as bytes, without a broker."""

    def __init__(self, server: SplitServer, device_id: str = "dev-0") -> None:
        self.server = server
        self.device_id = device_id

    def request(
        self, header: SplitHeader, tensors: Mapping[str, torch.Tensor], reply_kind: str
    ) -> Tuple[SplitHeader, Dict[str, torch.Tensor]]:
        payload = encode_split_message(header, tensors)
        reply = self.server.handle(self.device_id, header.kind, payload)
        assert reply is not None and reply[0] == reply_kind
        return decode_split_message(reply[1])


def _method(
    cut_layer: int, u_shaped: bool, ref: Optional[ModelRef] = None, **extra: Any
) -> SplitMethod:
    settings = {"cut_layer": cut_layer, "u_shaped": u_shaped, "server_max_grad_norm": None}
    settings.update(extra)
    ref = ref or ModelRef(name_or_path="minilm", num_labels=2, max_length=MAX_LENGTH)
    return SplitMethod(settings, ref)


def _without_dropout_all_trainable(model: Any) -> Any:
    """Every parameter trainable, LoRA B non-zero (so A's gradient is too), no dropout."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        param.requires_grad_(True)
        if "lora_B" in name:
            with torch.no_grad():
                param.normal_(0, 0.02)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture(scope="module")
def lora_model(minilm_path: str) -> Any:
    """MiniLM with LoRA as the method builds it (only LoRA and the head trainable)."""
    return _method(1, False).build(None, seed=0)


@pytest.fixture(scope="module")
def minilm_model(lora_model: Any) -> Any:
    return _without_dropout_all_trainable(copy.deepcopy(lora_model))


@pytest.fixture(scope="module")
def batch(minilm_path: str, sst2_dir: Path) -> Dict[str, torch.Tensor]:
    from jetfed.edge.models import load_tokenizer

    dataset = load_split(str(sst2_dir), "validation")
    tokenizer = load_tokenizer(ModelRef(name_or_path="minilm", num_labels=2))
    return dict(tokenize_batch(tokenizer, dataset, list(range(6)), MAX_LENGTH, "cpu"))


def _split_gradients(
    model: Any, settings: Any, batch: Dict[str, torch.Tensor], dtype: str = "fp32"
) -> Tuple[float, Dict[str, torch.Tensor]]:
    """One batch through device copy (what is above the cut freed, as on a device) + server
    copy; every parameter's gradient, by name."""
    device_model, server_model = copy.deepcopy(model), copy.deepcopy(model)
    server = SplitServer(server_model, settings, MAX_LENGTH, "cpu")
    server.begin_round(0)
    layout = SplitLayout.of(device_model, settings.cut_layer, settings.u_shaped)
    layout.release_server_layers()
    loss_fn = SplitBatchLoss(layout, LocalTransport(server), 0, dtype)
    loss = loss_fn(device_model, batch)
    loss.backward()
    device_ids = layout.device_ids()
    server_ids = server.layout.server_ids()
    on_device_model = dict(device_model.named_parameters())
    grads: Dict[str, torch.Tensor] = {}
    for name, s_param in server_model.named_parameters():
        d_param = on_device_model.get(name)
        on_device, on_server = (
            d_param is not None and id(d_param) in device_ids,
            id(s_param) in server_ids,
        )
        assert on_device != on_server, f"{name} belongs to exactly one side"
        grad = d_param.grad if d_param is not None and on_device else s_param.grad
        if grad is not None:
            grads[name] = grad
    assert loss_fn.traffic.batches == 1
    return float(loss.detach()), grads


def _reference_gradients(
    model: Any, batch: Dict[str, torch.Tensor]
) -> Tuple[float, Dict[str, Any]]:
    reference = copy.deepcopy(model)
    reference.train()
    loss = response_loss(reference, batch) if is_causal_lm(reference) else reference(**batch).loss
    loss.backward()
    return float(loss.detach()), {
        name: p.grad for name, p in reference.named_parameters() if p.grad is not None
    }


@pytest.fixture(scope="module")
def minilm_reference(
    minilm_model: Any, batch: Dict[str, torch.Tensor]
) -> Tuple[float, Dict[str, Any]]:
    """The unsplit model's loss and gradients on the batch (computed once)."""
    return _reference_gradients(minilm_model, batch)


@pytest.mark.parametrize("u_shaped", [False, True], ids=["labels-shared", "u-shaped"])
@pytest.mark.parametrize("cut_layer", [1, 5], ids=["k=1", "k=L-1"])
def test_split_gradients_equal_unsplit(
    minilm_model: Any,
    minilm_reference: Tuple[float, Dict[str, Any]],
    batch: Dict[str, torch.Tensor],
    cut_layer: int,
    u_shaped: bool,
) -> None:
    settings = _method(cut_layer, u_shaped).config
    ref_loss, expected = minilm_reference
    split_loss, actual = _split_gradients(minilm_model, settings, batch)
    assert split_loss == pytest.approx(ref_loss, abs=1e-6)
    assert set(actual) == set(expected)
    assert len(expected) > 100  # all base weights, LoRA factors and the head
    worst = max(float((actual[n] - expected[n]).abs().max()) for n in expected)
    assert worst <= 1e-5, worst


def _assert_close_in_half_precision(
    reference: Tuple[float, Dict[str, Any]], split: Tuple[float, Dict[str, Any]], lora_a: str
) -> None:
    (ref_loss, expected), (split_loss, actual) = reference, split
    assert split_loss == pytest.approx(ref_loss, rel=0.02)
    name = next(n for n in expected if lora_a in n)
    cosine = torch.nn.functional.cosine_similarity(
        actual[name].flatten(), expected[name].flatten(), dim=0
    )
    assert float(cosine) > 0.99


def test_half_precision_activations_stay_close(
    minilm_model: Any,
    minilm_reference: Tuple[float, Dict[str, Any]],
    batch: Dict[str, torch.Tensor],
) -> None:
    settings = _method(3, False, activation_dtype="bf16").config
    split = _split_gradients(minilm_model, settings, batch, dtype="bf16")
    _assert_close_in_half_precision(minilm_reference, split, "layer.0.attention.self.query.lora_A")


def _tiny(model_type: str) -> Any:
    """A randomly initialised small encoder of another family (nothing downloaded)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        model_type,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("model_type", ["roberta", "deberta-v2", "electra"])
@pytest.mark.parametrize("u_shaped", [False, True], ids=["labels-shared", "u-shaped"])
def test_other_encoder_families_cut_exactly(model_type: str, u_shaped: bool) -> None:
    model = _tiny(model_type)
    for name, param in model.named_parameters():
        param.requires_grad_("rel_embeddings" not in name and "encoder.LayerNorm" not in name)
    torch.manual_seed(2)
    ids = torch.randint(5, 99, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}
    settings = _method(2, u_shaped).config
    ref_loss, expected = _reference_gradients(model, batch)
    split_loss, actual = _split_gradients(model, settings, batch)
    assert split_loss == pytest.approx(ref_loss, abs=1e-6)
    assert set(actual) == set(expected)
    worst = max(float((actual[n] - expected[n]).abs().max()) for n in expected)
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def smollm2_lora() -> Any:
    """SmolLM2 (3 of its 30 layers) with LoRA as the method builds it."""
    require_smollm2()
    return _method(1, False, LLM).build(None, seed=0)


def _decoder_trainable(model: Any, tied: bool) -> Any:
    """LoRA (B non-zero, so A's gradient is too) and every RMSNorm trainable; the tied
    embedding = lm_head too when `tied` (U-shaped: both its uses are on the device)."""
    model = copy.deepcopy(model)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.normal_(0, 0.02)
        param.requires_grad_("lora_" in name or "norm" in name or (tied and "embed" in name))
    return model


@pytest.fixture(scope="module")
def llm_batch() -> Dict[str, torch.Tensor]:
    """SST-2 as generation in 48 tokens: a row whose prompt is cut from the left, a shorter
    row right-padded and one left-padded (each side rebuilds positions from the mask)."""
    require_smollm2()
    data = load_instructions(str(DATASETS / "sst2"), "validation")
    tokenizer = load_tokenizer(LLM)
    rows = [2, 1, 6]
    full = [sum(map(len, row_tokens(tokenizer, data, i, 1000))) for i in rows]
    assert full[0] > MAX_LENGTH > full[1] > full[2]
    batch = dict(instruction_batch(tokenizer, data, rows, MAX_LENGTH, "cpu"))
    shift = MAX_LENGTH - full[2]
    for name in batch:
        batch[name][2] = batch[name][2].roll(shift)
    assert batch["attention_mask"][2, 0] == 0 and batch["attention_mask"][1, -1] == 0
    return batch


@pytest.mark.parametrize("u_shaped", [False, True], ids=["labels-shared", "u-shaped"])
def test_smollm2_split_gradients_equal_unsplit(
    smollm2_lora: Any, llm_batch: Dict[str, torch.Tensor], u_shaped: bool
) -> None:
    """Real SmolLM2 weights, cut at k = 1 and k = L − 1; loss on response tokens only."""
    model = _decoder_trainable(smollm2_lora, tied=u_shaped)
    ref_loss, expected = _reference_gradients(model, llm_batch)
    assert any("embed" in n for n in expected) == u_shaped
    for cut_layer in (1, LLM_LAYERS - 1):
        settings = _method(cut_layer, u_shaped, LLM).config
        split_loss, actual = _split_gradients(model, settings, llm_batch)
        assert split_loss == pytest.approx(ref_loss, abs=1e-5)
        assert set(actual) == set(expected)
        worst = max(float((actual[n] - expected[n]).abs().max()) for n in expected)
        assert worst <= 1e-5, (cut_layer, worst)


def test_smollm2_fp16_activations_stay_close(
    smollm2_lora: Any, llm_batch: Dict[str, torch.Tensor]
) -> None:
    model = _decoder_trainable(smollm2_lora, tied=False)
    settings = _method(1, False, LLM, activation_dtype="fp16").config
    split = _split_gradients(model, settings, llm_batch, dtype="fp16")
    reference = _reference_gradients(model, llm_batch)
    _assert_close_in_half_precision(reference, split, "layers.0.self_attn.q_proj.lora_A")


def _tiny_gemma3(tied: bool) -> Any:
    """A randomly initialised 4-layer Gemma 3 with sliding and full attention layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=37,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"] * 2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("u_shaped", [False, True], ids=["labels-shared", "u-shaped"])
def test_gemma3_cuts_exactly_with_its_layer_kinds(u_shaped: bool, tied: bool) -> None:
    """Untied and labels shared, the device frees the lm_head; the server trains it."""
    model = _tiny_gemma3(tied)
    for name, param in model.named_parameters():
        param.requires_grad_(u_shaped or not tied or "embed" not in name)
    torch.manual_seed(2)
    ids = torch.randint(3, 99, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 5:] = ids[:, 5:]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref_loss, expected = _reference_gradients(model, batch)
    split_loss, actual = _split_gradients(model, _method(1, u_shaped).config, batch)
    assert split_loss == pytest.approx(ref_loss, abs=1e-6)
    device = copy.deepcopy(model)
    SplitLayout.of(device, 1, u_shaped).release_server_layers()
    held = [name for name, _ in device.named_parameters()]
    assert not any(".layers.1." in name for name in held)
    assert any("lm_head" in name for name in held) == (u_shaped and not tied)
    assert set(actual) == set(expected)
    worst = max(float((actual[n] - expected[n]).abs().max()) for n in expected)
    assert worst <= 1e-5, worst


def test_a_trained_tied_head_needs_u_shaped(smollm2_lora: Any) -> None:
    model = _decoder_trainable(smollm2_lora, tied=True)
    with pytest.raises(UserError, match="tied to the device's embeddings and trained"):
        SplitLayout.of(model, 1, False)


def test_cut_layer_out_of_range_is_a_user_error(lora_model: Any) -> None:
    with pytest.raises(UserError, match="cut_layer must be between 1 and 5"):
        SplitLayout.of(lora_model, 6, False)


def _fwd(server: SplitServer, step: int, session: str = "0123456789abcdef") -> bytes:
    header = SplitHeader(kind="fwd", session=session, round_index=0, step=step)
    tensors = {
        "hidden": torch.randn(2, 5, 384),
        "attention_mask": torch.ones(2, 5, dtype=torch.int64),
        "labels": torch.tensor([0, 1]),
    }
    return encode_split_message(header, tensors)


def test_server_replays_a_retried_batch_without_stepping_twice(lora_model: Any) -> None:
    server = SplitServer(copy.deepcopy(lora_model), _method(2, False).config, MAX_LENGTH, "cpu")
    server.begin_round(0)
    request = _fwd(server, 0)
    first = server.handle("dev-0", "fwd", request)
    weights = server.state()
    again = server.handle("dev-0", "fwd", request)
    assert first is not None and again == first
    assert all(torch.equal(weights[n], t) for n, t in server.state().items())
    assert server.stats.batches == 1 and server.stats.replays == 1
    assert server.handle("dev-1", "fwd", _fwd(server, 0)) is not None  # other lanes go on
    server.handle("dev-0", "fwd", _fwd(server, 1))
    assert server.handle("dev-0", "fwd", request) is None  # stale: older than the last one
    server.begin_round(1)
    assert server.handle("dev-0", "fwd", _fwd(server, 2)) is None  # round 0 is over
    assert server.stats.dropped == 1


def test_server_refuses_malformed_messages(lora_model: Any) -> None:
    server = SplitServer(copy.deepcopy(lora_model), _method(2, False).config, MAX_LENGTH, "cpu")
    server.begin_round(0)
    header = SplitHeader(kind="fwd", session="0123456789abcdef", round_index=0, step=0)
    bad_labels = {
        "hidden": torch.randn(2, 5, 384),
        "attention_mask": torch.ones(2, 5, dtype=torch.int64),
        "labels": torch.tensor([0, 7]),
    }
    wrong_width = dict(bad_labels, hidden=torch.randn(2, 5, 10), labels=torch.tensor([0, 1]))
    nan = dict(wrong_width, hidden=torch.full((2, 5, 384), float("nan")))
    for tensors, reason in [
        (bad_labels, "labels outside"),
        (wrong_width, "split tensor hidden"),
        (nan, "NaN"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            server.handle("dev-0", "fwd", encode_split_message(header, tensors))
    with pytest.raises(ProtocolError, match="not a split message"):
        server.handle("dev-0", "fwd", b"\x08" + b"\x00" * 7 + b"{garbage")
    with pytest.raises(ProtocolError, match="kind"):
        server.handle("dev-0", "bwd", _fwd(server, 0))


def test_server_refuses_malformed_token_labels(smollm2_lora: Any) -> None:
    server = SplitServer(smollm2_lora, _method(1, False, LLM).config, MAX_LENGTH, "cpu")
    server.begin_round(0)
    header = SplitHeader(kind="fwd", session="0123456789abcdef", round_index=0, step=0)
    good = {
        "hidden": torch.randn(2, 5, 576),
        "attention_mask": torch.ones(2, 5, dtype=torch.int64),
        "labels": torch.tensor([[-100, -100, 7, 8, 9]] * 2),
    }
    for labels, reason in [
        (torch.tensor([[-100, -100, 7, 8, 49152]] * 2), "labels outside"),
        (torch.tensor([[-100, -100, 7, 8, -5]] * 2), "labels outside"),
        (torch.tensor([[5, -100, -100, -100, -100]] * 2), "no response token"),
        (torch.tensor([0, 1]), "split tensor labels"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            server.handle("dev-0", "fwd", encode_split_message(header, dict(good, labels=labels)))
    assert server.stats.batches == 0


def test_per_device_copies_are_averaged_by_samples(lora_model: Any) -> None:
    settings = _method(4, False, server_copies="per_device").config
    server = SplitServer(copy.deepcopy(lora_model), settings, MAX_LENGTH, "cpu")
    server.begin_round(0)
    start = server.state()
    server.handle("dev-0", "fwd", _fwd(server, 0))
    assert all(torch.equal(start[n], t) for n, t in server.state().items())  # swapped back
    server.handle("dev-1", "fwd", _fwd(server, 0))
    copies = [server.lanes[d].state for d in ("dev-0", "dev-1")]
    server.end_round(["dev-0", "dev-1"])
    name = next(n for n in start if "classifier.modules_to_save" in n)
    assert copies[0] is not None and copies[1] is not None
    expected = (copies[0][name] + copies[1][name]) / 2
    assert torch.allclose(server.state()[name], expected, atol=1e-7)
    assert not torch.equal(server.state()[name], start[name])


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_device_resends_a_lost_batch_and_the_server_answers_once(
    lora_model: Any, lost: str
) -> None:
    """The exchange loses one message; the device re-sends the same bytes after its timeout."""
    server = SplitServer(copy.deepcopy(lora_model), _method(2, False).config, MAX_LENGTH, "cpu")
    server.begin_round(0)
    topics = Topics("exp")
    sent: List[str] = []

    def publish(topic: str, payload: bytes) -> int:
        sent.append(topic)
        if lost == "request" and len(sent) == 1:
            return len(payload)
        reply = server.handle("dev-0", topic.rsplit("/", 1)[1], payload)
        if reply is not None and not (lost == "reply" and len(sent) == 1):
            exchange.deliver(exchange.down_prefix + reply[0], reply[1])
        return len(payload)

    exchange = Exchange(topics, "dev-0", publish)
    transport = ExchangeTransport(exchange, timeout_s=0.3, max_retries=2)
    header, tensors = decode_split_message(_fwd(server, 0))
    reply_header, reply = transport.request(header, tensors, "grad")
    assert reply_header.step == 0 and reply["grad"].shape == (2, 5, 384)
    assert transport.retries == 1 and len(sent) == 2
    assert server.stats.batches == 1
    assert server.stats.replays == (1 if lost == "reply" else 0)


def test_device_gives_up_after_its_retries(lora_model: Any) -> None:
    exchange = Exchange(Topics("exp"), "dev-0", lambda topic, payload: len(payload))
    transport = ExchangeTransport(exchange, timeout_s=0.05, max_retries=2)
    header = SplitHeader(kind="fwd", session="0123456789abcdef", round_index=0, step=4)
    with pytest.raises(TransferTimeout, match="no grad for step 4 after 3 tries"):
        transport.request(header, {"hidden": torch.zeros(1, 2, 384)}, "grad")
