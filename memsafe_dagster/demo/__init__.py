"""The memsafe demo project: ``workspace.yaml`` loads ``defs``; ``memsafe demo`` runs it headless.

Settings (sizes, data directory) come from ``MEMSAFE_DEMO_*`` environment variables, read when
the definitions are imported: see ``memsafe_dagster.demo.settings``.
"""

from memsafe_dagster.demo.definitions import defs

__all__ = ["defs"]
