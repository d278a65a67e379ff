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

import numpy as np


@dataclass
class SelectionResult:
    selected: np.ndarray                    # bool per row
    reasons: list[str | None]               # why a row was left out (None when selected)
    details: list[str | None]
    cluster_rank: np.ndarray                # 0-based rank of each row inside its cluster
    unmet_minimums: dict[str, dict] = field(default_factory=dict)


def rank_in_clusters(clusters: np.ndarray, scores: np.ndarray, keys: list[str]) -> np.ndarray:
    """0-based rank of each row in its cluster: higher score first, then smaller key."""
    n = len(keys)
    order = np.lexsort((np.asarray(keys, dtype=object).astype(str), -np.asarray(scores, np.float64),
                        np.asarray(clusters)))
    rank = np.empty(n, dtype=np.int64)
    sorted_clusters = np.asarray(clusters)[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_clusters[1:] != sorted_clusters[:-1]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank[order] = np.arange(n) - group_start
    return rank


def select(keys: list[str], scores: np.ndarray, clusters: np.ndarray | None, categories: list[str],
           *, top_per_cluster: int | None = None, target_size: int | None = None,
           min_share: dict[str, float] | None = None, max_share: dict[str, float] | None = None
           ) -> SelectionResult:
    n = len(keys)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    clusters = np.zeros(n, np.int64) if clusters is None else np.asarray(clusters, np.int64)
    rank = rank_in_clusters(clusters, scores, keys) if n else np.zeros(0, np.int64)
    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    if top_per_cluster is not None:
        for i in np.flatnonzero(rank >= top_per_cluster):
            reasons[i] = "cluster_rank"
            details[i] = f"rank {rank[i] + 1} in cluster {clusters[i]}; the best {top_per_cluster} are kept"
    pool = [i for i in range(n) if reasons[i] is None]
    pool.sort(key=lambda i: (rank[i], -scores[i], keys[i]))
    target = len(pool) if target_size is None else min(target_size, len(pool))
    minimum = {c: math.ceil(s * target) for c, s in (min_share or {}).items()}
    maximum = {c: math.floor(s * target) for c, s in (max_share or {}).items()}

    chosen: set[int] = set()
    count: dict[str, int] = {}

    def room(category: str) -> bool:
        return category not in maximum or count.get(category, 0) < maximum[category]

    for category, wanted in minimum.items():
        for i in pool:
            if count.get(category, 0) >= min(wanted, maximum.get(category, wanted)) or len(chosen) >= target:
                break
            if categories[i] == category and i not in chosen:
                chosen.add(i)
                count[category] = count.get(category, 0) + 1
    for i in pool:
        if len(chosen) >= target:
            break
        if i not in chosen and room(categories[i]):
            chosen.add(i)
            count[categories[i]] = count.get(categories[i], 0) + 1
    for i in pool:
        if i in chosen:
            continue
        if not room(categories[i]):
            reasons[i] = "category_quota"
            details[i] = f"category {categories[i]} is full ({maximum[categories[i]]} rows)"
        else:
            reasons[i] = "target_size"
            details[i] = f"beyond the target of {target} rows"
    unmet = {c: {"wanted": w, "selected": count.get(c, 0)} for c, w in minimum.items() if count.get(c, 0) < w}
    selected = np.zeros(n, dtype=bool)
    selected[list(chosen)] = True
    return SelectionResult(selected, reasons, details, rank, unmet)


def random_subset(keys: list[str], size: int, seed: int) -> np.ndarray:
    """A seeded subset of ``size`` keys, as a mask.  It depends only on the keys and the seed, so the same
    selection gives the same subset, and a smaller subset is contained in a larger one."""
    digests = [hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest() for k in keys]
    order = sorted(range(len(keys)), key=lambda i: digests[i])
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[:size]] = True
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
