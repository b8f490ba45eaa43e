"""Fixtures shared by the test files: the disk snapshot that proves a refused call wrote nothing, and a real browser
(Chromium) on a local HTTP server."""
import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from crossclass_nb import bad_inputs


@pytest.fixture
def snapshot():
    "`snapshot(d)`: every entry under `d`; equal before and after a refused call means nothing was written."
    return bad_inputs.snapshot


# ------------------------------------------------------------------------------ a real browser on a local server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    "Serves files without a log line per request."
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def serve():
    "`serve(folder)` -> base URL: the folder served over HTTP on a free port of 127.0.0.1 until the module ends."
    servers = []

    def start(folder) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def chromium():
    "Debian's Chromium, headless and driven by Playwright; skipped where it is missing (an error on CI, which has it)."
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (make test does)"
        if os.environ.get("CI"): raise RuntimeError(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
