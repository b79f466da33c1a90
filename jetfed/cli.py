"""The `jetfed` command: each area adds its own commands through a `register(app)` function.

Command modules import heavy libraries (torch, transformers) inside the commands, so
`jetfed --help` stays fast and a device without the coordinator's extras still starts.
"""

from __future__ import annotations

import importlib
import sys

import typer

from jetfed.edge.errors import UserError
from jetfed.edge.logs import configure_logging

REGISTRARS = [
    "jetfed.edge.cli",
    "jetfed.coordinator.cli",
    "jetfed.coordinator.simulate_cli",
    "jetfed.coordinator.security_cli",
    "jetfed.profiles.cli",
    "jetfed.edge.doctor_cli",
    "jetfed.edge.inference_cli",
    "jetfed.coordinator.onnx_cli",
    "jetfed.coordinator.generate_cli",
]

app = typer.Typer(
    name="jetfed",
    help="Federated fine-tuning on Jetson devices over MQTT, with energy and time profiles.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug."),
) -> None:
    configure_logging(verbose)


for _name in REGISTRARS:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Run the CLI; a user mistake prints one line and exits 2 instead of a traceback.

    Typer runs in standalone mode, so usage errors (unknown command or option, a bad value) are
    reported by the click it uses (typer >= 0.29 vendors its own): the usage line, the error,
    exit 2. Only our own `UserError` comes out of `app()` and is printed here."""
    try:
        app()
    except UserError as exc:
        print(f"jetfed: error: {exc}", file=sys.stderr)
        sys.exit(2)
