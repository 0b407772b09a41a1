"""The demo's defs folder (dg's ``defs_module``): Python assets and resources, and the merges
and the memory resource declared in ``defs.yaml`` files (``memsafe_dagster.MergeComponent``,
``memsafe_dagster.MemoryResourceComponent``)."""
