"""`jetfed demo`: an embedded broker, a coordinator and N edge subprocesses on one machine.

Everything is real (MQTT broker, separate device processes, the pre-trained MiniLM, SST-2);
only the fleet is local. Defaults finish in a few minutes on 2 CPU cores, offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from jetfed.coordinator.config import ExperimentConfig, parse_config
from jetfed.coordinator.fleet import run_local_fleet
from jetfed.coordinator.links import LinkSpec
from jetfed.coordinator.links.netns import require_root
from jetfed.coordinator.progress import RoundTable
from jetfed.coordinator.records import RoundMetrics
from jetfed.coordinator.ui import live_page
from jetfed.edge.methods.base import get_method

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "sst2"
DEMO_MODELS = ("minilm", "smollm2")


@dataclass(frozen=True)
class DemoDefaults:
    """What a demo run of one model does unless flags say otherwise (≤ 5 min on 2 CPU cores)."""

    rounds: int
    local_steps: int
    batch_size: int
    max_length: int
    max_eval_samples: Optional[int]
    slm_layers: int = 3
    """fedcollm: the devices' SLM is the model's first `slm_layers` layers, the coordinator's
    LLM the whole model (the offline same-tokenizer pair)."""
    method_settings: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Per method, `method:` keys (kd, fedcollm: the coordinator's work per round)."""


DEFAULTS = {
    "minilm": DemoDefaults(3, 50, 16, 64, None),
    # SmolLM2-135M-Instruct on SST-2 as generation: 8 steps of 8 rows lift exact match from
    # ≈ 0.45 to ≈ 0.8; evaluation decodes 16 of 32 validation rows (generation dominates it).
    # kd/fedcollm: 16 proxy/aux rows and 4 coordinator steps keep a round within a minute.
    "smollm2": DemoDefaults(
        2,
        8,
        8,
        128,
        32,
        slm_layers=4,
        method_settings={
            "kd": {"proxy_size": 16, "server_steps": 4, "server_batch_size": 8},
            "fedcollm": {"aux_size": 16, "server_steps": 4, "server_batch_size": 8},
        },
    ),
}


def demo_config(
    name: str,
    method: str,
    clients: int,
    rounds: Optional[int],
    local_steps: Optional[int],
    data: str,
    output_dir: str,
    partition: str,
    alpha: float,
    max_eval_samples: Optional[int],
    learning_rate: Optional[float],
    seed: int = 0,
    model_name: str = "minilm",
    defaults: Optional[DemoDefaults] = None,
) -> ExperimentConfig:
    """The demo's experiment, as a user would write it in YAML (see examples/); `seed` seeds
    the partition, the initial state, the selection and every device's training. `defaults`
    replaces the model's own sizes (DEFAULTS; bench/gpu_check.py runs tiny ones)."""
    defaults = defaults or DEFAULTS.get(model_name, DEFAULTS["smollm2"])
    model: Dict[str, Any] = {"name_or_path": model_name, "max_length": defaults.max_length}
    method_section = {"name": method, **defaults.method_settings.get(method, {})}
    if method == "fedcollm":
        model["num_hidden_layers"] = defaults.slm_layers
        method_section["llm"] = model_name
    raw: Dict[str, Any] = {
        "name": name,
        "model": model,
        "method": method_section,
        "training": {
            "local_steps": local_steps or defaults.local_steps,
            "batch_size": defaults.batch_size,
            "learning_rate": learning_rate or get_method(method).default_learning_rate,
        },
        "data": {
            "path": data,
            "partition": {"kind": partition, "num_clients": clients, "alpha": alpha, "seed": seed},
            "max_eval_samples": max_eval_samples or defaults.max_eval_samples,
        },
        "rounds": {
            "count": rounds or defaults.rounds,
            "min_clients": clients,
            "wait_for_devices_s": 180,
        },
        "output_dir": output_dir,
        "seed": seed,
    }
    return parse_config(raw, "demo")


def run_demo(
    config: ExperimentConfig,
    clients: int,
    broker_url: Optional[str],
    link: Optional[LinkSpec] = None,
    ui: Optional[str] = None,
    ui_token: Optional[str] = None,
    ui_linger_s: float = 0.0,
) -> List[RoundMetrics]:
    """Run the whole fleet with a live table (and the live page at `ui`, HOST:PORT); returns
    the per-round metrics."""
    if link is not None:
        require_root()
    with live_page(config, ui, ui_token, ui_linger_s) as page:
        return run_local_fleet(
            config,
            clients,
            link=link,
            broker_url=broker_url,
            table=RoundTable(config, clients),
            observers=[page] if page is not None else [],
        )
