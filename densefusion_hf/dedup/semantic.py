"""Semantic near-duplicate removal over image embeddings (SemDeDup, Abbas et al. 2023).

DenseFusion-1M deduplicates its LAION pool this way: spherical k-means over CLIP image embeddings,
then, inside each cluster, every pair with cosine similarity above ``1 - eps`` is a near duplicate.
Searching only inside clusters turns an O(n^2) all-pairs search into roughly O(n^2 / k): near
duplicates are so close that they almost always share their nearest centroid, so very few are
lost by not comparing across clusters.

All functions expect L2-normalised rows (float32 or float16, any array supporting row slicing and
fancy indexing, e.g. a ``np.memmap``) so that a dot product is a cosine similarity. They never
convert the whole input to float32 at once: float16 input is converted block by block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .unionfind import connected_components

#: faiss's own cap on training points per centroid (``ClusteringParameters.max_points_per_centroid``).
FAISS_POINTS_PER_CENTROID = 256

#: Default rows per block when assigning points to centroids (64k x 512 float32 = 128 MiB).
DEFAULT_BLOCK_ROWS = 65536

#: Default bound on one block of the within-cluster similarity matrix (2**24 float32 = 64 MiB).
DEFAULT_MAX_BLOCK_ELEMS = 1 << 24


def _check_embeddings(embeddings: np.ndarray) -> tuple[int, int]:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {embeddings.shape}")
    if embeddings.dtype not in (np.float32, np.float16):
        raise TypeError(f"embeddings must be float32 or float16, got {embeddings.dtype}")
    n, d = embeddings.shape
    if n:
        # A cheap guard on a few rows: unnormalised input would silently turn dot products into
        # something other than cosine similarities and make eps meaningless.
        probe = np.asarray(embeddings[: min(n, 1024)], dtype=np.float32)
        norms = np.linalg.norm(probe, axis=1)
        if not np.all(np.abs(norms - 1.0) < 1e-2):
            raise ValueError("embeddings must be L2-normalised (row norms differ from 1 by more than 1e-2)")
    return n, d


def _as_float32_rows(embeddings: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """One block of rows as C-contiguous float32 (a view when the input already is)."""
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


def effective_k(k: int, n: int) -> int:
    """Clamp rule for the number of clusters: ``min(k, n)``, so every centroid can start on a distinct row.

    With ``n <= k`` every row may end up alone in its cluster, and SemDeDup then finds no pairs at all:
    the caller asked for more clusters than there are rows, so that is the honest outcome.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(int(k), int(n))


def train_centroids(
    embeddings: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    max_train_points: int | None = None,
) -> np.ndarray:
    """Spherical k-means centroids (k', d) float32, L2-normalised, with ``k' = min(k, n)``.

    Trains ``faiss.Kmeans(spherical=True)`` on a seeded uniform sample of at most ``max_train_points``
    rows (default ``256 * k``, faiss's own cap; never fewer than ``k'``). Training cost is
    ``niter * n_train * k * d`` multiply-adds, so on large inputs this sample size, not n, is the
    knob that bounds both time and the float32 copy of the sample. Deterministic for a given seed:
    the sample comes from ``np.random.default_rng(seed)`` and faiss's initialisation and
    empty-cluster splitting from ``ClusteringParameters.seed = seed``.
    """
    import faiss

    n, d = _check_embeddings(embeddings)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    k = effective_k(k, n)
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if max_train_points is None:
        max_train_points = FAISS_POINTS_PER_CENTROID * k
    n_train = max(k, min(n, int(max_train_points)))
    if n_train == n:
        train = _as_float32_rows(embeddings, slice(None))  # no copy for float32 C-contiguous input
    else:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=n_train, replace=False))  # sorted: sequential reads
        train = _as_float32_rows(embeddings, sample)
    km = faiss.Kmeans(
        d,
        k,
        niter=int(niter),
        seed=int(seed) & 0x7FFFFFFF,
        spherical=True,
        verbose=False,
        # We already sampled; stop faiss from subsampling again (with its own RNG) or warning
        # that fewer than 39 points per centroid is "too few".
        min_points_per_centroid=1,
        max_points_per_centroid=-(-n_train // k),
    )
    km.train(train)
    del train
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids /= np.maximum(norms, np.finfo(np.float32).tiny)
    return centroids


def assign_to_centroids(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product for every row: (assignment (n,) int64, similarity (n,) float32).

    Exact search with ``faiss.IndexFlatIP``, fed ``block_rows`` rows at a time so float16 input is
    converted a block at a time and the working set stays bounded whatever n is.
    """
    import faiss

    n, d = _check_embeddings(embeddings)
    assignment = np.empty(n, dtype=np.int64)
    similarity = np.empty(n, dtype=np.float32)
    if n == 0:
        return assignment, similarity
    if centroids.ndim != 2 or centroids.shape[1] != d or len(centroids) == 0:
        raise ValueError(f"centroids must have shape (k>=1, {d}), got {centroids.shape}")
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    block_rows = max(1, int(block_rows))
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        sims, labels = index.search(_as_float32_rows(embeddings, slice(start, stop)), 1)
        if np.any(labels < 0):
            raise ValueError("faiss could not assign some rows (NaN or inf in the embeddings?)")
        assignment[start:stop] = labels[:, 0]
        similarity[start:stop] = sims[:, 0]
    return assignment, similarity


def kmeans(
    embeddings: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    max_train_points: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spherical k-means: (centroids (k', d) float32 unit rows, assignment (n,) int64, cosine to it (n,) float32).

    Centroids come from a seeded sample (see :func:`train_centroids`), then every row is assigned
    exactly (see :func:`assign_to_centroids`). ``k' = min(k, n)`` (see :func:`effective_k`).
    """
    centroids = train_centroids(embeddings, k, seed=seed, niter=niter, max_train_points=max_train_points)
    assignment, similarity = assign_to_centroids(embeddings, centroids, block_rows=block_rows)
    return centroids, assignment, similarity


def near_duplicate_pairs(
    embeddings: np.ndarray,
    assignment: np.ndarray,
    eps: float,
    *,
    max_block_elems: int = DEFAULT_MAX_BLOCK_ELEMS,
) -> np.ndarray:
    """All pairs (i, j), i < j, in the same cluster with cosine similarity ``> 1 - eps``: (m, 2) int64, sorted.

    Exact inside each cluster (a float32 matrix product of the cluster's rows; pairs within float32
    rounding, about 1e-6, of the threshold may go either way). A cluster is processed in row blocks
    of at most ``max_block_elems`` similarities, so one huge cluster (k-means on real data is skewed)
    costs bounded memory, and only the upper triangle is computed block by block. The output itself
    grows with the number of pairs found, so keep eps small (SemDeDup uses values like 0.01-0.1).
    """
    n, assignment = _check_cluster_args(embeddings, assignment, eps)

    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    for rows, ii, jj in _cluster_pairs(embeddings, assignment, eps, max_block_elems):
        found_i.append(rows[ii])
        found_j.append(rows[jj])
    if not found_i:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1).astype(np.int64, copy=False)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _check_cluster_args(embeddings: np.ndarray, assignment: np.ndarray, eps: float) -> tuple[int, np.ndarray]:
    n, _ = _check_embeddings(embeddings)
    assignment = np.asarray(assignment)
    if assignment.shape != (n,):
        raise ValueError(f"assignment must have shape ({n},), got {assignment.shape}")
    if not 0.0 < eps <= 2.0:
        raise ValueError(f"eps must be in (0, 2], got {eps}")
    return n, assignment


def _cluster_pairs(embeddings: np.ndarray, assignment: np.ndarray, eps: float, max_block_elems: int):
    """Per cluster of two rows or more: (its rows in increasing order, local i, local j) of its pairs."""
    n = len(assignment)
    threshold = np.float32(1.0 - eps)
    max_block_elems = max(1, int(max_block_elems))
    # Stable sort: rows of a cluster stay in increasing index order, so local i < j means global i < j.
    order = np.argsort(assignment, kind="stable")
    bounds = np.flatnonzero(np.diff(assignment[order])) + 1
    starts = np.concatenate(([0], bounds))
    stops = np.concatenate((bounds, [n]))
    big = (stops - starts) >= 2
    for start, stop in zip(starts[big].tolist(), stops[big].tolist()):
        rows = order[start:stop]
        x = _as_float32_rows(embeddings, rows)
        m = len(rows)
        step = max(1, max_block_elems // m)
        local_i: list[np.ndarray] = []
        local_j: list[np.ndarray] = []
        for a in range(0, m - 1, step):
            b = min(m, a + step)
            # Block rows a..b against columns a..m: the triangle left of column a was done earlier.
            ii, jj = np.nonzero(np.triu(x[a:b] @ x[a:].T > threshold, 1))
            if len(ii):
                local_i.append(a + ii)
                local_j.append(a + jj)
        if local_i:
            yield rows, np.concatenate(local_i), np.concatenate(local_j)


def duplicate_groups(
    embeddings: np.ndarray,
    assignment: np.ndarray,
    eps: float,
    *,
    max_block_elems: int = DEFAULT_MAX_BLOCK_ELEMS,
) -> tuple[np.ndarray, int]:
    """The groups ``near_duplicate_pairs`` would give (label = smallest row of the group) and the pair count,
    one cluster at a time: pairs never cross clusters, so no list of all pairs is ever held. With a
    large eps (the paper's 0.4) a cluster can hold millions of pairs, and a whole pool billions."""
    n, assignment = _check_cluster_args(embeddings, assignment, eps)
    groups = np.arange(n, dtype=np.int64)
    n_pairs = 0
    for rows, ii, jj in _cluster_pairs(embeddings, assignment, eps, max_block_elems):
        local = connected_components(len(rows), np.stack([ii, jj], axis=1))
        groups[rows] = rows[local]  # rows ascend, so the smallest local index is the smallest row
        n_pairs += len(ii)
    return groups, n_pairs


@dataclass
class SemDedupResult:
    """Everything SemDeDup decided, row-aligned with the input embeddings."""

    centroids: np.ndarray  # (k', d) float32, L2-normalised; k' = min(k, n)
    assignment: np.ndarray  # (n,) int64 cluster of each row
    centroid_similarity: np.ndarray  # (n,) float32 cosine similarity of each row to its centroid
    pairs: np.ndarray | None  # (m, 2) int64 near-duplicate pairs i < j, sorted; None unless asked for
    n_pairs: int  # how many pairs were found
    groups: np.ndarray  # (n,) int64 duplicate group label = smallest row index in the group
    keep: np.ndarray  # (n,) bool, exactly one True per group
    dup_of: np.ndarray  # (n,) int64 kept row of the group for dropped rows, -1 for kept rows
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    @property
    def n_dropped(self) -> int:
        return int(len(self.keep) - np.count_nonzero(self.keep))


def choose_kept(groups: np.ndarray, priority: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the highest-priority member of each group, ties to the lowest index: (keep, dup_of).

    ``priority`` may be any real dtype; it is ranked rather than negated, so unsigned and huge
    integer priorities order correctly.
    """
    groups = np.asarray(groups, dtype=np.int64)
    n = len(groups)
    priority = np.asarray(priority)
    if priority.shape != (n,):
        raise ValueError(f"priority must have shape ({n},), got {priority.shape}")
    if priority.dtype.kind == "f" and not np.all(np.isfinite(priority)):
        raise ValueError("priority must be finite")
    if n == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
    _, rank = np.unique(priority, return_inverse=True)
    index = np.arange(n, dtype=np.int64)
    # Sort by group, then priority descending, then index ascending: each group's winner comes first.
    order = np.lexsort((index, -rank.astype(np.int64).ravel(), groups))
    sorted_groups = groups[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    winners = order[first]
    winner_of_label = np.full(n, -1, dtype=np.int64)
    winner_of_label[groups[winners]] = winners
    keep = np.zeros(n, dtype=bool)
    keep[winners] = True
    dup_of = winner_of_label[groups]
    dup_of[keep] = -1
    return keep, dup_of


def semdedup(
    embeddings: np.ndarray,
    k: int,
    eps: float,
    *,
    seed: int = 0,
    niter: int = 20,
    max_train_points: int | None = None,
    priority: np.ndarray | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    max_block_elems: int = DEFAULT_MAX_BLOCK_ELEMS,
    return_pairs: bool = False,
) -> SemDedupResult:
    """SemDeDup: k-means, near-duplicate pairs inside clusters, groups, and one kept row per group.

    The pairs themselves are kept only with ``return_pairs`` (tests, benchmarks): a build needs the
    groups, which are found one cluster at a time whatever the number of pairs.

    Groups are the connected components of the pair graph (so A~B and B~C put A, B, C in one group
    even if A and C are not themselves within eps), and exactly one row per group is kept. With
    ``priority`` given, the highest priority wins. Without it the default is SemDeDup's own rule:
    keep the member *least* similar to its cluster centroid (``priority = -centroid_similarity``),
    which the paper found preserves more diversity than keeping the most prototypical one. Ties go
    to the lowest row index, so the result is deterministic (exact copies tie on similarity).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    centroids = train_centroids(embeddings, k, seed=seed, niter=niter, max_train_points=max_train_points)
    t1 = time.perf_counter()
    assignment, similarity = assign_to_centroids(embeddings, centroids, block_rows=block_rows)
    t2 = time.perf_counter()
    if return_pairs:
        pairs = near_duplicate_pairs(embeddings, assignment, eps, max_block_elems=max_block_elems)
        groups, n_pairs = connected_components(len(assignment), pairs), len(pairs)
    else:
        pairs = None
        groups, n_pairs = duplicate_groups(embeddings, assignment, eps, max_block_elems=max_block_elems)
    t3 = time.perf_counter()
    keep, dup_of = choose_kept(groups, -similarity if priority is None else priority)
    t4 = time.perf_counter()
    timings.update(train=t1 - t0, assign=t2 - t1, pairs=t3 - t2, groups=t4 - t3, total=t4 - t0)
    return SemDedupResult(
        centroids=centroids,
        assignment=assignment,
        centroid_similarity=similarity,
        pairs=pairs,
        n_pairs=n_pairs,
        groups=groups,
        keep=keep,
        dup_of=dup_of,
        timings=timings,
    )
