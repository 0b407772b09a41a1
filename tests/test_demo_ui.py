"""The demo in the web UI, in headless Chromium, as a user opens it after `make demo` three
times: the warehouse asset's default plots show the memory series per partition, the catalog
reads "3 partitions" with none missing, and no asset-check record is "Skipped".

Screenshots go to ``$MEMSAFE_SCREENSHOTS`` (default: the test's temporary directory).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser_helpers import browser_page, dg_dev, require_chromium

REPO = Path(__file__).resolve().parent.parent
MEMSAFE = Path(sys.executable).parent / "memsafe"

pytestmark = pytest.mark.slow

MEMORY_SERIES = ("memsafe/peak_rss_mb", "memsafe/headroom_mb", "memsafe/limit_mb")


def test_after_three_demo_runs_the_ui_plots_memory_and_no_check_is_skipped(tmp_path: Path) -> None:
    require_chromium()
    shots = Path(os.environ.get("MEMSAFE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "demo"
    env = {
        **os.environ,
        "MEMSAFE_DEMO_DATA": str(data),
        "MEMSAFE_DEMO_ORDERS_PER_DAY": "5000",
        "MEMSAFE_DEMO_CUSTOMERS": "500",
        "MEMSAFE_DEMO_CHUNK_ROWS": "1500",
        "MEMSAFE_DEMO_SENSOR_INTERVAL": "3600",
    }
    for name in ("DAGSTER_HOME", "MEMSAFE_DEMO_START_DATE", "MEMSAFE_DEMO_DAYS"):
        env.pop(name, None)
    for _ in range(3):  # what `make demo` runs, three times
        run = subprocess.run(
            [str(MEMSAFE), "demo"], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    env["DAGSTER_HOME"] = str(data / "dagster_home")

    with dg_dev(REPO, env, tmp_path / "dg-dev.log") as base, browser_page(height=3200) as page:
        # The asset page's metadata plots (the default view is by partition).
        page.goto(f"{base}/assets/warehouse_orders", wait_until="networkidle", timeout=90_000)
        page.get_by_role("button", name="Plots").first.click()
        page.get_by_text(MEMORY_SERIES[0], exact=True).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "warehouse_orders_plots.png"))
        text = page.locator("body").inner_text()
        for series in MEMORY_SERIES:
            assert series in text, series
        # Three partitions plotted: the demo's days are the partitions that exist.
        plots = page.locator("canvas")
        assert plots.count() >= len(MEMORY_SERIES)

        # Every check record is a result for its partition: none "Skipped".
        page.set_viewport_size({"width": 1400, "height": 1400})
        for check in ("memory_headroom", "unique_keys"):
            page.goto(f"{base}/assets/warehouse_orders?view=checks", wait_until="networkidle")
            page.get_by_text(check, exact=True).first.click()
            page.get_by_text("Execution history", exact=True).click()
            page.get_by_text("Passed").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / f"check_{check}_history.png"))
            history = page.locator("body").inner_text()
            assert "Skipped" not in history, check
            assert history.count("Passed") >= 9, (check, history.count("Passed"))  # 3 x 3 days

        # The catalog: every partitioned asset has its 3 partitions, none missing.
        page.goto(f"{base}/assets", wait_until="networkidle")
        page.get_by_text("warehouse_orders", exact=True).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "catalog.png"))
        catalog = page.locator("body").inner_text()
        assert catalog.count("3 partitions") == 3 and "missing" not in catalog.lower()
