"""What the live page shows, kept by a `RunObserver` on the coordinator's protocol thread and
read as JSON by the page server's thread: the fleet, the round under way, a bounded window of
each device's live telemetry, and the run's per-round numbers.

The per-round numbers are `jetfed.profiles.summary.round_costs` of the run directory, reloaded (on
the page server's thread, never the protocol thread's) after a round ended: the page and
`jetfed profiles report` share one computation.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from jetfed.coordinator.observer import RunObserver
from jetfed.coordinator.records import RoundMetrics
from jetfed.coordinator.registry import DeviceRecord
from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event
from jetfed.edge.wire import Hello, LiveTelemetry, Progress, Task
from jetfed.profiles.records import RunRecords, load_run
from jetfed.profiles.summary import RunSummary, round_costs, run_labels, run_targets

logger = logging.getLogger(__name__)

WINDOW_S = 300.0
"""How much live telemetry the page keeps per device (the page's "last minutes")."""
MAX_WINDOW_SAMPLES = 1500
PHASE_STATUS = {
    "download": "downloading",
    "setup": "setting up",
    "train": "training",
    "upload": "uploading",
}


def _hello_facts(hello: Optional[Hello]) -> Dict[str, Any]:
    if hello is None:
        return {}
    context = hello.context
    return {
        "hostname": hello.hostname,
        "accelerator": hello.accelerator,
        "backend": hello.telemetry_backend,
        "device_model": context.get("device_model"),
        "jetpack": context.get("jetpack_major"),
        "power_mode": context.get("nvpmodel_mode"),
    }


def runs_json(runs: Sequence[RunRecords], target: Optional[float]) -> Dict[str, Any]:
    """Per-run, per-round numbers and *-to-target, exactly as the report computes them."""
    summaries = [
        RunSummary(label, run, round_costs(run)) for label, run in zip(run_labels(runs), runs)
    ]
    chosen, targets = run_targets(summaries, target)
    items = []
    for index, summary in enumerate(summaries):
        rounds = []
        for metrics, cost in zip(summary.run.metrics, summary.costs):
            row = asdict(cost)
            row.update(
                status=metrics.status,
                devices=f"{metrics.num_aggregated}/{metrics.num_selected}",
                train_loss=metrics.train_loss,
                eval_loss=metrics.eval_loss,
                extra={k: v for k, v in metrics.extra.items() if k not in ("energy_j",)},
            )
            rounds.append(row)
        reached = targets[index] if targets else None
        items.append(
            {
                "label": summary.label,
                "name": summary.run.name,
                "method": summary.run.method,
                "rounds": rounds,
                "to_target": None if reached is None else asdict(reached),
            }
        )
    metric = summaries[0].metric if summaries else "accuracy"
    return {"metric": metric, "target_accuracy": chosen, "runs": items}


class LiveState(RunObserver):
    """`coordinator.observers.append(state)`; `snapshot()` and `take_updates()` for the page."""

    wants_telemetry = True

    def __init__(
        self,
        title: str,
        run_dirs: Sequence[Path],
        live: bool = True,
        rounds_total: Optional[int] = None,
        target_accuracy: Optional[float] = None,
    ) -> None:
        self.title = title
        self.rounds_total = rounds_total
        self.run_dirs = [Path(p) for p in run_dirs]
        self.live = live
        self.finished = not live
        self.target_accuracy = target_accuracy
        self._lock = threading.Lock()
        self.version = 0
        self._devices: Dict[str, Dict[str, Any]] = {}
        self._round: Optional[Dict[str, Any]] = None
        self._windows: Dict[str, Deque[Dict[str, Any]]] = {}
        self._fresh: Dict[str, List[Dict[str, Any]]] = {}
        self._runs: Dict[str, Any] = {"metric": "accuracy", "target_accuracy": None, "runs": []}
        self._runs_stale = False
        if not live:
            self._load_runs()

    # ------------------------------------------------------------------ observer hooks

    def _device(self, device_id: str) -> Dict[str, Any]:
        return self._devices.setdefault(
            device_id, {"device_id": device_id, "online": False, "status": "offline"}
        )

    def on_device(self, record: DeviceRecord) -> None:
        with self._lock:
            device = self._device(record.device_id)
            device.update(_hello_facts(record.hello))
            device["online"] = record.online
            device["last_seen_unix_s"] = time.time()
            if not record.online:
                device["status"] = "offline"
            elif device["status"] == "offline":
                device["status"] = "online"
            self.version += 1

    def on_task(self, task: Task) -> None:
        with self._lock:
            self._round = {
                "round_index": task.round_index,
                "selected": list(task.selected_devices),
                "min_clients": task.min_clients,
                "issued_unix_s": task.issued_unix_s,
                "deadline_unix_s": task.deadline_unix_s,
                "accepted": [],
            }
            for device_id in task.selected_devices:
                device = self._device(device_id)
                device.update(
                    status="selected",
                    model=task.model.name_or_path,
                    step=None,
                    total_steps=None,
                    bytes_received=0,
                    bytes_sent=0,
                )
            self.version += 1

    def on_progress(self, progress: Progress) -> None:
        with self._lock:
            device = self._device(progress.device_id)
            if device["status"] != "done":
                device["status"] = PHASE_STATUS.get(progress.phase, progress.phase)
            device.update(
                step=progress.step,
                total_steps=progress.total_steps,
                bytes_received=progress.bytes_received,
                bytes_sent=progress.bytes_sent,
                last_seen_unix_s=time.time(),
            )
            self.version += 1

    def on_accepted(self, device_id: str, round_index: int) -> None:
        with self._lock:
            self._device(device_id)["status"] = "done"
            if self._round is not None and self._round["round_index"] == round_index:
                self._round["accepted"].append(device_id)
            self.version += 1

    def on_telemetry(self, telemetry: LiveTelemetry) -> None:
        rows: List[Dict[str, Any]] = [
            {
                "t": s.wall_unix_s,
                "rails_w": s.rails_w,
                "total_w": s.total_w,
                "rss_bytes": s.rss_bytes,
                "system_used_bytes": s.system_used_bytes,
            }
            for s in telemetry.samples
        ]
        with self._lock:
            window = self._windows.setdefault(telemetry.device_id, deque(maxlen=MAX_WINDOW_SAMPLES))
            window.extend(rows)
            while window and window[0]["t"] < rows[-1]["t"] - WINDOW_S:
                window.popleft()
            self._fresh.setdefault(telemetry.device_id, []).extend(rows)
            device = self._device(telemetry.device_id)
            device["backend"] = telemetry.backend
            device["last_seen_unix_s"] = time.time()

    def on_round(self, metrics: RoundMetrics) -> None:
        with self._lock:
            for device in self._devices.values():
                if device["online"]:
                    device["status"] = "online"
            self._runs_stale = True
            self.version += 1

    def on_finished(self) -> None:
        with self._lock:
            self.finished = True
            self._round = None
            self._runs_stale = True
            self.version += 1

    # ------------------------------------------------------------------ the page's reads

    def _refresh_runs(self) -> None:
        """Reload the run directories if a round ended since; a file caught mid-append is read
        again at the next tick."""
        with self._lock:
            stale, self._runs_stale = self._runs_stale, False
        if not stale:
            return
        try:
            self._load_runs()
        except UserError as exc:
            log_event(logger, logging.DEBUG, "ui.reload_later", reason=exc)
            with self._lock:
                self._runs_stale = True

    def _load_runs(self) -> None:
        runs = [load_run(path) for path in self.run_dirs if (path / "metrics.jsonl").exists()]
        numbers = runs_json(runs, self.target_accuracy)
        with self._lock:
            self._runs = numbers
            for run in runs:
                for device_id, hello in run.devices.items():
                    if self.finished or not self.live:
                        device = self._device(device_id)
                        device.update(_hello_facts(hello), status="done")
            self.version += 1

    def _state_copy(self) -> Dict[str, Any]:
        """Under the lock: copies of what the protocol thread changes in place (telemetry rows
        and run numbers are replaced, never changed), so encoding happens outside the lock."""
        return {
            "title": self.title,
            "live": self.live,
            "finished": self.finished,
            "rounds_total": self.rounds_total,
            "now_unix_s": time.time(),
            "devices": [dict(self._devices[d]) for d in sorted(self._devices)],
            "round": None if self._round is None else dict(self._round),
            "run": self._runs,
        }

    def snapshot_json(self) -> str:
        """Everything, telemetry window included (a page that just connected)."""
        self._refresh_runs()
        with self._lock:
            state = self._state_copy()
            state["telemetry"] = {d: list(w) for d, w in self._windows.items()}
        return json.dumps(state)

    def snapshot(self) -> Dict[str, Any]:
        return dict(json.loads(self.snapshot_json()))

    def take_updates(
        self, seen_version: int, encode: bool = True
    ) -> Tuple[int, Optional[str], Optional[str]]:
        """(version, state JSON if it changed since `seen_version`, new telemetry JSON if any):
        encoded once per tick however many pages watch; nothing encoded without `encode`."""
        if encode:
            self._refresh_runs()
        with self._lock:
            state = self._state_copy() if encode and self.version != seen_version else None
            fresh = self._fresh if encode and self._fresh else None
            self._fresh = {}
            version = self.version if encode else seen_version
        return (
            version,
            None if state is None else json.dumps(state),
            None if fresh is None else json.dumps(fresh),
        )
