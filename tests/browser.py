"""Headless Chromium for the report tests, driven over the DevTools protocol on a pipe (no port,
no download, nothing beyond Debian's `chromium` package and the standard library).

`Chromium.start()` launches the browser with `--remote-debugging-pipe` (it reads commands on fd
3 and writes answers and events on fd 4, each a JSON message ended by a NUL byte); `open()`
loads a file in a fresh tab and records console errors, uncaught exceptions and every request
the page makes, so a test can assert that a report drew, said nothing wrong and fetched nothing.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "UNDRAWN", "Chromium", "Page", "find_chromium"]

# The figures of a report page that did not draw into their own chart <div> (an empty list
# when every one did).
UNDRAWN = """Array.from(document.querySelectorAll('script[data-figure]'), s => s.dataset.figure)
  .filter(id => {
    const d = document.getElementById(id);
    return !(d && d.classList.contains('chart') && d.querySelector('.main-svg'));
  })"""

CHROMIUM = "/usr/bin/chromium"
# Flags from the brief: no sandbox (root in CI), no GPU, and nothing that phones home.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """The Chromium binary, or None (the tests then skip and say how to get it)."""
    for candidate in (os.environ.get("CHROMIUM"), CHROMIUM, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class BrowserError(RuntimeError):
    pass


@dataclass
class Page:
    """One tab: its session, and what it said and asked for since it was opened."""

    browser: Chromium
    session: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JS expression (awaited if it is a promise); JS errors raise."""
        got = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in got:
            raise BrowserError(f"{expression[:80]}: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Poll until the expression is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s} s waiting for {expression}")
            self.browser.pump(0.1)

    def wait_for_charts(self, timeout_s: float = 30.0) -> int:
        """Wait until a report page's glue says every chart has drawn; how many. Raises when
        drawing failed, or a chart is missing or drew anywhere but into its own <div>."""
        drawn = self.wait_for("document.documentElement.dataset.charts", timeout_s)
        islands = self.evaluate("document.querySelectorAll('script[data-figure]').length")
        if drawn == "failed" or int(drawn) != islands:
            raise BrowserError(f"{drawn} of {islands} charts drew: {self.errors}")
        undrawn = self.evaluate(UNDRAWN)
        if undrawn:
            raise BrowserError(f"charts not drawn into their own <div>: {undrawn}")
        return int(drawn)

    def screenshot(self, path: Path, full_page: bool = True, top: float | None = None,
                   height: float | None = None) -> Path:
        """The whole page, the viewport, or (`top`, `height`) a band of the page."""
        params: dict[str, Any] = {"format": "png"}
        if top is not None:
            width = self.evaluate("document.documentElement.scrollWidth")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": top, "width": width,
                                "height": height or self.browser.height, "scale": 1})
        elif full_page:
            width, height = self.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        data = self.send("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.browser.close_page(self)


class Chromium:
    """One browser process; `open()` as many tabs as needed; `close()` ends it."""

    def __init__(self, binary: str, profile: Path, width: int = 1366, height: int = 900) -> None:
        self.binary, self.profile = binary, profile
        self.width, self.height = width, height
        self._next_id = 0
        self._buffer = b""
        self._pages: dict[str, Page] = {}
        self._targets: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Chromium:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]

        def fds_3_and_4() -> None:  # in the child, before exec: the pipe ends on 3 and 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=fds_3_and_4)
        for fd in (to_browser_r, from_browser_w, *high):
            os.close(fd)
        self.send("Target.setDiscoverTargets", {"discover": False})
        return self

    # ---- the protocol
    def _write(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], timeout_s)
            if not ready:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def _event(self, message: dict[str, Any]) -> None:
        page = self._pages.get(message.get("sessionId", ""))
        if page is None:
            return
        method, params = message["method"], message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            page.errors.append("console: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            page.errors.append("exception: " + str(
                details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            page.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            page.requests.append(params["request"]["url"])

    def pump(self, timeout_s: float) -> None:
        """Handle the events that arrive within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            message = self._read(left)
            if message is None:
                return
            if "method" in message:
                self._event(message)

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._write(message)
        deadline = time.monotonic() + timeout_s
        while True:
            got = self._read(max(0.0, deadline - time.monotonic()))
            if got is None:
                raise BrowserError(f"{method}: no answer in {timeout_s} s")
            if got.get("id") == ident:
                if "error" in got:
                    raise BrowserError(f"{method}: {got['error']}")
                result: dict[str, Any] = got.get("result", {})
                return result
            if "method" in got:
                self._event(got)

    # ---- pages
    def open(self, path: Path, timeout_s: float = 60.0) -> Page:
        """A new tab showing `path`, loaded (the load event fired)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        page = Page(self, session)
        self._pages[session] = page
        self._targets[session] = target
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=path.resolve().as_uri())
        page.wait_for("document.readyState === 'complete'", timeout_s)
        return page

    def close_page(self, page: Page) -> None:
        target = self._targets.pop(page.session)
        self._pages.pop(page.session, None)
        self.send("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.send("Browser.close", timeout_s=5)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self.proc = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.browser PAGE.html SHOT.png [--height PX] [--width PX] [--from ID]`: a
    screenshot of a report as it first appears, or from one section down (the README's
    pictures), after every chart has drawn."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("page", type=Path)
    parser.add_argument("shot", type=Path)
    parser.add_argument("--width", type=int, default=1366)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--from", dest="start", metavar="ID",
                        help="start at the element with this id instead of the top")
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        raise SystemExit("headless Chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile, \
            Chromium(binary, Path(profile), args.width, args.height) as browser:
        page = browser.open(args.page)
        page.wait_for_charts()
        top = None
        if args.start:
            top = page.evaluate(f"document.getElementById({json.dumps(args.start)})"
                                ".getBoundingClientRect().top + window.scrollY - 8")
        page.screenshot(args.shot, full_page=False, top=top, height=args.height)
    print(f"wrote {args.shot}")


if __name__ == "__main__":
    main()
