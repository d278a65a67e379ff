"""One metadata file's columns in the types ingest writes, whatever the file holds.

LAION-style files come from many tools: a column may be text in one file and numbers in another, hold
bytes that are not UTF-8, or sizes no image has.  ``typed_columns`` gives a slice of one file the types of
ingest's schema (so slices of several files concatenate) and moves each value it cannot read into the
row's ``PROBLEM``, which ingest records as a ``bad_metadata`` drop.  A column whose type cannot hold the
field at all (a list of URLs, a struct of sizes) is a UserError naming the file and the column.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa

from densefusion_hf.errors import UserError

#: The column carrying each row's first unreadable value, described (null: the row reads fine).
PROBLEM = "__metadata_problem"
TEXT_FIELDS = ("url", "text")
NUMBER_FIELDS = ("width", "height", "similarity", "punsafe", "pwatermark")
SIZE_FIELDS = ("width", "height")
#: Larger than any image side; a bigger "size" is a broken value, not a filter decision.
MAX_SIDE = 2 ** 31 - 1


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column without dictionary encoding (pyarrow restores it when the writer used it)."""
    if pa.types.is_dictionary(column.type):
        return pa.chunked_array([chunk.dictionary_decode() for chunk in column.chunks], column.type.value_type)
    return column


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def _raw_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    """Each value's bytes, without the UTF-8 check that reading a string value makes."""
    if _is_text(column.type):
        target = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        column = pa.chunked_array([chunk.view(target) for chunk in column.chunks], target)
    return column.to_pylist()


def _valid_text(column: pa.ChunkedArray) -> bool:
    try:
        column.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def _text(column: pa.ChunkedArray, label: str, path: Path, problems: list) -> pa.Array:
    """A string column: valid UTF-8 as it is; other bytes decoded, or null with a problem."""
    if pa.types.is_null(column.type) or (_is_text(column.type) and _valid_text(column)):
        return column.cast(pa.string())
    values = []
    for row, raw in enumerate(_raw_bytes(column)):
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(None)
            problems[row] = problems[row] or f"{label} is not UTF-8 text: {raw[:40]!r} ({path})"
    return pa.array(values, pa.string())


def _as_float(raw) -> float | None:
    """A number from text or bytes; None when it is none (unknown values pass the filters)."""
    try:
        return float(raw.decode("ascii") if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None


def _numbers(column: pa.ChunkedArray, name: str, label: str, path: Path, problems: list) -> pa.Array:
    """A float64 column: NaN and unreadable text become null (unknown); a size that is no pixel count
    (infinite, or beyond any image) is null with a problem."""
    kind = column.type
    if pa.types.is_null(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind) \
            or pa.types.is_decimal(kind) or pa.types.is_boolean(kind):
        values = column.cast(pa.float64()).to_pylist()
    else:  # text or bytes, checked by the caller
        values = [_as_float(raw) for raw in _raw_bytes(column)]
    out = []
    for row, value in enumerate(values):
        if value is not None and math.isnan(value):
            value = None
        if value is not None and name in SIZE_FIELDS and not (math.isfinite(value) and abs(value) <= MAX_SIDE):
            problems[row] = problems[row] or f"{label} {value!r} is not a pixel count ({path})"
            value = None
        out.append(value)
    return pa.array(out, pa.float64())


def _readable(kind: pa.DataType, numeric: bool) -> bool:
    if pa.types.is_null(kind) or _is_text(kind) or _is_bytes(kind):
        return True
    return numeric and (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
                        or pa.types.is_boolean(kind))


def typed_columns(table: pa.Table, theirs: dict[str, str], path: Path) -> pa.Table:
    """``table`` (one file's rows under our column names; ``theirs`` maps them to the file's names) with
    url and text as strings, the numbers as float64, every text column valid UTF-8, and ``PROBLEM``."""
    problems: list[str | None] = [None] * table.num_rows
    columns = {}
    for name in table.column_names:
        column, label = _plain(table.column(name)), theirs.get(name, name)
        numeric = name in NUMBER_FIELDS
        if name in TEXT_FIELDS or numeric:
            if not _readable(column.type, numeric):
                field = f"source.columns.{name}"
                raise UserError(f"{path}: column {label!r} ({field}) holds {column.type}, not "
                                f"{'numbers' if numeric else 'text'}. Point {field} at the right column"
                                + (" (or null if the file has none)." if numeric else "."))
            columns[name] = (_numbers(column, name, label, path, problems) if numeric
                             else _text(column, label, path, problems))
        elif _is_text(column.type) and not _valid_text(column):  # a kept column: written as it is, once readable
            columns[name] = _text(column, label, path, problems)
        else:
            columns[name] = column
    columns[PROBLEM] = pa.array(problems, pa.string())
    return pa.table(columns)
