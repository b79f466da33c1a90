"""Where split learning cuts a model, and the segments either side runs.

Each segment runs through the model's own Hugging Face forward with the other parts swapped out
for the call (a slice of the layer list, an identity for the embeddings or the final norm), so
masks, positions, poolers and heads stay exactly HF's and no copy of a forward lives here.

- Encoder classifiers (`EncoderLayout`): `<backbone>.embeddings` + `<backbone>.encoder.layer[i]`
  + a head (pooler/classifier): BERT, MiniLM, RoBERTa, ELECTRA, DeBERTa-v2/v3.
- Decoder LLMs (`DecoderLayout`): `get_decoder()` with `embed_tokens`, a `layers` list and a final
  `norm`, + the lm_head (Llama/SmolLM2, Qwen2, Mistral, Gemma 3 ...). Rotary positions and the
  causal mask are built inside the decoder's forward from `attention_mask` and `position_ids`,
  so each side rebuilds them: positions count the real tokens (`causal_lm.positions`), the
  same rule as unsplit training. Nothing else crosses the cut: no KV cache (`use_cache=False`).
  Per-layer attention kinds (`config.layer_types`, Gemma 3's sliding/full) are sliced with the
  layers. The loss is the response-token cross-entropy with the lm_head applied only at
  response positions (`causal_lm.head_loss`). Label sharing: the server holds layers [k, L),
  the final norm and the lm_head; U-shaped: the norm and the lm_head stay on the device (with
  tied embeddings it is the device's own embedding matrix). Models whose decoder holds more
  than embeddings, layers and norm (GPT-2's learned positions) are refused.

Parameters are told apart by identity: a tied lm_head is the embedding and belongs to the
device; in label-sharing mode it must then stay frozen (the server cannot step the device's
tensor).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from jetfed.edge.errors import UserError

if TYPE_CHECKING:
    import torch

EMBEDDING_PROJECTIONS = ("embeddings_project",)
"""Backbone modules applied right after the embeddings (ELECTRA): part of the device's bottom."""


def _ids(modules: List[Any]) -> Set[int]:
    return {id(p) for module in modules for p in module.parameters()}


def _check_cut(model_config: Any, cut_layer: int) -> None:
    num_layers = int(model_config.num_hidden_layers)
    if not 1 <= cut_layer < num_layers:
        raise UserError(
            f"method.cut_layer must be between 1 and {num_layers - 1} for this "
            f"{num_layers}-layer model (got {cut_layer})"
        )


@dataclass
class SplitLayout(ABC):
    """A model cut after `cut_layer` layers: which parameters each side owns, and the four
    segments (device bottom, server middle or top + loss, device head + loss when U-shaped).

    `model` is the Hugging Face model (PEFT unwrapped); its modules are shared with the PEFT
    wrapper, so LoRA layers are active in every segment."""

    model: Any
    cut_layer: int
    u_shaped: bool

    @staticmethod
    def of(model: Any, cut_layer: int, u_shaped: bool, training: bool = True) -> SplitLayout:
        """The layout for this model's kind (decoder LLM or encoder classifier); `training`:
        also refuse trainable tensors that cannot be split (False for the memory budget's meta
        model, whose every tensor is trainable)."""
        from jetfed.edge.models import is_causal_lm

        hf = model.get_base_model() if hasattr(model, "peft_config") else model
        _check_cut(hf.config, cut_layer)
        layout_type = DecoderLayout if is_causal_lm(hf) else EncoderLayout
        layout = layout_type(hf, cut_layer, u_shaped)
        layout.check(training)
        return layout

    @property
    @abstractmethod
    def layers(self) -> List[Any]:
        """The layer list as the model holds it now (the device frees those above the cut)."""

    @abstractmethod
    def embedding_modules(self) -> List[Any]: ...

    @abstractmethod
    def head_ids(self) -> Set[int]:
        """The parameters above the last layer that the loss needs (not the embeddings)."""

    @abstractmethod
    def check(self, training: bool) -> None:
        """UserError when this model cannot be cut (or, `training`, trained as it is set)."""

    def device_ids(self) -> Set[int]:
        ids = _ids([*self.embedding_modules(), *self.layers[: self.cut_layer]])
        return ids | self.head_ids() if self.u_shaped else ids

    def server_ids(self) -> Set[int]:
        ids = _ids(self.layers[self.cut_layer :])
        return ids if self.u_shaped else ids | self.head_ids()

    @abstractmethod
    def release_server_layers(self) -> None:
        """Device: drop the layers above the cut so their memory is freed (idempotent)."""

    @abstractmethod
    def bottom(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Device: embeddings + layers [0, k) → the cut activations."""

    @abstractmethod
    def middle(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Server, U-shaped: layers [k, L) → the top activations."""

    @abstractmethod
    def top_loss(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Server, labels shared: layers [k, L) + head → the loss."""

    @abstractmethod
    def head_loss(
        self, top: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Device, U-shaped: the head on the top activations → the loss."""

    @abstractmethod
    def labels_shape(self, batch: int, length: int) -> Tuple[int, ...]: ...

    @abstractmethod
    def labels_error(self, labels: torch.Tensor) -> Optional[str]:
        """Why these labels (from the wire) are unusable, or None."""


# --------------------------------------------------------------------------- encoders


def _passthrough_embeddings() -> Any:
    import torch

    class PassthroughEmbeddings(torch.nn.Module):
        """Stands in for the embeddings when the backbone's input is already a hidden state."""

        def forward(self, *args: Any, inputs_embeds: Any = None, **kwargs: Any) -> Any:
            return inputs_embeds

    return PassthroughEmbeddings()


def _head_only_backbone(pooler: Any) -> Any:
    """Stands in for the whole backbone: the input is the top hidden state; only the pooler
    (BERT keeps it inside the backbone) still runs, so the classifier sees what it always sees."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class HeadOnlyBackbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pooler = pooler

        def forward(self, *args: Any, inputs_embeds: Any = None, **kwargs: Any) -> Any:
            pooled = self.pooler(inputs_embeds) if self.pooler is not None else None
            return BaseModelOutputWithPooling(last_hidden_state=inputs_embeds, pooler_output=pooled)

    return HeadOnlyBackbone()


@dataclass
class EncoderLayout(SplitLayout):
    """A BERT-like classifier: `<backbone>.embeddings` + `<backbone>.encoder.layer[i]` + head."""

    passthrough: Any = field(default_factory=_passthrough_embeddings)

    def check(self, training: bool) -> None:
        import torch

        backbone = self.backbone
        encoder: Any = getattr(backbone, "encoder", None)
        model_type = getattr(self.model.config, "model_type", "?")
        if getattr(backbone, "embeddings", None) is None or not isinstance(
            getattr(encoder, "layer", None), torch.nn.ModuleList
        ):
            raise UserError(
                f"method split: model type {model_type!r} is neither a BERT-like encoder "
                "(<backbone>.embeddings + <backbone>.encoder.layer) nor a causal LM"
            )
        if getattr(encoder, "conv", None) is not None:
            raise UserError(f"method split: {model_type} with conv_kernel_size > 0 cannot be cut")
        in_layers = _ids(list(encoder.layer))
        shared = [
            name
            for name, param in encoder.named_parameters()
            if training and param.requires_grad and id(param) not in in_layers
        ]
        if shared:
            raise UserError(f"method split: encoder-level tensor {shared[0]} cannot be trained")

    @property
    def backbone(self) -> Any:
        return self.model.base_model

    @property
    def layers(self) -> List[Any]:
        return list(self.backbone.encoder.layer)

    def embedding_modules(self) -> List[Any]:
        backbone = self.backbone
        extras = [getattr(backbone, name, None) for name in EMBEDDING_PROJECTIONS]
        return [backbone.embeddings, *(module for module in extras if module is not None)]

    def head_ids(self) -> Set[int]:
        """The pooler/classifier: every parameter outside the embeddings and the encoder."""
        body = _ids([*self.embedding_modules(), self.backbone.encoder])
        return {id(p) for p in self.model.parameters()} - body

    def release_server_layers(self) -> None:
        import torch

        encoder = self.backbone.encoder
        if len(encoder.layer) > self.cut_layer:
            encoder.layer = torch.nn.ModuleList(self.layers[: self.cut_layer])

    @contextlib.contextmanager
    def _segment(
        self, layers: List[Any], embeddings: bool = False, pooler: bool = True
    ) -> Iterator[None]:
        """Run the backbone with only `layers` (and without embeddings or pooler)."""
        import torch

        backbone, encoder = self.backbone, self.backbone.encoder
        swaps: Dict[str, Any] = {}
        if not embeddings:
            swaps["embeddings"] = self.passthrough
            for name in EMBEDDING_PROJECTIONS:
                if getattr(backbone, name, None) is not None:
                    swaps[name] = torch.nn.Identity()
        if not pooler and getattr(backbone, "pooler", None) is not None:
            swaps["pooler"] = None
        saved = {name: getattr(backbone, name) for name in swaps}
        saved_layers = encoder.layer
        try:
            for name, module in swaps.items():
                setattr(backbone, name, module)
            encoder.layer = torch.nn.ModuleList(layers)
            yield
        finally:
            for name, module in saved.items():
                setattr(backbone, name, module)
            encoder.layer = saved_layers

    def bottom(self, batch: Mapping[str, Any]) -> torch.Tensor:
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        with self._segment(self.layers[: self.cut_layer], embeddings=True, pooler=False):
            return self.backbone(**inputs).last_hidden_state

    def middle(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._segment(self.layers[self.cut_layer :], pooler=False):
            return self.backbone(
                inputs_embeds=hidden, attention_mask=attention_mask
            ).last_hidden_state

    def top_loss(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        with self._segment(self.layers[self.cut_layer :]):
            return self.model(
                inputs_embeds=hidden, attention_mask=attention_mask, labels=labels
            ).loss

    def head_loss(
        self, top: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        prefix = self.model.base_model_prefix
        backbone = self.backbone
        try:
            setattr(self.model, prefix, _head_only_backbone(getattr(backbone, "pooler", None)))
            return self.model(inputs_embeds=top, attention_mask=attention_mask, labels=labels).loss
        finally:
            setattr(self.model, prefix, backbone)

    def labels_shape(self, batch: int, length: int) -> Tuple[int, ...]:
        return (batch,)

    def labels_error(self, labels: torch.Tensor) -> Optional[str]:
        num_labels = int(self.model.config.num_labels)
        if bool(((labels < 0) | (labels >= num_labels)).any()):
            return f"labels outside [0, {num_labels})"
        return None


# --------------------------------------------------------------------------- decoders


@dataclass
class DecoderLayout(SplitLayout):
    """A causal LM: `get_decoder()` = embed_tokens + layers + norm, then the lm_head."""

    def check(self, training: bool) -> None:
        import torch

        decoder = self.decoder
        model_type = getattr(self.model.config, "model_type", "?")
        if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) or not hasattr(
            decoder, "norm"
        ):
            raise UserError(
                f"method split: decoder {model_type!r} has no `layers` list and final `norm` "
                "(Llama-style decoders only)"
            )
        known = _ids([decoder.get_input_embeddings(), decoder.layers, decoder.norm])
        other = [name for name, param in decoder.named_parameters() if id(param) not in known]
        if other:
            raise UserError(f"method split: decoder-level tensor {other[0]} cannot be split")
        tied = _ids([self.head]) & _ids(self.embedding_modules())
        trained = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) in tied]
        if training and trained and not self.u_shaped:
            raise UserError(
                f"method split: {trained[0]} is tied to the device's embeddings and trained: "
                "use u_shaped: true or keep it frozen"
            )

    @property
    def decoder(self) -> Any:
        return self.model.get_decoder()

    @property
    def head(self) -> Any:
        return self.model.get_output_embeddings()

    @property
    def layers(self) -> List[Any]:
        return list(self.decoder.layers)

    def embedding_modules(self) -> List[Any]:
        return [self.decoder.get_input_embeddings()]

    def head_ids(self) -> Set[int]:
        """The final norm and the lm_head, less a tied lm_head (it is the embedding)."""
        return _ids([self.decoder.norm, self.head]) - _ids(self.embedding_modules())

    def release_server_layers(self) -> None:
        """Also the final norm and an untied lm_head when labels are shared: the server owns
        them (a tied lm_head is the embedding and stays)."""
        import torch

        decoder = self.decoder
        if len(decoder.layers) > self.cut_layer:
            decoder.layers = torch.nn.ModuleList(self.layers[: self.cut_layer])
        if not self.u_shaped:
            decoder.norm = torch.nn.Identity()
            self.model.set_output_embeddings(torch.nn.Identity())

    @contextlib.contextmanager
    def _segment(self, start: int, norm: bool) -> Iterator[Any]:
        """The decoder with only layers [start, start + k) (k = cut or the rest), its layer
        kinds sliced alike, and the final norm only if `norm`; yields the decoder."""
        import torch

        decoder = self.decoder
        config = decoder.config
        stop = self.cut_layer if start == 0 else None
        saved_layers, saved_norm = decoder.layers, decoder.norm
        layer_types = getattr(config, "layer_types", None)
        try:
            decoder.layers = torch.nn.ModuleList(self.layers[start:stop])
            if not norm:
                decoder.norm = torch.nn.Identity()
            if layer_types is not None:
                config.layer_types = layer_types[start:stop]
            yield decoder
        finally:
            decoder.layers, decoder.norm = saved_layers, saved_norm
            if layer_types is not None:
                config.layer_types = layer_types

    def _run(self, start: int, norm: bool, attention_mask: torch.Tensor, **inputs: Any) -> Any:
        from jetfed.edge.causal_lm import positions

        with self._segment(start, norm) as decoder:
            return decoder(
                attention_mask=attention_mask,
                position_ids=positions(attention_mask),
                use_cache=False,
                **inputs,
            ).last_hidden_state

    def bottom(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self._run(0, False, batch["attention_mask"], input_ids=batch["input_ids"])

    def middle(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.cut_layer, False, attention_mask, inputs_embeds=hidden)

    def top_loss(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        from jetfed.edge.causal_lm import head_loss

        top = self._run(self.cut_layer, True, attention_mask, inputs_embeds=hidden)
        return head_loss(self.head, top, labels)

    def head_loss(
        self, top: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        from jetfed.edge.causal_lm import head_loss

        return head_loss(self.head, self.decoder.norm(top), labels)

    def labels_shape(self, batch: int, length: int) -> Tuple[int, ...]:
        return (batch, length)

    def labels_error(self, labels: torch.Tensor) -> Optional[str]:
        from jetfed.edge.instructions import IGNORE_INDEX

        vocab = int(self.head.weight.shape[0])
        ignored = labels == IGNORE_INDEX
        if bool((~ignored & ((labels < 0) | (labels >= vocab))).any()):
            return f"labels outside [0, {vocab}) and not {IGNORE_INDEX}"
        if bool(ignored[:, 1:].all()):
            return "labels hold no response token"
        return None
