"""Schema conformance: which casts keep a value's meaning, and casting columns by those rules.

Every Arrow type has a *kind* (``type_kind``: number, string, binary, timestamp, timestamp-tz,
date, ...). A cast across kinds changes what a value means (string -> int, date -> timestamp,
naive -> tz-aware) and is refused everywhere. Within a kind there are two rules:

- ``is_lossless_cast``: the type pair itself loses nothing (int32 -> int64, int -> float,
  float32 -> float64, decimal widening, string offset widths, ...). Streams and writers
  (``ChunkStream``, ``ChunkedParquetWriter``) hold chunks to it: a chunk that needs anything
  else is a mistake upstream.
- ``same_kind``: any pair of one kind. The merge casts a source into an existing target's types
  by it (int64 -> int32, float64 -> decimal), because the target's types are fixed.

Either way the cast itself checks the values (``cast_column``: an int64 holding 2**40 never
becomes int32), and every refusal is a ``ValueError`` naming the column.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


def record_batches(item: object) -> list[pa.RecordBatch] | None:
    """The batches of a ``pa.Table`` or ``pa.RecordBatch`` (zero-copy); None for anything else."""
    if isinstance(item, pa.Table):
        return item.to_batches()
    if isinstance(item, pa.RecordBatch):
        return [item]
    return None


# -- the rules ------------------------------------------------------------------------------------


def _is_view(t: pa.DataType, what: str) -> bool:
    check = getattr(pa.types, f"is_{what}_view", None)  # PyArrow >= 16
    return bool(check and check(t))


def type_kind(t: pa.DataType) -> str:
    """A coarse kind (dictionaries by their values): no cast keeps its meaning across kinds."""
    types = pa.types
    if types.is_dictionary(t):
        return type_kind(t.value_type)
    if types.is_null(t):
        return "null"
    if types.is_boolean(t):
        return "bool"
    if types.is_integer(t) or types.is_floating(t) or types.is_decimal(t):
        return "number"
    if types.is_string(t) or types.is_large_string(t) or _is_view(t, "string"):
        return "string"
    if (
        types.is_binary(t)
        or types.is_large_binary(t)
        or types.is_fixed_size_binary(t)
        or _is_view(t, "binary")
    ):
        return "binary"
    if types.is_timestamp(t):
        return "timestamp" if t.tz is None else "timestamp-tz"
    if types.is_date(t):
        return "date"
    if types.is_time(t):
        return "time"
    if types.is_duration(t):
        return "duration"
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t):
        return "list"
    if types.is_struct(t):
        return "struct"
    if types.is_map(t):
        return "map"
    return f"other:{t}"


def same_kind(src: pa.DataType, dst: pa.DataType) -> bool:
    """True when ``src`` values keep their meaning as ``dst`` (null casts to anything)."""
    kind = type_kind(src)
    return kind == "null" or kind == type_kind(dst)


def is_lossless_cast(src: pa.DataType, dst: pa.DataType) -> bool:
    """True when every ``src`` value can become a ``dst`` value with nothing lost or reinterpreted.

    Allowed: integer to integer and integer to float (values are range-checked by the cast),
    float widening, string/binary/list offset widths, dictionary decoding, timestamp, date
    and time unit changes (values checked), decimal widening, null to anything, and structs,
    lists and maps whose children cast losslessly. Never: float narrowing, string <-> number,
    bool <-> number, naive <-> timezone-aware timestamps (nothing across kinds).
    """
    types = pa.types
    if src.equals(dst) or types.is_null(src):
        return True
    if types.is_dictionary(src):
        return is_lossless_cast(src.value_type, dst)
    if types.is_dictionary(dst):
        return is_lossless_cast(src, dst.value_type)
    kind = type_kind(src)
    if kind != type_kind(dst):
        return False
    if kind == "number":
        if types.is_integer(src):
            return types.is_integer(dst) or types.is_floating(dst)
        if types.is_floating(src):
            return types.is_floating(dst) and dst.bit_width >= src.bit_width
        return (  # decimal
            types.is_decimal(dst)
            and dst.scale >= src.scale
            and dst.precision - dst.scale >= src.precision - src.scale
        )
    if kind == "string":
        return True
    if kind == "binary":  # variable width only: fixed-size and view binaries are left alone
        return all(types.is_binary(t) or types.is_large_binary(t) for t in (src, dst))
    if kind in ("timestamp", "timestamp-tz", "date", "time", "duration"):
        return True
    if kind == "list":
        return all(types.is_list(t) or types.is_large_list(t) for t in (src, dst)) and (
            is_lossless_cast(src.value_type, dst.value_type)
        )
    if kind == "struct":
        return src.num_fields == dst.num_fields and all(
            src.field(i).name == dst.field(i).name
            and is_lossless_cast(src.field(i).type, dst.field(i).type)
            for i in range(src.num_fields)
        )
    if kind == "map":
        return is_lossless_cast(src.key_type, dst.key_type) and is_lossless_cast(
            src.item_type, dst.item_type
        )
    return False  # bool and other kinds: only the identical type


# -- casting --------------------------------------------------------------------------------------


def check_cast(
    name: str, src: pa.DataType, dst: pa.DataType, *, lossless: bool, what: str = "the stream"
) -> None:
    """Refuse, naming column ``name``, a type pair the rule does not allow.

    ``lossless=True``: ``is_lossless_cast``, worded for ``what`` ("the stream", "the writer's").
    ``lossless=False``: ``same_kind``, worded as a source cast into the target's type.
    """
    if lossless:
        if not is_lossless_cast(src, dst):
            raise ValueError(
                f"column {name!r}: {src} does not cast losslessly to {what} type {dst}"
            )
    elif not same_kind(src, dst):
        raise ValueError(
            f"column {name!r}: source type {src} cannot be cast to the target's {dst} without "
            f"changing its meaning ({type_kind(src)} vs {type_kind(dst)})"
        )


def cast_column(
    column: pa.Array | pa.ChunkedArray,
    field: pa.Field,
    *,
    lossless: bool,
    what: str = "the stream",
) -> pa.Array | pa.ChunkedArray:
    """``column`` as ``field.type``: the type pair checked by ``check_cast``, then every value
    checked by a safe cast; a ValueError naming the column otherwise."""
    if column.type.equals(field.type):
        return column
    check_cast(field.name, column.type, field.type, lossless=lossless, what=what)
    try:
        return pc.cast(column, field.type, safe=True)
    except _CAST_ERRORS as exc:
        if lossless:
            problem = f"cannot cast {column.type} to {what} type {field.type}"
        else:
            problem = f"cannot cast source {column.type} to the target's {field.type}"
        raise ValueError(f"column {field.name!r}: {problem} without loss ({exc})") from None


def conform_batch(
    batch: pa.RecordBatch, schema: pa.Schema, what: str = "the stream"
) -> pa.RecordBatch:
    """``batch`` in ``schema``'s column order and types, or a ValueError naming the column.

    Exactly ``schema``'s columns, cast only losslessly (``is_lossless_cast``, values checked);
    a non-nullable column must hold no nulls.
    """
    names = set(batch.schema.names)
    missing = [f.name for f in schema if f.name not in names]
    extra = [n for n in batch.schema.names if schema.get_field_index(n) < 0]
    if missing or extra:
        problems = [f"missing column(s) {missing}"] if missing else []
        problems += [f"unexpected column(s) {extra}"] if extra else []
        raise ValueError(f"chunk does not match {what} schema: " + "; ".join(problems))
    arrays = []
    for target in schema:
        column = cast_column(batch.column(target.name), target, lossless=True, what=what)
        if not target.nullable and column.null_count:
            raise ValueError(
                f"column {target.name!r}: {column.null_count} null(s) in a column {what} "
                "schema declares non-nullable"
            )
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
