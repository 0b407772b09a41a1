"""In the web UI (headless Chromium), a failed memsafe run's error headline is the memsafe
message, not "Exceeded max_retries" after useless retries.

Screenshots go to ``$MEMSAFE_SCREENSHOTS`` (default: the test's temporary directory).
"""

import os
from pathlib import Path

import dagster as dg
import pytest
from browser_helpers import BIN, browser_page, require_chromium, serving

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

    def webserver(port: int) -> list[str]:
        defs = str(HERE / "dagster_defs_ui_failure.py")
        return [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-f", defs]

    log = tmp_path / "webserver.log"
    with serving(webserver, tmp_path, env, log, 120) as base, browser_page() as page:
        page.goto(f"{base}/runs/{run_id}", wait_until="networkidle", timeout=90_000)
        headline = page.get_by_text("memsafe: memory pressure EMERGENCY").first
        headline.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "failed_run.png"))
        body = page.locator("body").inner_text()
        assert "Exceeded max_retries" not in body
        assert "max_process_memory_mb 1" in body
        assert "no chunk size fits" in body
