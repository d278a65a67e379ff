"""hamming_pairs (multi-index near-duplicate search) must return exactly brute force's pairs."""

from __future__ import annotations

import numpy as np
import pytest

from densefusion_hf.dedup import hamming
from densefusion_hf.dedup.hamming import brute_force_pairs, hamming_pairs


def planted(n: int, threshold: int, seed: int, copies: float = 0.3) -> np.ndarray:
    """Random hashes where a fraction are copies of others with 0..threshold random bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    k = int(n * copies)
    dst, src = rng.choice(n, k, replace=False), rng.integers(0, n, k)
    chosen = np.argsort(rng.random((k, 64)), axis=1) < rng.integers(0, threshold + 1, k)[:, None]
    h[dst] = h[src] ^ (chosen.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    return h


def with_copies(h: np.ndarray, seed: int) -> np.ndarray:
    """Add exact-duplicate groups: 300 copies of one hash, 40 of the blank hash, pairs and triples."""
    rng = np.random.default_rng(seed)
    extra = [np.full(300, h[0]), np.zeros(40, np.uint64), np.repeat(h[1:60], rng.integers(1, 3, 59))]
    out = np.concatenate([h, *extra])
    return out[rng.permutation(len(out))]


def check(h: np.ndarray, t: int, **kwargs) -> np.ndarray:
    got = hamming_pairs(h, t, **kwargs)
    want = brute_force_pairs(h, t)
    assert got.dtype == np.int64 and got.ndim == 2 and got.shape[1] == 2
    np.testing.assert_array_equal(got, want)
    return got


def layout(t: int) -> list[tuple[int, int]]:
    """A forced chunk layout with small probed chunks (10-12 bits), so probing runs on few hashes."""
    radii = [0, 0, 0]
    for i in range(max(0, t - 3)):
        radii[i % 3] += 1
    return [(10, radii[0]), (10, radii[1]), (12, radii[2]), (32, 0)]


@pytest.mark.parametrize("t", range(0, 11))
def test_matches_brute_force(t):
    check(with_copies(planted(3000, t, seed=t), seed=t), t)


@pytest.mark.parametrize("t", [1, 3, 6, 8, 10])
def test_probed_chunks_match_brute_force(t):
    # 10-bit chunks over 3000 hashes: buckets of 1, 2 and 3+ hashes, so every probing path runs.
    check(with_copies(planted(3000, t, seed=100 + t), seed=t), t, chunks=layout(t))


@pytest.mark.parametrize("chunks", [[(4, 2), (6, 2), (7, 2), (47, 0)], [(5, 1), (5, 1), (6, 1), (8, 1), (40, 0)]])
def test_narrow_chunks(chunks):
    check(planted(1500, 8, seed=7), 8, chunks=chunks)


def test_clustered_hashes_and_small_batches(monkeypatch):
    # Near copies of 5 hashes only: huge buckets in every chunk; tiny batches exercise batching.
    monkeypatch.setattr(hamming, "_BATCH", 1000)
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**64, 5, dtype=np.uint64)[rng.integers(0, 5, 1200)]
    flips = np.uint64(1) << rng.integers(0, 64, (1200, 3)).astype(np.uint64)
    h = base ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]
    for t in (2, 6):
        check(h, t)
        check(h, t, chunks=layout(t))


def test_output_is_sorted_unique_and_ordered():
    got = check(with_copies(planted(2000, 6, seed=1), seed=1), 6)
    assert len(got) > 1000
    assert (got[:, 0] < got[:, 1]).all()
    keys = got[:, 0] * 10**6 + got[:, 1]
    assert (np.diff(keys) > 0).all()


def test_finds_every_planted_pair():
    rng = np.random.default_rng(5)
    h = rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False)
    flips = np.uint64(1) << rng.permutation(64)[:10].astype(np.uint64)
    h[1] = h[0] ^ np.bitwise_or.reduce(flips)  # exactly 10 bits apart
    assert [0, 1] in hamming_pairs(h, 10).tolist()
    assert [0, 1] not in hamming_pairs(h, 9).tolist()


def test_empty_and_single():
    for h in (np.zeros(0, np.uint64), np.array([7], np.uint64)):
        got = hamming_pairs(h, 5)
        assert got.dtype == np.int64 and got.shape == (0, 2)
        assert brute_force_pairs(h, 5).shape == (0, 2)


def test_threshold_zero_is_exact_copies():
    h = np.array([5, 9, 5, 4, 9, 5], np.uint64)
    np.testing.assert_array_equal(hamming_pairs(h, 0), [[0, 2], [0, 5], [1, 4], [2, 5]])


def test_short_hashes_and_large_thresholds():
    rng = np.random.default_rng(9)
    check(rng.integers(0, 2**16, 3000).astype(np.uint64), 3)  # e.g. 4x4 hashes: high bits all 0
    check(planted(800, 20, seed=2), 20)  # past the pigeonhole's reach: brute force, still exact
    check(planted(300, 64, seed=2), 64)  # every pair


def test_accepts_signed_and_lists():
    h = (planted(500, 4, seed=4) >> np.uint64(1)).astype(np.int64)
    np.testing.assert_array_equal(hamming_pairs(h, 4), brute_force_pairs(h, 4))
    assert hamming_pairs([1, 3, 2**64 - 1], 1).tolist() == [[0, 1]]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        hamming_pairs(np.zeros((2, 2), np.uint64), 1)
    with pytest.raises(ValueError):
        hamming_pairs(np.zeros(3, np.uint64), -1)
    with pytest.raises(ValueError):
        hamming_pairs(np.array([-1, 2]), 1)
    with pytest.raises(ValueError):
        hamming_pairs(np.zeros(3, np.uint64), 4, chunks=[(32, 1), (32, 1)])  # too wide to probe
    with pytest.raises(ValueError):
        hamming_pairs(np.zeros(3, np.uint64), 4, chunks=[(32, 0), (32, 0)])  # covers only 1 error
