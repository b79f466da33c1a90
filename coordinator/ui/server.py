"""The page server: aiohttp on its own thread and event loop, so that no page, however slow or
numerous, ever runs on the coordinator's protocol thread.

aiohttp because one well-kept package gives the HTTP server, server-sent events (a streamed
response) and request limits, with no ASGI server beside it. Routes: `/` (the page),
`/static/NAME` (a fixed set of packaged files: no path ever reaches the file system),
`/api/state` (everything, JSON) and `/api/events` (server-sent events: `state` when anything
changed, `telemetry` with the samples that arrived, at most `TICK_S` apart).

Bound to loopback by default. A request from beyond loopback needs the token (`?token=` once,
then a cookie; or `Authorization: Bearer`); bound beyond loopback without one, a token is
generated and printed once.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import threading
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Optional, Set, Tuple

from aiohttp import web

from jetfed.coordinator.ui.state import LiveState
from jetfed.edge.errors import UserError

logger = logging.getLogger(__name__)

TICK_S = 0.5
MAX_EVENT_CLIENTS = 64
CLIENT_QUEUE_EVENTS = 16
"""A page that falls this many events behind is dropped (it reconnects and starts afresh)."""
WRITE_TIMEOUT_S = 5.0
MAX_REQUEST_BODY_BYTES = 1024
TOKEN_COOKIE = "jetfed_ui_token"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
STATIC_FILES = (
    "index.html",
    "app.js",
    "style.css",
    "vendor/uPlot.iife.min.js",
    "vendor/uPlot.min.css",
    "vendor/uPlot.LICENSE.txt",
)


def parse_address(text: str) -> Tuple[str, int]:
    """`HOST:PORT` (`[::1]:8080` for IPv6) → (host, port); UserError naming the fix."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--ui {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def is_loopback(host: Optional[str]) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _load_static() -> Dict[str, Tuple[bytes, str]]:
    root = Path(__file__).resolve().parent / "static"
    files = {}
    for name in STATIC_FILES:
        suffix = name[name.rfind(".") :]
        files[name] = ((root / name).read_bytes(), STATIC_TYPES.get(suffix, "text/plain"))
    return files


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UiServer:
    """`with UiServer(state, "127.0.0.1", 8080) as ui: print(ui.url)`."""

    def __init__(self, state: LiveState, host: str, port: int, token: Optional[str] = None):
        self.state = state
        self.host = host
        self.port = port
        self.token = token
        self.token_generated = False
        if token is None and not is_loopback(host):
            self.token = secrets.token_urlsafe(18)
            self.token_generated = True
        self._static = _load_static()
        self._clients: Set[asyncio.Queue[Optional[str]]] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self._started = threading.Event()
        self._error: Optional[BaseException] = None
        self.dropped_clients = 0

    @property
    def pages_open(self) -> int:
        """Event streams open now."""
        return len(self._clients)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # ------------------------------------------------------------------ requests

    def _authorised(self, request: web.Request) -> bool:
        if is_loopback(request.remote) or self.token is None:
            return True
        offered = [
            request.query.get("token", ""),
            request.cookies.get(TOKEN_COOKIE, ""),
            request.headers.get("Authorization", "")[len("Bearer ") :],
        ]
        return any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered if o)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._authorised(request):
            return web.Response(status=401, text="token required: open the URL printed at start\n")
        response = await handler(request)
        if "token" in request.query and self.token is not None:
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = "default-src 'self'; style-src 'self'"
        return response

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        if name not in self._static:
            raise web.HTTPNotFound()
        body, content_type = self._static[name]
        return web.Response(body=body, content_type=content_type)

    async def _snapshot(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=self.state.snapshot_json(), content_type="application/json")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= MAX_EVENT_CLIENTS:
            raise web.HTTPServiceUnavailable(text="too many pages open\n")
        queue: asyncio.Queue[Optional[str]] = asyncio.Queue(CLIENT_QUEUE_EVENTS)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self._clients.add(queue)
        try:
            first = "event: snapshot\ndata: " + self.state.snapshot_json() + "\n\n"
            await asyncio.wait_for(response.write(first.encode()), WRITE_TIMEOUT_S)
            while True:
                event = await queue.get()
                if event is None:
                    break
                await asyncio.wait_for(response.write(event.encode()), WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:  # not taking writes: dropped
            self.dropped_clients += 1
        except ConnectionError:  # the page went away
            pass
        finally:
            self._clients.discard(queue)
        return response

    # ------------------------------------------------------------------ broadcast

    async def _broadcast(self) -> None:
        """Once per tick: encode what changed once, queue it for every page."""
        version = -1
        while True:
            await asyncio.sleep(TICK_S)
            try:
                version, state, telemetry = self.state.take_updates(version, bool(self._clients))
            except Exception:  # the page must outlive any surprise in what it shows
                logger.exception("ui.update_failed")
                continue
            events: List[str] = []
            if state is not None:
                events.append(f"event: state\ndata: {state}\n\n")
            if telemetry is not None:
                events.append(f"event: telemetry\ndata: {telemetry}\n\n")
            if not events:
                events.append(": keep-alive\n\n")
            for queue in list(self._clients):
                for event in events:
                    try:
                        queue.put_nowait(event)
                    except asyncio.QueueFull:  # too slow: drop it, it reconnects afresh
                        self._clients.discard(queue)
                        self.dropped_clients += 1
                        queue.get_nowait()
                        queue.put_nowait(None)
                        break

    # ------------------------------------------------------------------ lifecycle

    def _app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._guard],
            client_max_size=MAX_REQUEST_BODY_BYTES,
            handler_args={"max_line_size": 4096, "max_field_size": 4096},
        )
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name:.+}", self._asset)
        app.router.add_get("/api/state", self._snapshot)
        app.router.add_get("/api/events", self._events)
        return app

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=1.0)
            loop.run_until_complete(site.start())
            if self.port == 0:
                self.port = runner.addresses[0][1]
            self._runner = runner
            broadcast = loop.create_task(self._broadcast())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            broadcast.cancel()
            for queue in list(self._clients):
                queue.put_nowait(None)
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def start(self) -> UiServer:
        self._thread = threading.Thread(target=self._serve, name="ui-server", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise UserError(f"--ui {self.host}:{self.port}: cannot listen there ({self._error})")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> UiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def banner(self) -> str:
        """The line to print once: where the page is (with the token when one is needed)."""
        if self.token is None or is_loopback(self.host):
            return f"live page: {self.url}"
        return f"live page: {self.url}?token={self.token} (the token is needed beyond loopback)"
