"""Open an HTML file in headless Chromium through the DevTools protocol over pipes (no extra packages):
collect console errors, uncaught exceptions, failed loads and network requests, and take a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """The chromium binary, installing the Debian package when missing; ``(None, reason)`` if impossible."""
    path = find_chromium()
    if path:
        return path, ""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None, "chromium is not installed and cannot be installed here (needs apt-get as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "install", "-y", "-q", "chromium"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode == 0 and command[1] == "install":
            break
    path = find_chromium()
    return (path, "") if path else (None, f"`apt-get install chromium` failed: {result.stderr[-400:]}")


def _move_fds(read_end: int, write_end: int) -> None:
    """In the child: put the pipe ends at fds 3 and 4 (via high fds, so neither clobbers the other)."""
    high_read, high_write = os.dup2(read_end, 200), os.dup2(write_end, 201)
    os.dup2(high_read, 3)
    os.dup2(high_write, 4)


class _Pipe:
    def __init__(self, binary: str, profile: str):
        to_browser_r, self._write = os.pipe()
        self._read, from_browser_w = os.pipe()
        import warnings

        with warnings.catch_warnings():  # fork+exec right away: the fds must be 3 and 4 in the child
            warnings.simplefilter("ignore", RuntimeWarning)
            self.process = self._start(binary, profile, to_browser_r, from_browser_w)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    @staticmethod
    def _start(binary: str, profile: str, to_browser_r: int, from_browser_w: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--no-first-run",
                "--disable-extensions",
                "--window-size=1280,1600",
                "about:blank",
            ],
            pass_fds=(3, 4),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _move_fds(to_browser_r, from_browser_w),
        )

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def _next(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no message from chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while time.monotonic() < deadline:
            event = self._next(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event
        raise TimeoutError(method)

    def close(self) -> None:
        try:
            os.write(self._write, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)


def open_page(binary: str, path: Path, settle: float = 0.5) -> dict:
    """Load ``path`` and return ``{"console_errors", "requests", "screenshot" (PNG bytes)}``."""
    with tempfile.TemporaryDirectory(prefix="flaxcam-chromium-") as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
            pipe.wait_event("Page.loadEventFired")
            time.sleep(settle)
            pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush pending events
            shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
            errors, requests = [], []
            for event in pipe.events:
                method, params = event.get("method"), event.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    errors.append(params["exceptionDetails"].get("exception", {}).get("description", str(params)))
                elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                    errors.append(params["entry"].get("text", ""))
                elif method == "Network.loadingFailed":
                    errors.append(f"failed load: {params.get('errorText')}")
                elif method == "Network.requestWillBeSent":
                    requests.append(params["request"]["url"])
            return {"console_errors": errors, "requests": requests, "screenshot": base64.b64decode(shot["data"])}
        finally:
            pipe.close()
