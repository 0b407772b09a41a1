"""The package top: every public name imports from ``memsafe_dagster``, including the sensor
and schedule builders, ``memory_gate`` and the components (it is dg's registry module)."""

import subprocess
import sys

import memsafe_dagster


def test_every_public_name_resolves() -> None:
    for name in memsafe_dagster.__all__:
        assert getattr(memsafe_dagster, name) is not None, name


def test_what_the_readme_imports_from_the_top() -> None:
    code = (
        "from memsafe_dagster import (memory_gate, build_inbox_sensor, build_merge_schedule,"
        " build_merge_job, build_memsafe_failure_sensor, MergeComponent,"
        " MemoryResourceComponent)\n"
        "import dagster as dg\n"
        "@dg.sensor(target='*')\n"
        "@memory_gate()\n"
        "def gated(context):\n"
        "    return dg.SkipReason('calm')\n"
        "print(type(gated).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SensorDefinition"
