"""Headless Chromium for the web-UI tests, and a `dg dev` started and stopped by PID.

Chromium is Debian's package (`make browser` installs it: `apt-get install -y chromium`);
Playwright drives that binary. Where either is missing the tests skip, loudly.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

BIN = Path(sys.executable).parent


def chromium_path() -> str | None:
    """Debian's Chromium binary, or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """The Chromium binary; skips the test (loudly) where it or Playwright is missing."""
    path = chromium_path()
    if path is None:
        pytest.skip(
            "CHROMIUM NOT INSTALLED, web UI not checked: `make browser` "
            "(apt-get install -y chromium)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("PLAYWRIGHT NOT INSTALLED, web UI not checked: pip install playwright")
    return path


@contextmanager
def browser_page(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in headless Chromium (Debian's binary)."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            # The web UI's first-visit dialog (the community sign-up) opens at some point after
            # a page loads; whenever it covers the page, Playwright closes it before acting.
            page.add_locator_handler(
                page.get_by_text("Join the Dagster community"),
                lambda _dialog: page.get_by_role("button", name="Skip").click(),
            )
            yield page
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    # Started from a script, a process inherits SIGINT ignored; dg dev / dagster dev shut
    # their children down only on SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def dg_dev(cwd: Path, env: dict[str, str], log: Path, timeout_s: float = 180) -> Iterator[str]:
    """`dg dev` in ``cwd`` on a free loopback port; yields its base URL (see ``serving``)."""
    with serving(
        lambda port: [str(BIN / "dg"), "dev", "--host", "127.0.0.1", "--port", str(port)],
        cwd,
        {**env, "DAGSTER_DG_UPDATE_CHECK_ENABLED": "0"},
        log,
        timeout_s,
    ) as base:
        yield base


@contextmanager
def serving(
    command: Callable[[int], list[str]],
    cwd: Path,
    env: dict[str, str],
    log: Path,
    timeout_s: float = 180,
) -> Iterator[str]:
    """A Dagster web server (``command(port)``: `dg dev`, `dagster-webserver`) on a free
    loopback port; yields its base URL once /server_info answers; stopped by its PID (SIGINT,
    then SIGTERM, then its process group), whatever happened."""
    port = free_port()
    out = log.open("wb")
    proc = subprocess.Popen(
        command(port),
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    name = command(port)[0].rsplit("/", 1)[-1]
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"{name} exited:\n{log.read_text(errors='replace')[-4000:]}"
            try:
                if requests.get(f"{base}/server_info", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"{name} not up:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield base
    finally:
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 10)):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()
