"""How the published rows are cut into Parquet files and row groups.

Shards hold equal row counts (they differ by at most one), so that data-parallel ranks and DataLoader
workers finish together; their number divides evenly over the usual world_size x num_workers products
(powers of two up to 64, multiples of 64 above).  Row groups stay small for random access and the Hub's
viewer: at most ``max_rows`` rows and ``max_bytes`` bytes, cut greedily in row order.
"""

from __future__ import annotations

import math

# datasets reads image datasets in 100-row batches; the Hub's viewer pages through row groups this size.
ROW_GROUP_ROWS = 100
_EVEN_STEP = 64


def even_shard_count(needed: int) -> int:
    """The smallest count >= ``needed`` that splits evenly over 1, 2, 4, ... 64 consumers."""
    if needed <= 1:
        return 1
    if needed <= _EVEN_STEP:
        return 1 << (needed - 1).bit_length()
    return math.ceil(needed / _EVEN_STEP) * _EVEN_STEP


def equal_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous [start, stop) ranges over ``rows`` rows whose sizes differ by at most one."""
    base, extra = divmod(rows, parts)
    ranges, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def plan_shards(row_bytes: list[int], max_shard_bytes: int, min_shards: int = 1) -> list[tuple[int, int]]:
    """Row ranges of the Parquet files: the fewest even-splitting shards whose every shard fits.

    With fewer rows than the even count, one row per shard is the most there can be: the count then
    stops at the row count (a tiny dataset cannot split evenly over 64 workers anyway).
    """
    rows = len(row_bytes)
    if rows == 0:
        return [(0, 0)]
    prefix = [0]
    for size in row_bytes:
        prefix.append(prefix[-1] + size)
    count = even_shard_count(max(min_shards, math.ceil(prefix[-1] / max_shard_bytes)))
    while True:
        if count >= rows:
            return equal_ranges(rows, rows)
        ranges = equal_ranges(rows, count)
        if all(prefix[stop] - prefix[start] <= max_shard_bytes for start, stop in ranges):
            return ranges
        count = even_shard_count(count + 1)


def plan_row_groups(row_bytes: list[int], max_bytes: int, max_rows: int = ROW_GROUP_ROWS) -> list[int]:
    """Row counts of consecutive row groups over these rows: each at most ``max_rows`` rows and
    ``max_bytes`` bytes (a single row larger than that gets a group of its own)."""
    groups, rows, size = [], 0, 0
    for row in row_bytes:
        if rows and (rows == max_rows or size + row > max_bytes):
            groups.append(rows)
            rows, size = 0, 0
        rows += 1
        size += row
    if rows:
        groups.append(rows)
    return groups
