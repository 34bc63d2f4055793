"""A screenshot of a web UI in headless Chromium, after clicking through it: what docs/sweeps.md's
MLflow pictures were taken with (a nested run's children show only once its row is expanded, which a
plain `chromium --screenshot` cannot do).

    .venv/bin/python benchmarks/ui_screenshot.py URL OUT.png [JS ...]

Opens URL in `chromium --headless=new` (apt's chromium) at 1600x900, waits 12 s for the page to load,
runs each JS expression in the page (4 s apart; their values are printed), and writes the PNG.
Talks to Chromium over its DevTools protocol on a loopback port, with `websockets` (a Prefect
dependency, in the venv).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harv_train.cli.startup import free_port  # noqa: E402

WIDTH, HEIGHT = 1600, 900


def screenshot(url: str, out: str, steps: list[str], load_s: float = 12.0, step_s: float = 4.0) -> None:
    port = free_port()
    profile = tempfile.mkdtemp(prefix="ui-screenshot-")  # a fresh browser: no stored UI state
    chrome = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                               f"--remote-debugging-port={port}", f"--window-size={WIDTH},{HEIGHT}",
                               f"--user-data-dir={profile}", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = _targets(port)
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=50_000_000) as ws:
            calls = iter(range(1, 1_000_000))

            def call(method: str, **params):
                number = next(calls)
                ws.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv())
                    if message.get("id") == number:
                        return message.get("result", message)

            call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            time.sleep(load_s)
            for js in steps:
                print(call("Runtime.evaluate", expression=js, returnByValue=True).get("result", {}).get("value"))
                time.sleep(step_s)
            with open(out, "wb") as file:
                file.write(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
    finally:
        chrome.kill()
        chrome.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _targets(port: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"chromium did not answer on port {port} within {timeout:.0f} s") from None
            time.sleep(0.3)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    screenshot(sys.argv[1], sys.argv[2], sys.argv[3:])
