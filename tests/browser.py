"""Headless Debian chromium driven over the DevTools protocol (aiohttp's websocket client):
open a page, evaluate JavaScript, take a screenshot. Enough for the live page's tests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
]


class Browser:
    """`async with Browser(url) as page: await page.evaluate("1 + 1")`."""

    def __init__(self, url: str, width: int = 1280, height: int = 1000) -> None:
        assert CHROMIUM is not None, "chromium is not installed (scripts/setup.sh --test)"
        self.url = url
        self.size = f"--window-size={width},{height}"
        self._ids = itertools.count(1)
        self._profile = tempfile.TemporaryDirectory(prefix="jetfed-chromium-")
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._ws: Optional[aiohttp.ClientWebSocketResponse] = None

    async def __aenter__(self) -> Browser:
        profile = Path(self._profile.name)
        command = [CHROMIUM, *FLAGS, self.size, f"--user-data-dir={profile}", self.url]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        port_file = profile / "DevToolsActivePort"
        while not port_file.exists() or not port_file.read_text().strip():
            assert self._process.poll() is None, "chromium exited at start"
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        self._session = aiohttp.ClientSession()
        while True:
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = [t for t in await response.json() if t.get("type") == "page"]
            if targets:
                break
            await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(
            targets[0]["webSocketDebuggerUrl"], max_msg_size=0
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._profile.cleanup()

    async def call(self, method: str, **params: Any) -> Dict[str, Any]:
        assert self._ws is not None
        message_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads((await self._ws.receive()).data)
            if reply.get("id") == message_id:
                assert "error" not in reply, reply["error"]
                return dict(reply["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 120.0) -> Any:
        """The page's own state, read until `expression` is truthy (an error counts as not yet:
        the page may still be loading); the page updates itself from server-sent events, there
        is nothing else to wait on from outside."""
        deadline = time.monotonic() + timeout_s
        while True:
            guarded = f"(() => {{ try {{ return {expression}; }} catch {{ }} }})()"
            value = await self.evaluate(guarded)
            if value:
                return value
            assert time.monotonic() < deadline, f"page never satisfied: {expression}"
            await asyncio.sleep(0.25)

    async def screenshot(self, path: Path) -> None:
        result = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))
