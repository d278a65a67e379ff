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
    assert result.reasons[2] == "cluster_rank" and "rank 3 in cluster 0" in result.details[2]


def test_target_size_takes_every_clusters_best_first():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    scores = np.array([3.0, 2.0, 1.0, 5.0, 4.0, 0.5])
    result = select(keys(6), scores, clusters, ["other"] * 6, target_size=4)
    # rank 0 of each cluster (k000, k003, k005), then the best rank-1 row (k004, score 4.0)
    assert np.flatnonzero(result.selected).tolist() == [0, 3, 4, 5]
    assert result.reasons[1] == "target_size" and result.reasons[2] == "target_size"


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
    assert all(result.reasons[i] == "category_quota" for i in animal_out)
    assert result.reasons[9] == "target_size"   # 'other' with the lower score
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
