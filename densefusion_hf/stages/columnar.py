"""Column helpers for global decisions: every row of a build passes through the driver, so a decision holds
fixed-width numpy arrays and Arrow columns, never a Python object per row.

Arrow's string arrays address their bytes with 32-bit offsets (2 GiB per array): 90M keys of 24 characters
already overflow one.  So the string columns built here are chunked, ``SLICE`` rows per chunk, and values are
gathered chunk by chunk (``gather``) rather than with ``ChunkedArray.take``, which first joins every chunk.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
SLICE = 1 << 20  # rows per chunk of the columns built here


def hex_to_uint64(values: list[str | None], start: int = 0, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``values[i][start:start+width]`` read as a hex number (at most 16 digits): (uint64 array, valid mask).
    Called on one shard's values at a time, so the Python strings never outlive a shard."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    numbers = np.fromiter((int(v[start:start + width], 16) if v is not None else 0 for v in values),
                          dtype=np.uint64, count=len(values))
    return numbers, valid


def _hex_chunk(numbers: np.ndarray, valid: np.ndarray, width: int) -> pa.Array:
    n = len(numbers)
    digits = np.empty((n, width), dtype=np.uint8)
    for position in range(width):
        shift = np.uint64(4 * (width - 1 - position))
        digits[:, position] = _HEX[((numbers >> shift) & np.uint64(15)).astype(np.intp)]
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
    return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())])


def uint64_to_hex(numbers: np.ndarray, valid: np.ndarray, width: int) -> pa.ChunkedArray:
    """Lower-case hex strings of ``width`` digits (the low ``4 * width`` bits), null where not ``valid``;
    built straight into Arrow buffers, ``SLICE`` rows per chunk."""
    numbers, valid = np.asarray(numbers, dtype=np.uint64), np.asarray(valid, dtype=bool)
    return pa.chunked_array([_hex_chunk(numbers[a:a + SLICE], valid[a:a + SLICE], width)
                             for a in range(0, len(numbers), SLICE)], pa.string())


def chunked(values: np.ndarray, type: pa.DataType | None = None) -> pa.ChunkedArray:
    """A numpy array as an Arrow column of ``SLICE``-row chunks (so that strings computed from it stay
    within Arrow's offsets)."""
    chunks = [pa.array(values[a:a + SLICE], type) for a in range(0, len(values), SLICE)]
    return pa.chunked_array(chunks, type or pa.from_numpy_dtype(np.asarray(values).dtype))


def concatenate(arrays: list[np.ndarray], dtype, shape: tuple = ()) -> np.ndarray:
    """Per-shard arrays joined into one; an empty array of ``dtype`` (and row ``shape``) when there are none."""
    return np.concatenate(arrays) if arrays else np.zeros((0, *shape), dtype)


def ranks(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each value's position in ascending order (ties by position): a sortable int64 stand-in for strings."""
    order = pc.sort_indices(values).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank


def gather(values: pa.Array | pa.ChunkedArray, index: np.ndarray) -> pa.ChunkedArray:
    """``values[index]``, null where ``index`` is negative, ``SLICE`` rows per chunk of the result: each
    chunk is gathered from the chunks of ``values`` that hold its rows, so no array grows past one slice."""
    sources = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    starts = np.cumsum([0] + [len(c) for c in sources])
    index = np.asarray(index, dtype=np.int64)
    out = []
    for a in range(0, len(index), SLICE):
        part = index[a:a + SLICE]
        present = np.flatnonzero(part >= 0)
        source = np.searchsorted(starts, part[present], side="right") - 1
        order = np.argsort(source, kind="stable")
        pieces = [pa.array([], values.type)]
        for chunk in np.unique(source):
            rows = present[order][source[order] == chunk]
            pieces.append(sources[chunk].take(pa.array(part[rows] - starts[chunk])))
        found = pa.concat_arrays(pieces)  # in the order of present[order]
        position = np.full(len(part), -1, dtype=np.int64)
        position[present[order]] = np.arange(len(present), dtype=np.int64)
        out.append(found.take(pa.array(position, mask=position < 0)))
    return pa.chunked_array(out, values.type)


def at_rows(n: int, rows: np.ndarray, values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """An ``n``-long column holding ``values[j]`` at ``rows[j]`` and null elsewhere."""
    index = np.full(n, -1, dtype=np.int64)
    index[np.asarray(rows, dtype=np.int64)] = np.arange(len(rows), dtype=np.int64)
    return gather(values, index)
