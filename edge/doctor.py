"""`jetfed doctor`: is this device ready to train? One row per thing that commonly goes wrong.

Every check reports instead of raising (a check that crashes is a failed row), so the command
works on any host: off a Jetson the Jetson-only checks are skipped, not failed. `fail` means
training will not work as configured; `warn` means it will, but something is degraded (no power
sensor, CPU only, clock not synchronised).
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field

from jetfed.edge.memory_budget import describe, estimate_training_memory
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.telemetry.context import DeviceContext, collect_context

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
MIN_TORCH_FOR_TRANSFORMERS_5 = (2, 6)
JTOP_FIRST_SAMPLE_TIMEOUT_S = 3.0
MEMORY_WARN_FRACTION = 0.8
"""Above this share of available memory the estimate's error margin could tip it over."""
COMMAND_TIMEOUT_S = 5.0
Runner = Callable[[Sequence[str]], Optional[str]]
"""Runs a command; its stdout, or None when the command is missing, fails or times out."""


@dataclass
class CheckResult:
    name: str
    status: str
    detail: str


class DoctorOptions(BaseModel):
    """What the device is about to run (for the memory budget) and where its broker is."""

    model_config = ConfigDict(extra="forbid")

    model: str = "minilm"
    method: str = "lora"
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=64, ge=8)
    num_labels: int = Field(default=2, ge=1)
    lora_rank: int = Field(default=8, ge=1)
    cut_layer: Optional[int] = Field(default=None, ge=1)
    gradient_checkpointing: bool = False
    response_tokens: Optional[int] = Field(default=None, ge=1)
    broker: Optional[BrokerSpec] = None
    broker_timeout_s: float = Field(default=5.0, gt=0)
    root: str = "/"
    jtop_socket: str = "/run/jtop.sock"

    def method_config(self) -> Dict[str, Any]:
        """The `method:` settings the flags give, for the methods that take them."""
        from jetfed.edge.methods.base import get_method

        fields = get_method(self.method).config_model.model_fields
        given = {"rank": self.lora_rank, "cut_layer": self.cut_layer}
        return {key: value for key, value in given.items() if value is not None and key in fields}


def run_command(command: Sequence[str]) -> Optional[str]:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _major_minor(version: str) -> Tuple[int, int]:
    """`2.5.0a0+872d972e41.nv24.08` → (2, 5); unparseable → (0, 0)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def transformers_torch_problem(
    transformers_version: str, torch_version: str, torch_seen: bool
) -> Optional[str]:
    """Why transformers cannot use this torch, or None. transformers 5 disables torch < 2.6
    with only a log line; the models then fail to load far from the cause."""
    too_old = _major_minor(transformers_version)[0] >= 5 and (
        _major_minor(torch_version) < MIN_TORCH_FOR_TRANSFORMERS_5
    )
    if too_old or not torch_seen:
        return (
            f"transformers {transformers_version} cannot use torch {torch_version}"
            + (" (transformers 5 needs torch >= 2.6)" if too_old else "")
            + ": pip install -c /etc/jetfed/constraints.txt 'transformers<5' (or re-run "
            "install_jetson.sh)"
        )
    return None


def check_torch(context: DeviceContext) -> CheckResult:
    try:
        import torch
    except ImportError as exc:
        return CheckResult("torch", FAIL, f"not importable: {exc}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return CheckResult("torch", OK, f"{torch.__version__}, CUDA {torch.version.cuda} ({name})")
    if context.l4t_release is not None:
        return CheckResult(
            "torch",
            FAIL,
            f"{torch.__version__} does not see CUDA on this Jetson: a CPU wheel replaced "
            "NVIDIA's (re-run install_jetson.sh)",
        )
    return CheckResult("torch", WARN, f"{torch.__version__}, CPU only (no CUDA device)")


def check_transformers() -> CheckResult:
    try:
        import torch
        import transformers
        from transformers.utils import is_torch_available
    except ImportError as exc:
        return CheckResult("transformers/peft", FAIL, f"not importable: {exc}")
    problem = transformers_torch_problem(
        transformers.__version__, torch.__version__, bool(is_torch_available())
    )
    if problem is not None:
        return CheckResult("transformers/peft", FAIL, problem)
    try:
        import peft
    except Exception as exc:
        return CheckResult("transformers/peft", FAIL, f"peft does not import: {exc}")
    return CheckResult(
        "transformers/peft", OK, f"transformers {transformers.__version__}, peft {peft.__version__}"
    )


def _rails_text(rails_w: Dict[str, Optional[float]], total_w: Optional[float]) -> str:
    shown = ", ".join(
        f"{name} {'n/a' if watts is None else f'{watts:.2f} W'}" for name, watts in rails_w.items()
    )
    module = "n/a" if total_w is None else f"{total_w:.2f} W"
    return f"module {module}; {shown}"


def check_jtop(context: DeviceContext, socket_path: str) -> CheckResult:
    """The jtop service answers and reports power rails (the preferred Jetson backend)."""
    from jetfed.edge.telemetry.backends.base import BackendUnavailable
    from jetfed.edge.telemetry.backends.jtop_backend import JtopBackend

    on_jetson = context.l4t_release is not None
    if not os.path.exists(socket_path):
        if not on_jetson:
            return CheckResult("jtop", SKIP, "not a Jetson")
        return CheckResult(
            "jtop", FAIL, f"no service socket {socket_path}: sudo jtop --install-service"
        )
    backend = JtopBackend()
    try:
        backend.open()
    except BackendUnavailable as exc:
        return CheckResult("jtop", FAIL if on_jetson else WARN, str(exc))
    try:
        deadline = time.monotonic() + JTOP_FIRST_SAMPLE_TIMEOUT_S
        sample = None
        while sample is None and time.monotonic() < deadline:
            sample = backend.read()
            if sample is None:
                time.sleep(0.1)
    finally:
        backend.close()
    if sample is None:
        return CheckResult("jtop", FAIL, "service connected but sent no data")
    if not sample.rails_w:
        return CheckResult("jtop", FAIL, "service reports no power rails")
    return CheckResult("jtop", OK, _rails_text(sample.rails_w, sample.total_w))


def check_power_sensor(root: str) -> CheckResult:
    """What the sampler will use here (the same auto-detection as training) and what it reads."""
    from jetfed.edge.telemetry.backends.detect import detect_backend

    backend = detect_backend("auto", sysfs_root=os.path.join(root, "sys"), interval_s=0.5)
    try:
        sample = backend.read()
        deadline = time.monotonic() + JTOP_FIRST_SAMPLE_TIMEOUT_S
        while sample is None and time.monotonic() < deadline:
            time.sleep(0.1)
            sample = backend.read()
    finally:
        backend.close()
    if not backend.has_power:
        return CheckResult(
            "power sensor", WARN, f"{backend.name}: no power sensor, energy will be n/a"
        )
    if sample is None or sample.total_w is None:
        return CheckResult("power sensor", WARN, f"{backend.name}: no module power reading yet")
    return CheckResult(
        "power sensor", OK, f"{backend.name}: " + _rails_text(sample.rails_w, sample.total_w)
    )


def check_power_mode(context: DeviceContext) -> CheckResult:
    """nvpmodel mode and clocks: a profile is only comparable to one taken in the same mode."""
    khz = context.cpu_cur_freq_khz
    cpu_mhz = f"CPU {min(khz) / 1000:.0f}-{max(khz) / 1000:.0f} MHz" if khz else "CPU MHz n/a"
    if context.l4t_release is None:
        return CheckResult("power mode", SKIP, f"not a Jetson; {cpu_mhz}")
    gpu = (
        "GPU n/a"
        if context.gpu_cur_freq_hz is None
        else f"GPU {context.gpu_cur_freq_hz / 1e6:.0f} MHz"
    )
    clocks = {True: "jetson_clocks on", False: "jetson_clocks off", None: "jetson_clocks n/a"}[
        context.jetson_clocks_active
    ]
    if context.nvpmodel_mode is None:
        return CheckResult(
            "power mode", WARN, f"nvpmodel -q gave no mode; {clocks}, {cpu_mhz}, {gpu}"
        )
    return CheckResult(
        "power mode",
        OK,
        f"{context.nvpmodel_mode} (mode {context.nvpmodel_id}), {clocks}, {cpu_mhz}, {gpu}",
    )


def _available_bytes(on_jetson: bool, cuda: bool) -> Tuple[int, str]:
    """Memory the training process can still get, and where it comes from. Jetsons share DRAM
    between CPU and GPU, so system memory is the budget there even with CUDA."""
    import psutil

    if cuda and not on_jetson:
        import torch

        return int(torch.cuda.mem_get_info()[0]), "free GPU memory"
    return int(psutil.virtual_memory().available), "available memory"


def check_memory(options: DoctorOptions, context: DeviceContext) -> CheckResult:
    cuda = _cuda_available()
    on_jetson = context.l4t_release is not None
    estimate = estimate_training_memory(
        options.model,
        options.method,
        options.batch_size,
        options.max_length,
        num_labels=options.num_labels,
        method_config=options.method_config(),
        cuda=cuda,
        response_tokens=options.response_tokens,
        gradient_checkpointing=options.gradient_checkpointing,
    )
    available, source = _available_bytes(on_jetson, cuda)
    needed = estimate.total_bytes
    if cuda and not on_jetson:
        needed -= estimate.runtime_bytes
    mib = 1 << 20
    detail = (
        f"{options.model}/{options.method} batch {options.batch_size}×{options.max_length}: "
        f"~{needed / mib:.0f} MiB of {available / mib:.0f} MiB {source} "
        f"({'; '.join(describe(estimate))})"
    )
    if needed >= available:
        return CheckResult("memory budget", FAIL, detail + ": lower --batch-size/--max-length")
    if needed >= MEMORY_WARN_FRACTION * available:
        return CheckResult("memory budget", WARN, detail)
    return CheckResult("memory budget", OK, detail)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def probe_broker(spec: BrokerSpec, timeout_s: float) -> CheckResult:
    """One real MQTT connect (TCP, TLS, credentials, CONNACK) and a clean disconnect."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from jetfed.edge.mqtt import apply_credentials

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"jetfed-doctor-{os.getpid()}",
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    client.connect_timeout = timeout_s
    connack: Dict[str, Any] = {}
    answered = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        connack["reason"] = reason_code
        answered.set()

    client.on_connect = on_connect
    started_s = time.monotonic()
    try:
        host, port = apply_credentials(client, spec)
        client.connect(host, port, keepalive=spec.keepalive_s)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return CheckResult("broker", FAIL, f"{spec.url}: {exc}")
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            return CheckResult("broker", FAIL, f"{spec.url}: no CONNACK after {timeout_s:.0f} s")
        reason = connack["reason"]
        if reason.is_failure:
            return CheckResult("broker", FAIL, f"{spec.url}: refused: {reason}")
    finally:
        client.disconnect()
        client.loop_stop()
    elapsed_ms = (time.monotonic() - started_s) * 1000
    secured = "TLS" if spec.endpoint()[2] else "plain TCP"
    user = f"as {spec.username}" if spec.username else "anonymous"
    return CheckResult(
        "broker", OK, f"{spec.url}: connected in {elapsed_ms:.0f} ms ({secured}, {user})"
    )


def check_broker(options: DoctorOptions) -> CheckResult:
    if options.broker is None:
        return CheckResult("broker", SKIP, "no --broker given")
    return probe_broker(options.broker, options.broker_timeout_s)


def check_clock_sync(run: Runner = run_command) -> CheckResult:
    """Devices stamp profiles with their own clocks: unsynchronised clocks misalign timelines.

    MQTT gives no way to compare with the broker host's clock, so the local NTP client is asked:
    systemd-timesyncd (timedatectl), chrony, then ntpd (ntpstat)."""
    synced = run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    if synced is not None and synced.strip() in ("yes", "no"):
        if synced.strip() == "yes":
            return CheckResult("clock sync", OK, "timedatectl: NTP synchronized")
        return CheckResult("clock sync", WARN, "timedatectl: NTP not synchronized")
    tracking = run(["chronyc", "-n", "tracking"])
    if tracking is not None:
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in tracking.splitlines())
        )
        leap = fields.get("Leap status", "")
        offset = fields.get("System time", "")
        if leap == "Normal":
            return CheckResult("clock sync", OK, f"chrony: {offset or 'synchronised'}")
        return CheckResult("clock sync", WARN, f"chrony: leap status {leap or 'unknown'}")
    ntpstat = run(["ntpstat"])
    if ntpstat is not None:
        return CheckResult("clock sync", OK, "ntpd: " + ntpstat.splitlines()[0].strip())
    return CheckResult(
        "clock sync", WARN, "unknown: no timedatectl/chrony/ntpstat answered (is NTP running?)"
    )


def _guarded(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """A crashing check is a failed row with the reason, never a traceback."""
    try:
        return check()
    except Exception as exc:
        return CheckResult(name, FAIL, f"check crashed: {type(exc).__name__}: {exc}")


def run_checks(options: DoctorOptions, run: Runner = run_command) -> List[CheckResult]:
    """Every check, in the order a user fixes things: software, sensors, settings, budget,
    network."""
    context = collect_context(root=options.root)
    device = context.device_model or f"{context.machine}, not a Jetson"
    l4t = (
        f", L4T {context.l4t_release} (JetPack {context.jetpack_major})"
        if context.l4t_release
        else ""
    )
    results = [CheckResult("device", OK, f"{device}{l4t}, Python {context.python_version}")]
    checks: List[Tuple[str, Callable[[], CheckResult]]] = [
        ("torch", lambda: check_torch(context)),
        ("transformers/peft", check_transformers),
        ("jtop", lambda: check_jtop(context, options.jtop_socket)),
        ("power sensor", lambda: check_power_sensor(options.root)),
        ("power mode", lambda: check_power_mode(context)),
        ("memory budget", lambda: check_memory(options, context)),
        ("broker", lambda: check_broker(options)),
        ("clock sync", lambda: check_clock_sync(run)),
    ]
    results.extend(_guarded(name, check) for name, check in checks)
    return results


def failed(results: Sequence[CheckResult]) -> bool:
    return any(result.status == FAIL for result in results)
