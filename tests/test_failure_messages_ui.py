"""In the web UI (headless Chromium), a failed memsafe run's error headline is the memsafe
message, not "Exceeded max_retries" after useless retries.

Screenshots go to ``$MEMSAFE_SCREENSHOTS`` (default: the test's temporary directory).
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import requests
from browser_helpers import BIN, _default_sigint, browser_page, free_port, require_chromium

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


def test_a_failed_memsafe_run_reads_as_the_memsafe_message_in_the_ui(tmp_path: Path) -> None:
    require_chromium()
    shots = Path(os.environ.get("MEMSAFE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with dg.DagsterInstance.from_config(str(home)) as instance:
        import dagster_defs_ui_failure as module

        job = module.defs.resolve_job_def("doomed_job")
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        run_id = result.run_id

    port = free_port()
    log = (tmp_path / "webserver.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "dagster-webserver"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-f",
            str(HERE / "dagster_defs_ui_failure.py"),
        ],
        cwd=str(tmp_path),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/server_info", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "webserver not up"
            time.sleep(0.5)
        with browser_page() as page:
            page.goto(f"{base}/runs/{run_id}", wait_until="networkidle", timeout=90_000)
            headline = page.get_by_text("memsafe: memory pressure EMERGENCY").first
            headline.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "failed_run.png"))
            body = page.locator("body").inner_text()
            assert "Exceeded max_retries" not in body
            assert "max_process_memory_mb 1" in body
            assert "no chunk size fits" in body
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
