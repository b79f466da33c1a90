"""`jetfed edge ...` (run the device agent) and `jetfed partition` (inspect client shards)."""

from __future__ import annotations

import signal
from typing import Any, Optional

import typer

from jetfed.edge.errors import UserError, flag_error, validation_line


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """Stop at once, even mid-training: unwinding runs the agent's cleanup (status `offline`)."""
    raise SystemExit(0)


def broker_spec(**fields: Any) -> Any:
    """A validated BrokerSpec from CLI flags (None = not given); UserError on a bad URL."""
    from pydantic import ValidationError

    from jetfed.edge.mqtt import BrokerSpec

    try:
        spec = BrokerSpec(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise UserError(validation_line(exc, root="broker")) from None
    spec.endpoint()
    return spec


def edge_run(
    broker: str = typer.Option(
        ...,
        envvar="JETFED_BROKER",
        help="mqtt://HOST:1883 or mqtts://HOST:8883; cluster nodes: several, comma-separated, "
        "tried in order",
    ),
    device_id: str = typer.Option(..., envvar="JETFED_DEVICE_ID", help="Unique id, e.g. orin-01."),
    data: Optional[str] = typer.Option(
        None, envvar="JETFED_DATA", help="Local dataset folder or file."
    ),
    experiment: Optional[str] = typer.Option(
        None,
        envvar="JETFED_EXPERIMENT",
        help="Serve only this experiment (default: whichever coordinator announces a run).",
    ),
    username: Optional[str] = typer.Option(None, envvar="JETFED_USERNAME"),
    password: Optional[str] = typer.Option(None, envvar="JETFED_PASSWORD"),
    ca_file: Optional[str] = typer.Option(None, envvar="JETFED_CA_FILE"),
    cert_file: Optional[str] = typer.Option(None, envvar="JETFED_CERT_FILE"),
    key_file: Optional[str] = typer.Option(None, envvar="JETFED_KEY_FILE"),
    torch_device: Optional[str] = typer.Option(
        None, "--torch-device", help="cpu, cuda, cuda:1 (default: auto)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", envvar="JETFED_THREADS", help="torch CPU threads."
    ),
    deterministic: bool = typer.Option(
        False,
        "--deterministic",
        envvar="JETFED_DETERMINISTIC",
        help="Deterministic CUDA kernels: bit-identical reruns of a seed, slower (off: fast).",
    ),
    max_rounds: Optional[int] = typer.Option(
        None, "--max-rounds", help="Exit after this many rounds."
    ),
    telemetry: str = typer.Option(
        "auto",
        "--telemetry",
        envvar="JETFED_TELEMETRY",
        help="auto, jtop, ina3221, tegrastats, nvml, rapl or psutil (auto: best available).",
    ),
    sample_rate_hz: float = typer.Option(
        10.0, "--sample-rate-hz", envvar="JETFED_SAMPLE_RATE_HZ", help="Telemetry sampling rate."
    ),
    sysfs_root: str = typer.Option(
        "/sys", "--sysfs-root", envvar="JETFED_SYSFS_ROOT", help="Where ina3221/rapl read sysfs."
    ),
    idle_baseline_s: float = typer.Option(
        5.0,
        "--idle-baseline-s",
        envvar="JETFED_IDLE_BASELINE_S",
        help="Seconds of idle power measured before the first round (0: none).",
    ),
    link_info: Optional[str] = typer.Option(
        None,
        "--link-info",
        envvar="JETFED_LINK_INFO",
        help="How this device reaches the broker (e.g. 100mbit,20ms or wifi); kept in profiles.",
    ),
) -> None:
    """Serve experiments: train whenever a coordinator selects this device."""
    from pydantic import ValidationError

    from jetfed.edge.agent import EdgeAgent, EdgeConfig
    from jetfed.edge.lobby import Lobby
    from jetfed.edge.logs import show_progress

    spec = broker_spec(
        url=broker,
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )
    try:
        config = EdgeConfig(
            broker=spec,
            device_id=device_id,
            experiment=experiment,
            data=data,
            torch_device=torch_device,
            num_threads=threads,
            deterministic=deterministic,
            telemetry=telemetry,
            sample_rate_hz=sample_rate_hz,
            sysfs_root=sysfs_root,
            idle_baseline_s=idle_baseline_s,
            link_info=link_info,
        )
    except ValidationError as exc:
        raise flag_error(exc) from None
    if data is None:
        raise UserError("--data is required: the device's local dataset (folder or file)")
    show_progress("jetfed.edge.agent", "jetfed.edge.lobby", "jetfed.edge.progress")
    agent = EdgeAgent(config) if experiment is not None else Lobby(config)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        agent.run(max_rounds=max_rounds)
    except KeyboardInterrupt:
        agent.stop()


def partition_command(
    data: str = typer.Option(..., "--data", help="Dataset folder or file."),
    split: str = typer.Option("train", "--split"),
    kind: str = typer.Option("dirichlet", "--kind", help="iid, dirichlet or shards."),
    clients: int = typer.Option(10, "--clients"),
    alpha: float = typer.Option(0.5, "--alpha"),
    shards_per_client: int = typer.Option(2, "--shards-per-client"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Print per-client sample and class counts of a partition."""
    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from jetfed.edge.data import class_counts, load_split, partition
    from jetfed.edge.wire import PartitionSpec

    try:
        spec = PartitionSpec(
            kind=kind,
            num_clients=clients,
            alpha=alpha,
            shards_per_client=shards_per_client,
            seed=seed,
        )
    except ValidationError as exc:
        raise flag_error(exc) from None
    dataset = load_split(data, split)
    parts = partition(dataset.labels, spec)
    counts = class_counts(dataset.labels, parts, dataset.num_classes)
    table = Table(title=f"{kind} partition of {data} [{split}] into {len(parts)} clients")
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    for label in range(dataset.num_classes):
        table.add_column(f"class {label}", justify="right")
    for index, row in enumerate(counts):
        table.add_row(str(index), str(sum(row)), *map(str, row))
    Console().print(table)


group = typer.Typer(help="Run the device side.", no_args_is_help=True)
"""`jetfed edge ...`; other modules may add commands to it from their own `register`."""
group.command("run")(edge_run)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="edge")
    app.command("partition")(partition_command)
