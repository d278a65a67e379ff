"""The selection arithmetic: top N per cluster, category quotas, a target size, a seeded random subset.

Pure functions over arrays, so the rules can be read and tested apart from any file:

1. Inside each cluster rows are ranked by score (higher first), ties by key; rows ranked N or worse are
   dropped (``cluster_rank``).
2. The remaining rows are visited best rank first across all clusters (every cluster's best, then every
   cluster's second, ...; within a rank by score, then key), so trimming to the target keeps clusters
   balanced.
3. Categories with ``min_share`` are served first, up to ceil(min_share x target); then the rest is
   filled in order while each category stays under floor(max_share x target).  Rows left out are
   ``category_quota`` when their category was full, else ``target_size``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from densefusion_hf.stages.columnar import at_rows, chunked, gather, ranks


@dataclass
class SelectionResult:
    selected: np.ndarray                    # bool per row
    reasons: pa.ChunkedArray                # why a row was left out (null when selected)
    details: pa.ChunkedArray
    cluster_rank: np.ndarray                # 0-based rank of each row inside its cluster
    unmet_minimums: dict[str, dict] = field(default_factory=dict)


def _key_order(keys) -> np.ndarray:
    """An int64 array that sorts as ``keys`` do (``keys`` given as strings, or already as such ranks)."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        return keys.astype(np.int64, copy=False)
    return ranks(keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(list(keys), pa.string()))


def _place_in_group(groups: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each row, how many rows of its group come before it in ``order`` (which sorts by group first)."""
    n = len(groups)
    sorted_groups = groups[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    position = np.arange(n)
    place = np.empty(n, dtype=np.int64)
    place[order] = position - np.maximum.accumulate(np.where(starts, position, 0))
    return place


def rank_in_clusters(clusters: np.ndarray, scores: np.ndarray, keys) -> np.ndarray:
    """0-based rank of each row in its cluster: higher score first, then smaller key."""
    clusters = np.asarray(clusters)
    return _place_in_group(clusters, np.lexsort((_key_order(keys), -np.asarray(scores, np.float64), clusters)))


def _running_count(codes: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same code."""
    return _place_in_group(codes, np.argsort(codes, kind="stable"))


def select(keys, scores: np.ndarray, clusters: np.ndarray | None, categories, *,
           top_per_cluster: int | None = None, target_size: int | None = None,
           min_share: dict[str, float] | None = None, max_share: dict[str, float] | None = None,
           category_names: list[str] | None = None) -> SelectionResult:
    """The rules of the module docstring over columns: ``keys`` (strings or ranks sorting as they do) may be a
    list or an Arrow array; ``categories`` are strings, or codes into ``category_names``.  Nothing per row
    is a Python object."""
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    n = len(scores)
    clusters = np.zeros(n, np.int64) if clusters is None else np.asarray(clusters, np.int64)
    key_order = _key_order(keys) if n else np.zeros(0, np.int64)
    rank = rank_in_clusters(clusters, scores, key_order) if n else np.zeros(0, np.int64)
    if category_names is None:
        encoded = pc.dictionary_encode(pa.array(list(categories), pa.string()))
        names = encoded.dictionary.to_pylist()
        code = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        names, code = list(category_names), np.asarray(categories, dtype=np.int64)
    dictionary = pa.array(names, pa.string())
    code_of = {name: i for i, name in enumerate(names)}

    dropped_rank = np.flatnonzero(rank >= top_per_cluster) if top_per_cluster is not None else np.zeros(0, np.int64)
    in_pool = np.ones(n, dtype=bool)
    in_pool[dropped_rank] = False
    pool = np.flatnonzero(in_pool)
    pool = pool[np.lexsort((key_order[pool], -scores[pool], rank[pool]))]  # best rank first, then score, key
    target = len(pool) if target_size is None else min(target_size, len(pool))
    minimum = {c: math.ceil(s * target) for c, s in (min_share or {}).items()}
    maximum = {c: math.floor(s * target) for c, s in (max_share or {}).items()}
    cap = np.full(len(names), np.iinfo(np.int64).max, dtype=np.int64)
    for name, limit in maximum.items():
        if name in code_of:
            cap[code_of[name]] = limit

    chosen = np.zeros(n, dtype=bool)
    count = np.zeros(len(names), dtype=np.int64)
    for name, wanted in minimum.items():  # served first, best rows of the category up to its minimum
        take = min(wanted, maximum.get(name, wanted), target - int(count.sum()))
        if name in code_of and take > 0:
            members = pool[code[pool] == code_of[name]][:take]
            chosen[members] = True
            count[code_of[name]] += len(members)
    rest = pool[~chosen[pool]]  # then the rest in order, each category while it has room, up to the target
    room = count[code[rest]] + _running_count(code[rest]) < cap[code[rest]]
    picked = rest[room][:max(0, target - int(count.sum()))]
    chosen[picked] = True
    count += np.bincount(code[picked], minlength=len(names))

    left = rest[~chosen[rest]]
    full = count[code[left]] >= cap[code[left]]
    quota, beyond = left[full], left[~full]
    cap_text = pa.array([str(c) for c in cap], pa.string())
    rank_details = pc.binary_join_element_wise(
        "rank ", pc.cast(chunked(rank[dropped_rank] + 1), pa.string()), " in cluster ",
        pc.cast(chunked(clusters[dropped_rank]), pa.string()), f"; the best {top_per_cluster} are kept", "")
    quota_details = pc.binary_join_element_wise(
        "category ", gather(dictionary, code[quota]), " is full (", gather(cap_text, code[quota]), " rows)", "")
    beyond_details = gather(pa.array([f"beyond the target of {target} rows"]), np.zeros(len(beyond), np.int64))
    rows = np.concatenate([dropped_rank, quota, beyond]).astype(np.int64)
    reasons = gather(pa.array(["cluster_rank", "category_quota", "target_size"]),
                     np.repeat([0, 1, 2], [len(dropped_rank), len(quota), len(beyond)]))
    details = pa.chunked_array(rank_details.chunks + quota_details.chunks + beyond_details.chunks, pa.string())
    unmet = {c: {"wanted": w, "selected": int(count[code_of[c]]) if c in code_of else 0}
             for c, w in minimum.items() if (int(count[code_of[c]]) if c in code_of else 0) < w}
    return SelectionResult(chosen, at_rows(n, rows, reasons), at_rows(n, rows, details), rank, unmet)


def _strings(keys) -> Iterator[str]:
    """The keys as Python strings, a bounded slice at a time when they are an Arrow column."""
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
        yield from keys
        return
    for chunk in (keys.chunks if isinstance(keys, pa.ChunkedArray) else [keys]):
        for start in range(0, len(chunk), 65536):
            yield from chunk.slice(start, 65536).to_pylist()


def random_subset(keys, size: int, seed: int) -> np.ndarray:
    """A seeded subset of ``size`` keys, as a mask.  It depends only on the keys and the seed, so the same
    selection gives the same subset, and a smaller subset is contained in a larger one."""
    digests = np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big")
                           for k in _strings(keys)), dtype=np.uint64, count=len(keys))
    mask = np.zeros(len(keys), dtype=bool)
    mask[np.argsort(digests, kind="stable")[:size]] = True
    return mask


def cluster_size_histogram(clusters: np.ndarray) -> list[list]:
    """[size range, number of clusters] for 1, 2-5, 6-10, 11-20, 21-50, 51-100 and more than 100 rows."""
    if len(clusters) == 0:
        return []
    sizes = np.bincount(np.unique(clusters, return_inverse=True)[1])
    bins = [(1, 1), (2, 5), (6, 10), (11, 20), (21, 50), (51, 100)]
    histogram = [[f"{lo}" if lo == hi else f"{lo}-{hi}", int(((sizes >= lo) & (sizes <= hi)).sum())]
                 for lo, hi in bins]
    return histogram + [[">100", int((sizes > 100).sum())]]
