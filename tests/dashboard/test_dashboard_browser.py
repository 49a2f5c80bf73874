"""The dashboard in a real browser: `start_dashboard` serves it, headless Chromium loads every page.

Chromium is driven over the DevTools protocol (aiohttp's websocket client), so each page is read
once it has really rendered — its text contains the expected job names and numbers and Streamlit
says it is no longer running — rather than after a guessed delay. Screenshots go to
test-artifacts/dashboard/. Nothing leaves 127.0.0.1. Skipped only when no chromium is installed
(CI installs Debian's: see .ci/run).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import batchdb
from batchdb.dashboard.run import free_port, start_dashboard

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The stack notes' flags for reliable headless rendering, plus a DevTools port on loopback.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-extensions",
    "--run-all-compositor-stages-before-draw",
    "--window-size=1400,1400",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self._ws.receive_json(timeout=60)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def text(self) -> str:
        result = await self.call(
            "Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True
        )
        return str(result["result"].get("value", ""))

    async def busy(self) -> bool:
        """Streamlit shows its status widget ("Running...") while a script run is in progress."""
        result = await self.call(
            "Runtime.evaluate",
            returnByValue=True,
            expression=(
                "!!document.querySelector('[data-testid=\"stStatusWidget\"]') || "
                "!!document.querySelector('[data-testid=\"stSkeleton\"]')"
            ),
        )
        return bool(result["result"].get("value"))

    async def clipped_tables(self) -> list[str]:
        """Tables whose columns do not all fit their frame (the grid scrolls sideways, hiding the rest)."""
        result = await self.call(
            "Runtime.evaluate",
            returnByValue=True,
            expression="""
            Array.from(document.querySelectorAll('[data-testid="stDataFrame"]')).map((frame, i) => {
                const scroller = frame.querySelector('.dvn-scroller');
                const headers = Array.from(frame.querySelectorAll('th')).map(th => th.innerText.trim());
                return {i, scroll: scroller ? scroller.scrollWidth : -1, client: scroller ? scroller.clientWidth : -1,
                        headers};
            })""",
        )
        frames = result["result"].get("value") or []
        assert frames, "no table on the page"
        return [
            f"table {f['i']} ({', '.join(f['headers'][:3])} ...): {f['scroll']} px of columns in {f['client']} px"
            for f in frames
            if f["scroll"] > f["client"] + 1
        ]

    async def load(self, url: str, expected: list[str], screenshot: Path, timeout: float = 60.0) -> str:
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            text = await self.text()
            if all(e in text for e in expected) and not await self.busy():
                break
        await asyncio.sleep(1.0)  # charts draw after the data arrives
        shot = await self.call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return await self.text()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium with a DevTools websocket on 127.0.0.1; yields the page's websocket URL."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = (ARTIFACTS / "chromium.log").open("wb")
    process = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],  # type: ignore[list-item]
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


async def visit_all(
    devtools: str, pages: list[tuple[str, str, list[str]]], clipped: dict[str, list[str]]
) -> dict[str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{devtools}/json/list") as reply:
            targets = json.loads(await reply.text())
        page = next(t for t in targets if t["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as ws:
            browser = Browser(ws)
            await browser.call("Page.enable")
            texts = {}
            for name, url, expected in pages:
                texts[name] = await browser.load(url, expected, ARTIFACTS / f"{name}.png")
                clipped[name] = await browser.clipped_tables()
            return texts


def test_every_page_in_a_real_browser(seeded, sql, chromium: str, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    batchdb.Job(seeded.beta, dsn=seeded.dsn).to_parquet(outputs / f"job-{seeded.beta}.parquet")
    alpha = sql.one(
        "SELECT n_succeeded, n_failed, n_dead, cost_usd FROM batchdb.jobs WHERE id = %(j)s", {"j": seeded.alpha}
    )
    totals = sql.one("SELECT sum(cost_usd) AS c, sum(n_done) AS done FROM batchdb.jobs")
    total, done = totals["c"], totals["done"]
    dashboard = start_dashboard(
        seeded.dsn, port=free_port(), outputs_dir=outputs, refresh_seconds=30, log_path=ARTIFACTS / "streamlit.log"
    )
    try:
        url = dashboard.url
        pages = [
            (
                "overview",
                f"{url}/",
                [
                    "Active jobs",
                    "Workers alive",
                    "#1 headlines-alpha · running · 40 / 50 rows",
                    "#3 backfill-gamma",
                    "Provider keys",
                ],
            ),
            ("jobs", f"{url}/jobs", [f"3 of 3 jobs · {done:,} rows done · cost ${total:,.4f}"]),
            (
                "job_detail",
                f"{url}/job?job={seeded.alpha}",
                [
                    "#1 headlines-alpha",
                    "Progress over time",
                    "Errors by class",
                    f"{alpha['n_failed']} / {alpha['n_dead']}",
                    f"{alpha['n_succeeded']}",
                    f"${alpha['cost_usd']:,.4f}",
                ],
            ),
            ("providers", f"{url}/providers", ["openai/default/gpt-4o-mini", "Limits and pacing"]),
            ("cost", f"{url}/cost", ["Total cost", f"${total:,.4f}", "Estimated cost of queued work"]),
        ]
        clipped: dict[str, list[str]] = {}
        texts = asyncio.run(visit_all(chromium, pages, clipped))
    finally:
        dashboard.stop()
    for name, _, expected in pages:
        missing = [e for e in expected if e not in texts[name]]
        assert not missing, f"{name}: {missing} not in page text:\n{texts[name][:3000]}"
        assert "Traceback" not in texts[name] and "database" not in texts[name].split("Database:")[0], texts[name]
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 20_000
        # At a 1,400 px window every column of every table shows: none is cut off on the right.
        assert clipped[name] == [], (name, clipped[name])
        assert "NaN" not in texts[name], name
