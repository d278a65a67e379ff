"""Column helpers for global decisions: every row of a build passes through the driver, so a decision holds
fixed-width numpy arrays and Arrow columns, never a Python object per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_to_uint64(values: list[str | None], start: int = 0, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``values[i][start:start+width]`` read as a hex number (at most 16 digits): (uint64 array, valid mask).
    Called on one shard's values at a time, so the Python strings never outlive a shard."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    numbers = np.fromiter((int(v[start:start + width], 16) if v is not None else 0 for v in values),
                          dtype=np.uint64, count=len(values))
    return numbers, valid


def uint64_to_hex(numbers: np.ndarray, valid: np.ndarray, width: int) -> pa.Array:
    """Lower-case hex strings of ``width`` digits (the low ``4 * width`` bits), null where not ``valid``;
    built straight into an Arrow buffer."""
    numbers = np.asarray(numbers, dtype=np.uint64)
    n = len(numbers)
    digits = np.empty((n, width), dtype=np.uint8)
    for position in range(width):
        shift = np.uint64(4 * (width - 1 - position))
        digits[:, position] = _HEX[((numbers >> shift) & np.uint64(15)).astype(np.intp)]
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    valid = np.asarray(valid, dtype=bool)
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
    return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())])


def ranks(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each value's position in ascending order (ties by position): a sortable int64 stand-in for strings."""
    order = pc.sort_indices(values).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank


def at_rows(n: int, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """An ``n``-long column holding ``values[j]`` at ``rows[j]`` and null elsewhere."""
    index = np.zeros(n, dtype=np.int64)
    index[rows] = np.arange(len(rows), dtype=np.int64)
    present = np.zeros(n, dtype=bool)
    present[rows] = True
    return values.take(pa.array(index, mask=~present))
