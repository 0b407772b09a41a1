"""The demo's Definitions, loaded from its defs folder (``memsafe_dagster.demo.defs``) the way
dg loads a project: a daily orders pipeline streamed in chunks into a warehouse, and an inbox
of CRM exports merged into a customers table. ``dg dev`` (``make ui``), ``workspace.yaml``
(``dagster dev``) and ``memsafe demo`` all load this module.

    orders_raw (generated chunk by chunk) -> orders_clean (ChunkStream -> ChunkStream)
        -> warehouse_orders (MergeComponent: upsert by order_id, one partition per run)
    inbox/customers/*.parquet -> warehouse_customers (MergeComponent: upsert by customer_id)

Plus the daily schedule of ``orders_job`` and the inbox sensor (both declared with their
merge in ``defs.yaml``) and the memsafe run-failure sensor. Sizes and places:
``memsafe_dagster.demo.settings``.
"""

import warnings
from pathlib import Path

import dagster as dg

from memsafe_dagster.demo import defs as defs_folder

# The project root dg sees in a checkout (pyproject.toml's [tool.dg]); installed from a wheel
# it is site-packages, which the demo's YAML does not use.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def build_defs() -> dg.Definitions:
    """The demo's Definitions from its defs folder (Dagster's loader warns that parts of it
    are beta or preview; the demo's output stays readable without that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        tree = dg.ComponentTree.from_module(defs_module=defs_folder, project_root=PROJECT_ROOT)
        return tree.build_defs()


defs = build_defs()


def orders_job_def() -> dg.JobDefinition:
    """The resolved orders job (for ``build_reconstructable_job``)."""
    return defs.resolve_job_def("orders_job")


def customers_job_def() -> dg.JobDefinition:
    """The resolved customers job (for ``build_reconstructable_job``)."""
    return defs.resolve_job_def("customers_job")
