"""The README's Iceberg example runs as written and prints what the README says it prints."""

import re
import subprocess
import sys
from pathlib import Path

from iceberg_helpers import child_env

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_iceberg_example_prints_what_it_says(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    [example] = [b for b in blocks if "merge_iceberg(" in b]
    run = subprocess.run(
        [sys.executable, "-c", example],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["1 1 True", "2"]
    assert (tmp_path / "lake.db").exists() and (tmp_path / "warehouse" / "sales").is_dir()
