"""The live fleet page: `LiveState` (what the page shows, a `RunObserver`) and `UiServer`
(aiohttp on its own thread) serving it; `live_page` wires both to a run."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from jetfed.coordinator.config import ExperimentConfig
    from jetfed.coordinator.ui.state import LiveState


@contextmanager
def live_page(
    config: ExperimentConfig,
    address: Optional[str],
    token: Optional[str] = None,
    linger_s: float = 0.0,
) -> Iterator[Optional[LiveState]]:
    """Serve the live page of `config`'s run at `address` (HOST:PORT) while the block runs, and
    `linger_s` after; yields the observer to add to the coordinator, or None without address."""
    if address is None:
        yield None
        return
    import typer

    from jetfed.coordinator.ui.server import UiServer, parse_address
    from jetfed.coordinator.ui.state import LiveState

    host, port = parse_address(address)
    title = f"{config.name}: {config.method.name} on {config.model.name_or_path}"
    state = LiveState(title, [config.run_dir], rounds_total=config.rounds.count)
    with UiServer(state, host, port, token) as server:
        typer.echo(server.banner())
        yield state
        if linger_s > 0:
            typer.echo(f"live page: serving the finished run for {linger_s:.0f} s more")
            time.sleep(linger_s)
