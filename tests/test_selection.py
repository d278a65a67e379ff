"""The selection arithmetic: top N per cluster, quotas, target size, ties, seeded subsets."""

import numpy as np

from densefusion_hf.stages.selection import cluster_size_histogram, random_subset, rank_in_clusters, select


def keys(n):
    return [f"k{i:03d}" for i in range(n)]


def test_rank_in_clusters_orders_by_score_then_key():
    rank = rank_in_clusters(np.array([0, 0, 1, 0, 1]), np.array([0.5, 0.9, 0.1, 0.5, 0.3]), keys(5))
    # cluster 0: k001 (0.9), then k000 and k003 tie at 0.5 -> smaller key first
    assert rank.tolist() == [1, 0, 1, 2, 0]


def test_top_per_cluster_drops_the_rest_with_its_rank():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    scores = np.array([3.0, 2.0, 1.0, 5.0, 4.0, 1.0])
    result = select(keys(6), scores, clusters, ["other"] * 6, top_per_cluster=2)
    assert result.selected.tolist() == [True, True, False, True, True, True]
    assert result.reasons.to_pylist()[2] == "cluster_rank" and "rank 3 in cluster 0" in result.details.to_pylist()[2]


def test_target_size_takes_every_clusters_best_first():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    scores = np.array([3.0, 2.0, 1.0, 5.0, 4.0, 0.5])
    result = select(keys(6), scores, clusters, ["other"] * 6, target_size=4)
    # rank 0 of each cluster (k000, k003, k005), then the best rank-1 row (k004, score 4.0)
    assert np.flatnonzero(result.selected).tolist() == [0, 3, 4, 5]
    assert result.reasons.to_pylist()[1] == "target_size" and result.reasons.to_pylist()[2] == "target_size"


def test_category_quotas_minimum_and_maximum():
    n = 10
    categories = ["animal"] * 6 + ["text"] * 2 + ["other"] * 2
    scores = np.array([10, 9, 8, 7, 6, 5, 1, 0.5, 4, 3], dtype=float)
    result = select(keys(n), scores, None, categories, target_size=5,
                    min_share={"text": 0.4}, max_share={"animal": 0.4})
    chosen = [categories[i] for i in np.flatnonzero(result.selected)]
    assert chosen.count("text") == 2            # ceil(0.4 * 5), served first despite low scores
    assert chosen.count("animal") == 2          # floor(0.4 * 5)
    assert len(chosen) == 5 and chosen.count("other") == 1
    animal_out = [i for i in range(6) if not result.selected[i]]
    assert all(result.reasons.to_pylist()[i] == "category_quota" for i in animal_out)
    assert result.reasons.to_pylist()[9] == "target_size"   # 'other' with the lower score
    assert result.unmet_minimums == {}


def test_unmet_minimum_is_reported():
    result = select(keys(4), np.ones(4), None, ["a", "a", "a", "b"], target_size=4, min_share={"b": 0.5})
    assert result.unmet_minimums == {"b": {"wanted": 2, "selected": 1}}
    assert result.selected.all()


def test_selection_is_deterministic_and_independent_of_row_order():
    rng = np.random.default_rng(0)
    n = 200
    k = keys(n)
    clusters = rng.integers(0, 10, n)
    scores = rng.integers(0, 5, n).astype(float)  # many ties, broken by key
    cats = [["a", "b", "c"][i % 3] for i in range(n)]
    first = select(k, scores, clusters, cats, top_per_cluster=7, target_size=50, max_share={"a": 0.3})
    perm = rng.permutation(n)
    second = select([k[i] for i in perm], scores[perm], clusters[perm], [cats[i] for i in perm],
                    top_per_cluster=7, target_size=50, max_share={"a": 0.3})
    assert {k[i] for i in np.flatnonzero(first.selected)} == {k[perm[i]] for i in np.flatnonzero(second.selected)}
    assert first.selected.sum() == 50


def test_random_subset_is_seeded_and_nested():
    k = keys(1000)
    a = random_subset(k, 100, seed=0)
    assert a.sum() == 100 and (random_subset(k, 100, seed=0) == a).all()
    assert (random_subset(k, 100, seed=1) != a).any()
    small = random_subset(k, 40, seed=0)
    assert not (small & ~a).any()  # the smaller subset lies inside the larger one
    shuffled = k[::-1]
    assert {shuffled[i] for i in np.flatnonzero(random_subset(shuffled, 100, 0))} == {k[i] for i in np.flatnonzero(a)}


def test_cluster_size_histogram():
    clusters = np.array([0] * 3 + [1] + [2] * 25 + [3] * 120)
    assert cluster_size_histogram(clusters) == [["1", 1], ["2-5", 1], ["6-10", 0], ["11-20", 0], ["21-50", 1],
                                                 ["51-100", 0], [">100", 1]]


def sequential_select(keys, scores, clusters, categories, *, top_per_cluster=None, target_size=None,
                      min_share=None, max_share=None):
    """The selection rule written row by row, as the module docstring states it: the reference the
    column-wise ``select`` must agree with."""
    import math
    n = len(keys)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    clusters = np.zeros(n, np.int64) if clusters is None else np.asarray(clusters, np.int64)
    order = sorted(range(n), key=lambda i: (clusters[i], -scores[i], keys[i]))
    rank, seen = np.zeros(n, np.int64), {}
    for i in order:
        rank[i] = seen.get(clusters[i], 0)
        seen[clusters[i]] = rank[i] + 1
    reasons, details = [None] * n, [None] * n
    if top_per_cluster is not None:
        for i in np.flatnonzero(rank >= top_per_cluster):
            reasons[i] = "cluster_rank"
            details[i] = f"rank {rank[i] + 1} in cluster {clusters[i]}; the best {top_per_cluster} are kept"
    pool = sorted((i for i in range(n) if reasons[i] is None), key=lambda i: (rank[i], -scores[i], keys[i]))
    target = len(pool) if target_size is None else min(target_size, len(pool))
    minimum = {c: math.ceil(s * target) for c, s in (min_share or {}).items()}
    maximum = {c: math.floor(s * target) for c, s in (max_share or {}).items()}
    chosen, count = set(), {}
    for category, wanted in minimum.items():
        for i in pool:
            if count.get(category, 0) >= min(wanted, maximum.get(category, wanted)) or len(chosen) >= target:
                break
            if categories[i] == category:
                chosen.add(i)
                count[category] = count.get(category, 0) + 1
    for i in pool:
        if len(chosen) >= target:
            break
        if i not in chosen and (categories[i] not in maximum or count.get(categories[i], 0) < maximum[categories[i]]):
            chosen.add(i)
            count[categories[i]] = count.get(categories[i], 0) + 1
    for i in pool:
        if i not in chosen:
            full = categories[i] in maximum and count.get(categories[i], 0) >= maximum[categories[i]]
            reasons[i] = "category_quota" if full else "target_size"
            details[i] = (f"category {categories[i]} is full ({maximum[categories[i]]} rows)" if full
                          else f"beyond the target of {target} rows")
    unmet = {c: {"wanted": w, "selected": count.get(c, 0)} for c, w in minimum.items() if count.get(c, 0) < w}
    return sorted(chosen), reasons, details, rank, unmet


def test_column_wise_selection_agrees_with_the_rule_row_by_row():
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(0, 120))
        k = [f"k{v:04d}" for v in rng.permutation(5000)[:n]]
        scores = rng.integers(0, 6, n).astype(float)
        scores[rng.random(n) < 0.1] = np.nan
        clusters = rng.integers(0, 8, n) if trial % 3 else None
        cats = [["a", "b", "c", "other"][v] for v in rng.integers(0, 4, n)]
        options = {"top_per_cluster": int(rng.integers(1, 6)) if trial % 2 else None,
                   "target_size": int(rng.integers(0, n + 5)) if trial % 4 else None,
                   "min_share": {"b": float(rng.uniform(0, 0.6)), "z": 0.1} if trial % 5 else None,
                   "max_share": {"a": float(rng.uniform(0, 0.5)), "b": float(rng.uniform(0, 0.5))} if trial % 3 else None}
        chosen, reasons, details, rank, unmet = sequential_select(k, scores, clusters, cats, **options)
        result = select(k, scores, clusters, cats, **options)
        assert np.flatnonzero(result.selected).tolist() == chosen, (trial, options)
        assert result.reasons.to_pylist() == reasons and result.details.to_pylist() == details
        assert result.cluster_rank.tolist() == rank.tolist() and result.unmet_minimums == unmet
