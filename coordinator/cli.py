"""`jetfed coordinator run` and `jetfed demo`."""

from __future__ import annotations

from typing import Any, List, Optional

import typer

from jetfed.edge.errors import UserError


def ui_option() -> Any:
    return typer.Option(
        None,
        "--ui",
        metavar="HOST:PORT",
        help="Serve the live fleet page there, e.g. 127.0.0.1:8080 (docs/LIVE_PAGE.md).",
    )


def ui_token_option() -> Any:
    return typer.Option(
        None,
        "--ui-token",
        envvar="JETFED_UI_TOKEN",
        help="Token the page asks of browsers beyond loopback (default: generated, printed once).",
    )


def coordinator_run(
    config_path: str = typer.Argument(..., metavar="CONFIG", help="Experiment YAML."),
    broker: Optional[str] = typer.Option(
        None,
        "--broker",
        envvar="JETFED_BROKER",
        help="Overrides broker.url (mqtt://HOST:1883, mqtts://HOST:8883; cluster nodes: several, "
        "comma-separated, tried in order); none: embedded broker.",
    ),
    username: Optional[str] = typer.Option(None, envvar="JETFED_USERNAME"),
    password: Optional[str] = typer.Option(None, envvar="JETFED_PASSWORD"),
    ca_file: Optional[str] = typer.Option(None, envvar="JETFED_CA_FILE"),
    cert_file: Optional[str] = typer.Option(None, envvar="JETFED_CERT_FILE"),
    key_file: Optional[str] = typer.Option(None, envvar="JETFED_KEY_FILE"),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last completed round."),
    override: Optional[List[str]] = typer.Option(
        None, "--set", help="section.key=value, repeatable."
    ),
    embedded_port: int = typer.Option(1883, "--embedded-port", help="Port of the embedded broker."),
    ui: Optional[str] = ui_option(),
    ui_token: Optional[str] = ui_token_option(),
) -> None:
    """Run the rounds of an experiment; devices join with `jetfed edge run`. Broker flags (or
    JETFED_* variables, e.g. broker-config's coordinator.env) override the config's `broker:`."""
    from contextlib import ExitStack

    from jetfed.coordinator.broker import EmbeddedBroker, port_taken
    from jetfed.coordinator.config import load_config
    from jetfed.coordinator.progress import RoundTable
    from jetfed.coordinator.server import Coordinator
    from jetfed.coordinator.ui import live_page
    from jetfed.edge.cli import broker_spec
    from jetfed.edge.mqtt import BrokerSpec

    config = load_config(config_path, override)
    given = {
        "url": broker,
        "username": username,
        "password": password,
        "ca_file": ca_file,
        "cert_file": cert_file,
        "key_file": key_file,
    }
    spec = config.broker or BrokerSpec()
    with ExitStack() as stack:
        if broker is not None or config.broker is not None:
            given_values = {k: v for k, v in given.items() if v is not None}
            spec = broker_spec(**{**spec.model_dump(), **given_values})
        else:
            if port_taken("127.0.0.1", embedded_port):
                raise UserError(
                    f"port {embedded_port} on 127.0.0.1 is taken (another broker?): pass "
                    "--embedded-port PORT for the embedded broker, or --broker URL to use that one"
                )
            embedded = stack.enter_context(EmbeddedBroker(port=embedded_port))
            typer.echo(f"embedded broker on {embedded.url} (loopback only; devices on other hosts")
            typer.echo("  need Mosquitto: see README 'Deploying on real devices')")
            spec = BrokerSpec(url=embedded.url)
        # The page's port before the run directory: a taken port must not leave a run behind.
        page = stack.enter_context(live_page(config, ui, ui_token))
        coordinator = Coordinator(config, spec, resume=resume)  # config/data/model errors first
        if page is not None:
            coordinator.observers.append(page)
        table = stack.enter_context(RoundTable(config, config.rounds.min_clients))
        coordinator.on_round, coordinator.on_progress = table.add, table.progress
        coordinator.run()
    typer.echo(f"run directory: {config.run_dir}")


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def demo(
    clients: int = typer.Option(2, "--clients", min=1, max=32, help="Edge processes to start."),
    rounds: Optional[int] = typer.Option(
        None, "--rounds", min=1, help="Default: 3 (minilm), 2 (smollm2)."
    ),
    method: str = typer.Option("lora", "--method", help="lora, federa, full, ..."),
    model: str = typer.Option(
        "minilm",
        "--model",
        help="minilm (classifier on SST-2) or smollm2 (instruction-tuned LLM, SST-2 as "
        "generation); any HF model id or folder works too.",
    ),
    local_steps: Optional[int] = typer.Option(
        None, "--local-steps", min=1, help="Default: 50 (minilm), 8 (smollm2)."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Dataset folder (default: bundled SST-2 sample)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Experiment name (default: demo-METHOD-TIME)."
    ),
    output_dir: str = typer.Option("runs", "--output-dir"),
    partition: str = typer.Option("iid", "--partition", help="iid, dirichlet or shards."),
    alpha: float = typer.Option(1.0, "--alpha", help="Dirichlet concentration."),
    learning_rate: Optional[float] = typer.Option(None, "--lr"),
    max_eval_samples: Optional[int] = typer.Option(None, "--max-eval-samples"),
    seed: int = typer.Option(
        0,
        "--seed",
        min=0,
        max=(1 << 32) - 1,
        help="Seeds partition, initial state, selection and training: a rerun with the same "
        "seed and --clients gives bit-identical global adapters.",
    ),
    broker: Optional[str] = typer.Option(
        None, "--broker", help="Use this broker instead of the embedded one."
    ),
    link: Optional[str] = typer.Option(
        None,
        "--link",
        help="Put each device behind an emulated link, e.g. 100mbit,20ms,0.1% or "
        "up=10mbit,down=100mbit,delay=20ms (root; see docs/LINKS.md).",
    ),
    ui_linger_s: float = typer.Option(
        0.0, "--ui-linger-s", min=0, help="Keep the live page up this long after the run."
    ),
    ui: Optional[str] = ui_option(),
    ui_token: Optional[str] = ui_token_option(),
) -> None:
    """A whole federated run on this machine: embedded broker, coordinator, N devices."""
    import time

    from jetfed.coordinator.demo import DEMO_DATA, demo_config, run_demo
    from jetfed.coordinator.links import LinkSpec
    from jetfed.coordinator.progress import plural

    link_spec = LinkSpec.parse(link) if link is not None else None

    data_path = data or str(DEMO_DATA)
    run_name = name or f"demo-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = demo_config(
        run_name,
        method,
        clients,
        rounds,
        local_steps,
        data_path,
        output_dir,
        partition,
        alpha,
        max_eval_samples,
        learning_rate,
        seed,
        model,
    )
    metrics = run_demo(config, clients, broker, link_spec, ui, ui_token, ui_linger_s)
    if not metrics:
        raise UserError(
            "the demo completed no round; see the logs in " + str(config.run_dir / "logs")
        )
    from jetfed.coordinator.quality import metric_name, metric_value

    last = metrics[-1]
    metric = metric_name(config.evaluation.metric, metrics)
    total_s = last.wall_clock_s
    behind = f", devices behind {link_spec} links" if link_spec is not None else ""
    typer.echo(
        f"done: {plural(len(metrics), 'round')} in {total_s:.0f} s, final validation {metric} "
        f"{_number(metric_value(last, metric))}{behind}; run directory {config.run_dir}"
    )
    from jetfed.profiles.report import build_report

    report = build_report([config.run_dir], config.run_dir / "report")
    typer.echo(f"report: {report.markdown_path} (also report.html and PNG plots beside it)")


group = typer.Typer(help="Run the coordinator side.", no_args_is_help=True)
"""`jetfed coordinator ...`; other modules may add commands to it from their own `register`."""
group.command("run")(coordinator_run)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="coordinator")
    app.command("demo")(demo)
