"""Which Iceberg table is meant: a pyiceberg ``Table``, or an identifier in a catalog.

A catalog is a pyiceberg ``Catalog`` object or a name that pyiceberg's own configuration
resolves (``.pyiceberg.yaml`` in ``$PYICEBERG_HOME``, ``~`` or the working directory, and
``PYICEBERG_CATALOG__<NAME>__<KEY>`` environment variables, read when pyiceberg is first
imported). pyiceberg is imported here, so only callers that need a table load this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

INSTALL_HINT = "install the optional extra: pip install 'memsafe-dagster[iceberg]'"


def require_pyiceberg(what: str) -> None:
    """ImportError naming ``what`` and the extra to install when pyiceberg is missing."""
    try:
        import pyiceberg  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{what} needs pyiceberg: {INSTALL_HINT}") from exc


def resolve_catalog(catalog: Catalog | str | None) -> Catalog:
    """``catalog`` itself, or the catalog pyiceberg's configuration names (None: its default)."""
    require_pyiceberg("an Iceberg catalog")
    from pyiceberg.catalog import Catalog, load_catalog

    if isinstance(catalog, Catalog):
        return catalog
    if catalog is not None and not isinstance(catalog, str):
        raise TypeError(
            f"catalog must be a pyiceberg Catalog or a catalog name, got {type(catalog).__name__}"
        )
    try:
        return load_catalog(catalog)
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"Iceberg catalog {catalog or '(default)'!r} could not be loaded from pyiceberg's "
            "configuration (.pyiceberg.yaml in $PYICEBERG_HOME, ~ or the working directory, or "
            f"PYICEBERG_CATALOG__<NAME>__* environment variables): {exc}"
        ) from None


def resolve_table(
    table: Table | str | Sequence[str], catalog: Catalog | str | None = None
) -> Table:
    """The writable ``Table``: ``table`` itself, or the identifier loaded from ``catalog``."""
    require_pyiceberg("an Iceberg table")
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
    from pyiceberg.table import StaticTable, Table

    if isinstance(table, StaticTable):
        raise ValueError(
            "a StaticTable is read-only (it has no catalog to commit to): load the table from "
            "its catalog"
        )
    if isinstance(table, Table):
        if catalog is not None:
            raise ValueError("catalog is only used with a table identifier, not with a Table")
        return table
    if isinstance(table, str):
        if not table.strip() or "." not in table.strip("."):
            raise ValueError(f"Iceberg table identifier must be 'namespace.table', got {table!r}")
    elif not (
        isinstance(table, (list, tuple)) and table and all(isinstance(p, str) for p in table)
    ):
        raise TypeError(
            "table must be a pyiceberg Table or an identifier 'namespace.table', got "
            f"{type(table).__name__}"
        )
    resolved = resolve_catalog(catalog)
    try:
        return resolved.load_table(table if isinstance(table, str) else tuple(table))
    except (NoSuchTableError, NoSuchNamespaceError) as exc:
        raise ValueError(
            f"Iceberg table {_name(table)!r} does not exist in catalog {resolved.name!r}: "
            f"create it first (catalog.create_table(identifier, schema=...)); {exc}"
        ) from None


def table_name(table: Table) -> str:
    """``namespace.table`` of a loaded table (for messages and metadata)."""
    return ".".join(table.name())


def _name(identifier: Any) -> str:
    return identifier if isinstance(identifier, str) else ".".join(identifier)
