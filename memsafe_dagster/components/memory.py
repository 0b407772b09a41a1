"""The memory resource as YAML: ``memory:`` attributes and ``MemoryResourceComponent``.

Both take the fields of ``MemoryMonitorResource`` (the YAML model is derived from the resource,
so a field added there is accepted here). Values may be templates: ``{{ env('X') }}`` is read
when the definitions load, ``{{ env_int('X') }}`` / ``{{ env_var('X') }}`` become
``dg.EnvVar.int`` / ``dg.EnvVar`` and are read when a run starts (the resource is built here,
from the rendered values, so pydantic never coerces the EnvVar to a plain value).

Every component of a defs folder returns its own ``Definitions`` and Dagster merges them,
refusing two different objects under one resource key. So equal configurations share one
resource object (``shared_memory_resource``); a different budget needs its own key.
"""

import threading
from collections.abc import Mapping
from typing import Annotated, Any, Optional

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, create_model

from memsafe_dagster.resources import MemoryMonitorResource

_SIMPLE = (int, float, str, bool)


def _memory_model() -> type[BaseModel]:
    """The YAML model of the resource's fields: each optional, each may hold a template."""
    fields: dict[str, Any] = {}
    for name, info in MemoryMonitorResource.model_fields.items():
        annotation = info.annotation
        args = getattr(annotation, "__args__", (annotation,))
        if not all(a in _SIMPLE or a is type(None) for a in args):
            continue  # only scalar fields can be written in YAML
        fields[name] = (
            annotation | str | None,
            Field(default=None, description=info.description),
        )
    return create_model(
        "MemoryModel",
        __config__=ConfigDict(extra="forbid"),
        __doc__="MemoryMonitorResource fields; unset ones come from its profile.",
        **fields,
    )


MemoryModel = _memory_model()

_SHARED: dict[tuple, MemoryMonitorResource] = {}
_SHARED_LOCK = threading.Lock()


def _identity(value: Any) -> tuple[str, str]:
    # An EnvVar must not be read at load time (str()/int() of it raise): key it by its name.
    name = getattr(value, "env_var_name", None)
    return type(value).__name__, name if name is not None else repr(value)


def shared_memory_resource(**config: Any) -> MemoryMonitorResource:
    """The ``MemoryMonitorResource`` of ``config``: one object per distinct configuration."""
    key = tuple(sorted((name, *_identity(value)) for name, value in config.items()))
    with _SHARED_LOCK:
        resource = _SHARED.get(key)
        if resource is None:
            resource = _SHARED[key] = MemoryMonitorResource(**config)
        return resource


def memory_resource_from(
    context: dg.ResolutionContext, model: BaseModel | Mapping[str, Any] | str | None
) -> MemoryMonitorResource | None:
    """Render the templates of a ``memory:`` mapping and build (or share) its resource."""
    if model is None:
        return None
    if isinstance(model, str):  # the whole mapping as one template
        model = context.resolve_value(model)
    raw = model.model_dump(exclude_unset=True) if isinstance(model, BaseModel) else dict(model)
    values = context.resolve_value(raw)
    return shared_memory_resource(**{k: v for k, v in values.items() if v is not None})


#: A ``memory:`` attribute: the YAML mapping of ``MemoryModel``, resolved to the resource.
ResolvedMemory = Annotated[
    Optional[MemoryMonitorResource],  # noqa: UP045 (pydantic reads it at runtime)
    dg.Resolver(
        memory_resource_from,
        model_field_type=Optional[MemoryModel],  # type: ignore[valid-type]  # noqa: UP045
        description=(
            "MemoryMonitorResource fields (max_process_memory_mb, profile, ...); unset budgets "
            "come from the profile, by default the container's detected limit."
        ),
    ),
]

#: Template variables of every memsafe component: values Dagster reads when a run starts.
ENV_SCOPE: Mapping[str, Any] = {
    "env_var": dg.EnvVar,  # {{ env_var('X') }}: a string
    "env_int": dg.EnvVar.int,  # {{ env_int('X') }}: an integer
}


class MemoryResourceComponent(dg.Component, dg.Resolvable, dg.Model):
    """Provides a ``MemoryMonitorResource`` under ``resource_key`` for every component of the
    project (merge components that leave out ``memory:`` use it).

    ``memory`` takes the resource's fields (``max_process_memory_mb``, ``profile``, ...);
    ``{{ env_int('NAME') }}`` defers a value to run time.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    resource_key: str = Field(default="memory", description="Resource key to provide.")
    memory: ResolvedMemory = None

    @classmethod
    def get_additional_scope(cls) -> Mapping[str, Any]:
        return {**super().get_additional_scope(), **ENV_SCOPE}

    @classmethod
    def get_spec(cls) -> dg.ComponentTypeSpec:
        return dg.ComponentTypeSpec(
            description="Provides the MemoryMonitorResource that memsafe's merges budget with.",
            tags=["memsafe", "memory"],
            produces=["resource"],
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        resource = self.memory if self.memory is not None else shared_memory_resource()
        return dg.Definitions(resources={self.resource_key: resource})
