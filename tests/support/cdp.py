"""A small Chrome DevTools Protocol driver for headless Chromium, over aiohttp's websocket.

    async with await Browser.launch("/usr/bin/chromium", user_data_dir) as browser:
        page = await browser.new_page()
        await page.navigate("http://127.0.0.1:8188/")
        value = await page.evaluate("1 + 1")
        await page.screenshot("out.png")
        page.console_errors()   # console.error calls, uncaught exceptions, failed requests

One websocket to the browser; pages are attached targets addressed by session id (flat mode).
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import signal
import subprocess

import aiohttp


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, process: subprocess.Popen, ws_url: str):
        self.process = process
        self.ws_url = ws_url
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._sessions: dict[str, Page] = {}
        self._http = None
        self._ws = None
        self._reader = None

    @classmethod
    async def launch(cls, executable: str, user_data_dir: str, width: int = 1600, height: int = 1000,
                     timeout: float = 30.0) -> "Browser":
        """Start Chromium headless in its own process group; read its DevTools address from stderr."""
        args = [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-port=0", f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--mute-audio", "about:blank"]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        loop = asyncio.get_running_loop()
        lines: list[str] = []

        def read_address():
            for raw in process.stderr:
                line = raw.decode(errors="replace").strip()
                lines.append(line)
                match = re.search(r"DevTools listening on (ws://\S+)", line)
                if match:
                    return match.group(1)
            return None

        try:
            ws_url = await asyncio.wait_for(loop.run_in_executor(None, read_address), timeout)
        except asyncio.TimeoutError:
            ws_url = None
        if not ws_url:
            _kill_group(process)
            raise CDPError("Chromium did not report a DevTools address:\n" + "\n".join(lines[-20:]))
        # keep draining stderr so that Chromium never blocks on a full pipe
        loop.run_in_executor(None, _drain, process.stderr)
        browser = cls(process, ws_url)
        await browser._connect()
        return browser

    async def _connect(self):
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(self.ws_url, max_msg_size=0, heartbeat=None)
        self._reader = asyncio.create_task(self._read())

    async def _read(self):
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        if "error" in data:
                            future.set_exception(CDPError(f"{data['error'].get('message')} {data['error'].get('data', '')}"))
                        else:
                            future.set_result(data.get("result", {}))
                elif "method" in data:
                    page = self._sessions.get(data.get("sessionId"))
                    if page is not None:
                        page._on_event(data["method"], data.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("the DevTools connection closed"))

    async def send(self, method: str, params: dict | None = None, session_id: str | None = None,
                   timeout: float = 60.0) -> dict:
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        await self._ws.send_str(json.dumps(message))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(message_id, None)
            raise CDPError(f"{method}: no answer in {timeout} s") from None

    async def new_page(self, width: int = 1600, height: int = 1000) -> "Page":
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"], target["targetId"])
        self._sessions[page.session_id] = page
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    async def close(self):
        try:
            if self._ws is not None and not self._ws.closed:
                try:
                    await asyncio.wait_for(self.send("Browser.close", timeout=5), 5)
                    # let Chromium end (and reap) its helper processes itself
                    await asyncio.get_running_loop().run_in_executor(None, self.process.wait, 5)
                except (CDPError, asyncio.TimeoutError, ConnectionError, subprocess.TimeoutExpired):
                    pass
                await self._ws.close()
            if self._reader is not None:
                self._reader.cancel()
            if self._http is not None:
                await self._http.close()
        finally:
            _kill_group(self.process)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class Page:
    def __init__(self, browser: Browser, session_id: str, target_id: str):
        self.browser = browser
        self.session_id = session_id
        self.target_id = target_id
        self.console: list[dict] = []      # {"level", "text", "source"}
        self._load_event = asyncio.Event()

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0):
        return self.browser.send(method, params, self.session_id, timeout)

    def _on_event(self, method: str, params: dict):
        if method == "Page.loadEventFired":
            self._load_event.set()
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            self.console.append({"level": params.get("type"), "text": text, "source": "console"})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append({"level": "error", "text": text, "source": "exception"})
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append({"level": entry.get("level"), "text": f"{entry.get('text', '')} {entry.get('url', '')}".strip(),
                                 "source": entry.get("source", "log")})

    def console_errors(self) -> list[str]:
        return [f"[{m['source']}] {m['text']}" for m in self.console if m["level"] == "error"]

    async def navigate(self, url: str, timeout: float = 60.0):
        self._load_event.clear()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {result['errorText']}")
        await asyncio.wait_for(self._load_event.wait(), timeout)

    async def evaluate(self, expression: str, timeout: float = 60.0):
        """The JSON value of a JavaScript expression (promises are awaited); page exceptions raise CDPError."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"page exception: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.2):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise CDPError(f"timed out after {timeout} s waiting for: {expression}")
            await asyncio.sleep(interval)

    async def screenshot(self, path: str):
        data = await self.send("Page.captureScreenshot", {"format": "png"})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))
        return path


def _remote_text(obj: dict) -> str:
    if "value" in obj:
        return str(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "")


def _drain(stream):
    try:
        for _ in stream:
            pass
    except (OSError, ValueError):
        pass


def _kill_group(process: subprocess.Popen):
    """End Chromium's process group (its own session): the browser and any helper left behind."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
