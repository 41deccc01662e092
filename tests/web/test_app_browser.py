"""A real browser opens a landing page, presses the button and saves the file.

Headless Chromium is driven over its DevTools protocol (a websocket):
downloads are allowed into a temp folder, the landing page is opened, the
download button is clicked, and the saved file must equal the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.web.conftest import WebEnv

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="headless Chromium (/usr/bin/chromium) absent"
    ),
]

LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class DevTools:
    """A minimal DevTools-protocol client: commands by id, events into a queue."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                await self.events.put(data)
        for future in self._pending.values():
            future.set_exception(ConnectionError("DevTools connection closed"))

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps(message))
        reply = await future
        assert "error" not in reply, reply
        result: dict[str, Any] = reply["result"]
        return result

    async def evaluate(self, session: str, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session,
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_event(self, method: str, **match: Any) -> dict[str, Any]:
        while True:
            event = await self.events.get()
            params: dict[str, Any] = event.get("params", {})
            if event.get("method") == method and all(params.get(k) == v for k, v in match.items()):
                return params

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[str]:
    """Start headless Chromium; yield its browser websocket URL once it listens."""
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    drain: asyncio.Task[None] | None = None
    try:
        seen = b""
        while (match := LISTENING.search(seen)) is None:
            line = await stderr.readline()
            if not line:
                raise RuntimeError(
                    f"chromium exited before listening: {seen.decode(errors='replace')}"
                )
            seen += line

        async def discard() -> None:
            # Keep reading so a chatty browser never blocks on a full pipe.
            while await stderr.read(65536):
                pass

        drain = asyncio.create_task(discard())
        yield match.group(1).decode()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


async def test_browser_downloads_the_file_from_the_landing_page(
    web_env: WebEnv, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    name = "Résumé «final».pdf"
    token = await web_env.add_file(data, filename=name, content_type="application/pdf")
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    async with (
        asyncio.timeout(20),
        chromium(tmp_path / "profile") as ws_url,
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url, max_msg_size=0) as ws,
    ):
        cdp = DevTools(ws)
        try:
            await cdp.call(
                "Browser.setDownloadBehavior",
                {"behavior": "allow", "downloadPath": str(downloads), "eventsEnabled": True},
            )
            target = await cdp.call("Target.createTarget", {"url": "about:blank"})
            attached = await cdp.call(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )
            page = attached["sessionId"]
            await cdp.call("Page.enable", session=page)
            # A phone-sized screen: the page must fit without sideways scrolling.
            await cdp.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True},
                page,
            )
            await cdp.call("Page.navigate", {"url": web_env.page_url(token)}, page)
            await cdp.wait_event("Page.loadEventFired")
            assert await cdp.evaluate(page, "location.href") == web_env.page_url(token)
            heading = await cdp.evaluate(page, "document.querySelector('h1').textContent")
            assert heading == name
            button = await cdp.evaluate(page, "document.querySelector('a.download').href")
            assert button == web_env.file_url(token)
            assert await cdp.evaluate(page, "document.documentElement.scrollWidth") <= 360
            button_width = await cdp.evaluate(
                page, "document.querySelector('a.download').getBoundingClientRect().width"
            )
            assert button_width >= 250  # a full-width button, easy to tap

            await cdp.evaluate(page, "document.querySelector('a.download').click()")
            begun = await cdp.wait_event("Browser.downloadWillBegin")
            assert begun["suggestedFilename"] == name
            await cdp.wait_event("Browser.downloadProgress", guid=begun["guid"], state="completed")
        finally:
            await cdp.close()

    saved = downloads / name
    assert saved.is_file(), sorted(p.name for p in downloads.iterdir())
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await web_env.download_count(token) == 1
