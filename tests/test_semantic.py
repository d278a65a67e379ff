"""SemDeDup: k-means, exact within-cluster near-duplicate pairs, groups and the keep rule."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from densefusion_hf.dedup.semantic import (  # noqa: E402
    choose_kept,
    effective_k,
    kmeans,
    near_duplicate_pairs,
    semdedup,
)

EPS = 0.05  # duplicates: cosine > 0.95


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _at_cosine(rng: np.random.Generator, src: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at exactly cosine ``cos`` from unit vector ``src`` (random direction otherwise)."""
    u = rng.standard_normal(src.shape)
    u -= (u @ src) * src
    u /= np.linalg.norm(u)
    return cos * src + np.sqrt(1.0 - cos * cos) * u


def _planted(seed: int = 0, centres: int = 20, per_centre: int = 100, d: int = 64, n_dup: int = 60, n_miss: int = 60):
    """Clustered unit vectors with planted duplicates (cos 0.97) and near misses (cos 0.94, just outside eps)."""
    rng = np.random.default_rng(seed)
    c = _normalise(rng.standard_normal((centres, d)))
    base = np.repeat(c, per_centre, axis=0) + 0.8 * rng.standard_normal((centres * per_centre, d)) / np.sqrt(d)
    base = _normalise(base).astype(np.float64)
    sources = rng.choice(len(base), size=n_dup + n_miss, replace=False)
    extra = [_at_cosine(rng, base[s], 0.97) for s in sources[:n_dup]]
    extra += [_at_cosine(rng, base[s], 0.94) for s in sources[n_dup:]]
    x = np.concatenate([base, np.array(extra)])
    perm = rng.permutation(len(x))  # scatter the planted rows among the others
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(x))
    x = _normalise(x[perm])
    new = inv[np.arange(len(base), len(base) + n_dup + n_miss)]
    old = inv[sources]
    planted = np.sort(np.stack([old, new], axis=1), axis=1)
    return x, planted[:n_dup], planted[n_dup:]


def _brute_pairs(x: np.ndarray, assignment: np.ndarray, eps: float) -> tuple[set, set]:
    """Within-cluster pairs by float64 brute force, plus the pairs too close to the threshold to call."""
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    i, j = np.triu_indices(len(x), 1)
    same = assignment[i] == assignment[j]
    s = sims[i, j]
    hit = same & (s > 1 - eps)
    borderline = same & (np.abs(s - (1 - eps)) < 1e-5)
    return set(zip(i[hit].tolist(), j[hit].tolist())), set(zip(i[borderline].tolist(), j[borderline].tolist()))


def _check_keep(groups: np.ndarray, keep: np.ndarray, dup_of: np.ndarray) -> None:
    labels, kept_per_group = np.unique(groups[keep], return_counts=True)
    assert np.all(kept_per_group == 1)
    assert set(labels.tolist()) == set(np.unique(groups).tolist())  # every group keeps exactly one
    assert np.all(dup_of[keep] == -1)
    dropped = np.flatnonzero(~keep)
    assert np.all(keep[dup_of[dropped]])
    assert np.all(groups[dup_of[dropped]] == groups[dropped])


def test_planted_duplicates_found_and_near_misses_not():
    x, dups, misses = _planted()
    res = semdedup(x, 20, EPS, seed=0, return_pairs=True)
    same_cluster = res.assignment[dups[:, 0]] == res.assignment[dups[:, 1]]
    assert same_cluster.mean() >= 0.95
    found = {tuple(p) for p in res.pairs.tolist()}
    # Every planted pair whose rows share a cluster is found (exactness inside clusters) ...
    assert all(tuple(p) in found for p in dups[same_cluster].tolist())
    # ... and nothing just outside the threshold is, nor any unplanted pair (base rows are far apart).
    assert not found & {tuple(p) for p in misses.tolist()}
    assert found <= {tuple(p) for p in dups.tolist()}
    assert res.n_dropped == len(found)
    _check_keep(res.groups, res.keep, res.dup_of)


def test_kmeans_shapes_normalised_and_similarity_matches():
    x, _, _ = _planted()
    centroids, assignment, sim = kmeans(x, 20, seed=3)
    assert centroids.shape == (20, x.shape[1]) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert assignment.dtype == np.int64 and sim.dtype == np.float32
    full = x @ centroids.T
    np.testing.assert_allclose(sim, full.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(sim, full[np.arange(len(x)), assignment], atol=1e-5)


@pytest.mark.parametrize("max_block_elems", [1 << 24, 997, 1])
def test_near_duplicate_pairs_exact_within_clusters(max_block_elems):
    rng = np.random.default_rng(7)
    d = 16
    centre = _normalise(rng.standard_normal((1, d)))
    x = _normalise(centre + 0.9 * rng.standard_normal((700, d)) / np.sqrt(d))
    # Skewed clusters: one of 400 rows (forces row blocks when max_block_elems is small), many tiny ones.
    assignment = np.concatenate([np.zeros(400, np.int64), rng.integers(1, 60, size=300)])
    rng.shuffle(assignment)
    eps = 0.6  # many pairs, so the comparison has something to compare
    pairs = near_duplicate_pairs(x, assignment, eps, max_block_elems=max_block_elems)
    assert pairs.dtype == np.int64 and pairs.shape[1] == 2
    assert np.all(pairs[:, 0] < pairs[:, 1])
    assert np.array_equal(pairs, pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))])
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    expected, borderline = _brute_pairs(x, assignment, eps)
    assert len(expected) > 1000
    assert {tuple(p) for p in pairs.tolist()} ^ expected <= borderline


def test_near_duplicate_pairs_float16_input():
    x, dups, _ = _planted()
    assignment = kmeans(x, 20, seed=0)[1]
    p32 = near_duplicate_pairs(x, assignment, EPS)
    p16 = near_duplicate_pairs(x.astype(np.float16), assignment, EPS)
    assert np.array_equal(p32, p16)  # planted pairs sit 0.02 from the threshold, far above fp16 error


def test_determinism_same_seed():
    x, _, _ = _planted(seed=1)
    a = semdedup(x, 17, EPS, seed=5, max_train_points=1000)
    b = semdedup(x, 17, EPS, seed=5, max_train_points=1000)
    for name in ("centroids", "assignment", "centroid_similarity", "pairs", "groups", "keep", "dup_of"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # The float16 path converts block by block. The same block size reproduces bit for bit; another
    # block size changes BLAS's blocking, so similarities may move in the last bit (only an exact
    # tie between two centroids could then change an assignment).
    c = kmeans(x.astype(np.float16), 17, seed=5, block_rows=333)
    e = kmeans(x.astype(np.float16), 17, seed=5, block_rows=333)
    f = kmeans(x.astype(np.float16), 17, seed=5, block_rows=100000)
    for u, v in zip(c, e):
        assert np.array_equal(u, v)
    assert np.array_equal(c[0], f[0])
    np.testing.assert_allclose(c[2], f[2], atol=1e-6)
    assert (c[1] == f[1]).mean() > 0.99


def test_k_larger_than_n_is_clamped():
    x, _, _ = _planted()
    x = x[:7]
    assert effective_k(50, 7) == 7
    res = semdedup(x, 50, EPS)
    assert res.centroids.shape == (7, x.shape[1])
    assert res.assignment.min() >= 0 and res.assignment.max() < 7
    _check_keep(res.groups, res.keep, res.dup_of)
    with pytest.raises(ValueError):
        effective_k(0, 7)


def test_empty_input():
    x = np.zeros((0, 8), np.float32)
    res = semdedup(x, 4, EPS, return_pairs=True)
    assert res.centroids.shape == (0, 8)
    assert res.assignment.shape == res.keep.shape == res.dup_of.shape == (0,)
    assert res.pairs.shape == (0, 2)


def test_default_keep_rule_farthest_from_centroid():
    x, dups, _ = _planted()
    res = semdedup(x, 20, EPS)
    assert res.n_dropped > 0
    for g in np.unique(res.groups[~res.keep]):
        members = np.flatnonzero(res.groups == g)
        sims = res.centroid_similarity[members]
        kept = members[res.keep[members]]
        assert kept.tolist() == [members[np.flatnonzero(sims == sims.min())[0]]]


def test_exact_copies_tie_to_lowest_index():
    x, _, _ = _planted()
    x = np.concatenate([x, x[[10, 10, 20]]])  # rows n, n+1 copy row 10; n+2 copies row 20
    res = semdedup(x, 20, EPS)
    n = len(x) - 3
    assert res.keep[10] and not res.keep[n] and not res.keep[n + 1]
    assert res.dup_of[n] == res.dup_of[n + 1] == 10
    assert res.keep[20] and res.dup_of[n + 2] == 20


def test_priority_rule_honoured():
    x, _, _ = _planted()
    rng = np.random.default_rng(11)
    priority = rng.integers(0, 3, size=len(x)).astype(np.uint8)  # unsigned, with many ties
    res = semdedup(x, 20, EPS, priority=priority)
    _check_keep(res.groups, res.keep, res.dup_of)
    for g in np.unique(res.groups[~res.keep]):
        members = np.flatnonzero(res.groups == g)
        best = members[priority[members] == priority[members].max()].min()
        assert res.keep[best] and res.keep[members].sum() == 1


def test_choose_kept_transitive_group():
    # Chain 0~1~2 (one group even if 0 and 2 are not close); 3 and 5 alone; 4~6.
    groups = np.array([0, 0, 0, 3, 4, 5, 4])
    keep, dup_of = choose_kept(groups, np.array([1.0, 5.0, 5.0, 0.0, 2.0, 0.0, 3.0]))
    assert keep.tolist() == [False, True, False, True, False, True, True]
    assert dup_of.tolist() == [1, -1, 1, -1, 6, -1, -1]
    with pytest.raises(ValueError):
        choose_kept(groups, np.array([np.nan] * 7))


def test_rejects_unnormalised_input():
    with pytest.raises(ValueError):
        semdedup(np.full((10, 4), 3.0, np.float32), 2, EPS)


def test_groups_found_cluster_by_cluster_equal_the_groups_of_all_pairs():
    from densefusion_hf.dedup.semantic import duplicate_groups, kmeans, near_duplicate_pairs
    from densefusion_hf.dedup.unionfind import connected_components

    x, _, _ = _planted(seed=3)
    _, assignment, _ = kmeans(x, 7, seed=0)
    # A large eps (the paper's 0.4) chains many rows; small blocks exercise the block loop.
    pairs = near_duplicate_pairs(x, assignment, 0.4, max_block_elems=5000)
    groups, n_pairs = duplicate_groups(x, assignment, 0.4, max_block_elems=5000)
    assert n_pairs == len(pairs) > 100
    assert groups.tolist() == connected_components(len(x), pairs).tolist()
