"""`jetfed demo`: an embedded broker, a coordinator and N edge subprocesses on one machine.

Everything is real (MQTT broker, separate device processes, the pre-trained MiniLM, SST-2);
only the fleet is local. Defaults finish in a few minutes on 2 CPU cores, offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from coordinator.config import ExperimentConfig, parse_config
from coordinator.fleet import run_local_fleet
from coordinator.links import LinkSpec
from coordinator.links.netns import require_root
from coordinator.progress import RoundTable
from coordinator.records import RoundMetrics
from coordinator.ui import live_page
from edge.methods.base import get_method

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "sst2"


def demo_config(
    name: str,
    method: str,
    clients: int,
    rounds: int,
    local_steps: int,
    data: str,
    output_dir: str,
    partition: str,
    alpha: float,
    max_eval_samples: Optional[int],
    learning_rate: Optional[float],
    seed: int = 0,
) -> ExperimentConfig:
    """The demo's experiment, as a user would write it in YAML (see examples/); `seed` seeds
    the partition, the initial state, the selection and every device's training."""
    model: Dict[str, Any] = {"name_or_path": "minilm", "max_length": 64}
    if method == "fedcollm":
        model["num_hidden_layers"] = 3  # the offline pair: 3-layer SLM, 6-layer LLM (method.llm)
    raw: Dict[str, Any] = {
        "name": name,
        "model": model,
        "method": {"name": method},
        "training": {
            "local_steps": local_steps,
            "batch_size": 16,
            "learning_rate": learning_rate or get_method(method).default_learning_rate,
        },
        "data": {
            "path": data,
            "partition": {"kind": partition, "num_clients": clients, "alpha": alpha, "seed": seed},
            "max_eval_samples": max_eval_samples,
        },
        "rounds": {"count": rounds, "min_clients": clients, "wait_for_devices_s": 180},
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
