"""Benchmark ``densefusion_hf.dedup.hamming.hamming_pairs`` (near-duplicate pHash search).

Data: uniformly random 64-bit hashes (what distinct images' pHashes look like to the search) with
planted near duplicates: about 5% of the rows are copies of an earlier row with 0..threshold
random bits flipped (several copies may share a source, so they form groups). Each copy's source
is an earlier row that is not itself a copy, so every planted pair is within the threshold and a
prefix of the data keeps all of its own planted pairs.

Checks that the result is identical to brute force on the first ``--check-size`` rows (exits 1
if not), times brute force there as the baseline, then times ``hamming_pairs`` at each size and
reports the pairs found and the recall of the planted pairs (must be 1: the search is exact).
Target: 1M hashes in under 60 s on 2 cores. It also prints the search's peak memory per hash (numpy's
allocations, traced), which bounds the dedup decision's peak on the driver at scale.

    python benchmarks/hamming_search.py [--sizes 100000,300000,1000000] [--threshold 10]

Default threshold 10: the recipe's default is 8 (``dedup.threshold``) and 10 is about the
largest distance still used for near duplicates with 64-bit pHash; the search gets slower as
the threshold grows, so timing at 10 bounds the cost at the default.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

from densefusion_hf.dedup import hamming
from densefusion_hf.dedup.hamming import brute_force_pairs, hamming_pairs

TARGET_SIZE = 1_000_000
TARGET_SECONDS = 60.0


def make_hashes(n: int, threshold: int, seed: int, dup_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes with planted near duplicates; returns (hashes, planted (source, copy) pairs)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    copies = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(n * dup_fraction)), replace=False))
    originals = np.setdiff1d(np.arange(n), copies)  # row 0 is always one
    below = np.searchsorted(originals, copies)  # originals before each copy (>= 1)
    sources = originals[(rng.random(len(copies)) * below).astype(np.int64)]
    # Flip a random set of 0..threshold distinct bits: the first k of a random permutation of 64.
    flips = rng.integers(0, threshold + 1, len(copies))
    chosen = np.argsort(rng.random((len(copies), 64)), axis=1) < flips[:, None]
    masks = (chosen.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    hashes[copies] = hashes[sources] ^ masks
    return hashes, np.stack([sources, copies], axis=1)


def recall(found: np.ndarray, planted: np.ndarray, n: int) -> float:
    if not len(planted):
        return 1.0
    return float(np.isin(planted[:, 0] * n + planted[:, 1], found[:, 0] * n + found[:, 1]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000", help="comma-separated numbers of hashes")
    parser.add_argument("--threshold", type=int, default=10, help="largest Hamming distance of a pair (default 10)")
    parser.add_argument("--check-size", type=int, default=50_000, help="rows compared with brute force")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    t = args.threshold

    print(f"threshold {t}, os.cpu_count() = {os.cpu_count()}, numpy {np.__version__}")
    data, planted = make_hashes(max(sizes + [args.check_size]), t, args.seed)

    check = data[: args.check_size]
    start = time.perf_counter()
    expected = brute_force_pairs(check, t)
    brute_seconds = time.perf_counter() - start
    start = time.perf_counter()
    got = hamming_pairs(check, t)
    fast_seconds = time.perf_counter() - start
    same = got.dtype == np.int64 and got.shape == expected.shape and np.array_equal(got, expected)
    print(f"identical to brute force on {args.check_size}: {'yes' if same else 'no'} "
          f"({len(expected)} pairs; brute force {brute_seconds:.2f} s, hamming_pairs {fast_seconds:.2f} s)")
    if not same:
        return 1

    print(f"\n{'size':>10} {'seconds':>9} {'B/hash':>7} {'pairs':>10} {'planted':>8} {'recall':>7}  "
          f"chunks (shift, width, radius)")
    timings = {}
    for n in sizes:
        hashes = data[:n]
        mine = planted[planted[:, 1] < n]
        tracemalloc.start()
        start = time.perf_counter()
        found = hamming_pairs(hashes, t)
        seconds = timings[n] = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / n
        tracemalloc.stop()
        plan = hamming._plan(hamming._round(len(np.unique(hashes))), t, 64)
        print(f"{n:>10} {seconds:>9.2f} {peak:>7.0f} {len(found):>10} {len(mine):>8} {recall(found, mine, n):>7.4f}  "
              f"{'brute force' if plan is None else plan}")
    print(f"\nbaseline: brute force on {args.check_size} took {brute_seconds:.2f} s; quadratic extrapolation "
          + ", ".join(f"{n}: {brute_seconds * (n / args.check_size) ** 2:.0f} s" for n in sizes))
    if TARGET_SIZE in timings:
        met = timings[TARGET_SIZE] < TARGET_SECONDS
        print(f"target {TARGET_SIZE} hashes in < {TARGET_SECONDS:.0f} s: {'met' if met else 'NOT met'} "
              f"({timings[TARGET_SIZE]:.1f} s on {os.cpu_count()} cores, one used)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
