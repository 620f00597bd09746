"""A real headless Chromium driven over the DevTools protocol (websockets, already a dependency): load a
page, evaluate JavaScript in it, take screenshots. Debian's ``chromium`` package; no browser download.

``scripts/bootstrap.sh`` installs it when ``MICROVM_BROWSER_TESTS=1`` (CI sets it); without it the
tests that need it skip, saying so (:func:`chromium_or_skip`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from microvm_blueprint.procs import Child

from .waiting import until

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_or_skip() -> str:
    """The Chromium executable (``MICROVM_CHROMIUM`` or on ``PATH``), or skip the test saying why."""
    explicit = os.environ.get("MICROVM_CHROMIUM")
    if explicit:
        return explicit
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium for the browser test: install Debian's `chromium` (apt-get install chromium, or "
                "MICROVM_BROWSER_TESTS=1 scripts/bootstrap.sh) or point MICROVM_CHROMIUM at one")


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
                   timeout: float = 30) -> dict[str, Any]:
        """One DevTools command; its ``result`` (an ``error`` answer fails the test)."""
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        answer = await asyncio.wait_for(fut, timeout)
        assert "error" not in answer, f"{method}: {answer['error']}"
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            fut = self._waiting.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def js(self, expression: str) -> Any:
        """The value of ``expression`` in the page (promises awaited); a thrown error fails the test."""
        out = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True})
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", {"url": url})
        await until(lambda: self.js("document.readyState === 'complete'"), 30, f"{url} to load")

    async def screenshot(self, path: Path) -> Path:
        data = (await self.call("Page.captureScreenshot", {"format": "png"}))["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.asynccontextmanager
async def chromium(workdir: Path, *, width: int = 1100, height: int = 800, mobile: bool = False) -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab of that size; stopped (TERM, then KILL) and reaped after."""
    exe = chromium_or_skip()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
            "--remote-debugging-port=0", f"--user-data-dir={workdir / 'profile'}", "about:blank"]
    child = await Child.spawn(argv, workdir / "chromium.log")
    try:
        url = ""

        def listening() -> bool:
            nonlocal url
            assert child.returncode is None, child.log_tail()
            found = re.search(r"DevTools listening on (ws://\S+)", child.log_tail(100_000))
            url = found.group(1) if found else ""
            return bool(url)

        await until(listening, 60, "Chromium's DevTools endpoint")
        async with connect(url, max_size=None) as ws:
            page = Page(ws, "")
            page._reader = asyncio.create_task(page._read())
            try:
                target = (await page.call("Target.createTarget", {"url": "about:blank"}, session=False))["targetId"]
                page.session = (await page.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                                session=False))["sessionId"]
                await page.call("Page.enable")
                await page.call("Runtime.enable")
                await page.call("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
                yield page
            finally:
                page._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await page._reader
    finally:
        await child.stop(polite=None, term_grace=5)
