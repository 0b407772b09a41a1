"""IcebergCatalogResource: the pyiceberg catalog a Dagster definition merges into and reads from.

Configured as pyiceberg itself is: a catalog ``name`` (pyiceberg's configuration for that name,
``.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__<NAME>__*`` variables, still applies) and
``properties`` merged on top, each of which may be a ``dg.EnvVar`` so credentials stay in the
environment::

    IcebergCatalogResource(
        name="lake",
        properties={
            "uri": dg.EnvVar("ICEBERG_CATALOG_URI"),
            "warehouse": "s3://lake/warehouse",
            "s3.access-key-id": dg.EnvVar("AWS_ACCESS_KEY_ID"),
            "s3.secret-access-key": dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
        },
    )

``build_merge_asset(..., target_table="ns.orders")`` merges into a table of the resource under
``catalog_resource_key`` (default ``"iceberg_catalog"``); ``ChunkedParquetIOManager`` reads an
Iceberg table through its ``iceberg_catalog`` field. pyiceberg is imported only when a catalog
is first used (the optional extra ``memsafe-dagster[iceberg]``).
"""

from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

#: The resource key a merge asset with ``target_table`` asks for unless told otherwise.
DEFAULT_CATALOG_RESOURCE_KEY = "iceberg_catalog"


class IcebergCatalogResource(dg.ConfigurableResource):
    """A pyiceberg catalog: ``name`` plus ``properties`` (see the module docstring)."""

    name: str = Field(
        default="default",
        description="Catalog name (pyiceberg's configuration for it applies too).",
    )
    properties: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Catalog properties (type, uri, warehouse, s3.endpoint, credentials, ...), merged "
            "over pyiceberg's configuration; values may be dg.EnvVar."
        ),
    )

    _catalog: Any = PrivateAttr(default=None)

    def get_catalog(self) -> Any:
        """The pyiceberg ``Catalog`` (loaded once per resource instance)."""
        if self._catalog is None:
            from memsafe_dagster.datasets.iceberg.catalog import require_pyiceberg

            require_pyiceberg("IcebergCatalogResource")
            from pyiceberg.catalog import load_catalog

            try:
                self._catalog = load_catalog(self.name, **self.properties)
            except (ValueError, KeyError) as exc:
                raise ValueError(
                    f"IcebergCatalogResource {self.name!r} could not load its catalog: {exc}"
                ) from None
        return self._catalog

    def load_table(self, identifier: str) -> Any:
        """The table ``namespace.table`` of this catalog (ValueError naming it when missing)."""
        from memsafe_dagster.datasets.iceberg.catalog import resolve_table

        return resolve_table(identifier, self.get_catalog())
