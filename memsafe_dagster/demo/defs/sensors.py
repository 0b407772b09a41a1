"""The memsafe run-failure sensor: explains runs that failed for lack of memory."""

from memsafe_dagster.sensors import build_memsafe_failure_sensor

memsafe_failure_sensor = build_memsafe_failure_sensor()
