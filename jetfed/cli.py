"""The `jetfed` command: each area adds its own commands through a `register(app)` function.

Command modules import heavy libraries (torch, transformers) inside the commands, so
`jetfed --help` stays fast and a device without the coordinator's extras still starts.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from edge.errors import UserError
from edge.logs import configure_logging

REGISTRARS = [
    "edge.cli",
    "coordinator.cli",
    "coordinator.security_cli",
    "profiles.cli",
    "edge.doctor_cli",
    "edge.inference_cli",
    "coordinator.onnx_cli",
    "coordinator.generate_cli",
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
    """Run the CLI; a user mistake prints one line and exits 2 instead of a traceback."""
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        print(f"jetfed: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("jetfed: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        logging.getLogger("jetfed").debug("unhandled error", exc_info=True)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
