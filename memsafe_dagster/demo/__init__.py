"""The memsafe demo project, a dg project (``[tool.dg]`` in pyproject.toml): its definitions
are ``memsafe_dagster.demo.definitions.defs``, built from the defs folder
``memsafe_dagster.demo.defs``; ``memsafe demo`` runs it headless, ``memsafe demo --ui`` /
``make ui`` serve it in the web UI.

Settings (sizes, data directory, first day) come from ``MEMSAFE_DEMO_*`` environment
variables, read when the definitions are imported: see ``memsafe_dagster.demo.settings``.
"""
