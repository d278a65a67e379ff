"""Benchmark SemDeDup (densefusion_hf.dedup.semantic) on synthetic CLIP-like embeddings.

Data: ``--centres`` random unit centres on the sphere with log-normally skewed popularity (real
k-means clusters are uneven); each row is ``normalise(centre + sigma * g / sqrt(dim))`` with
``g ~ N(0, I)``, so rows of one centre have cosine about 1 / (1 + sigma^2) (0.61 for sigma 0.8),
far below any duplicate threshold. Planted rows, chosen at random positions, each built from a
distinct base row (the source) of the same generation block at an exact cosine:

* near duplicates (``--dup-frac`` of rows): cosine to the source uniform in
  [1 - 0.9 eps, 1 - 0.1 eps] (0.955..0.995 for eps 0.05, roughly a re-encoded or resized copy);
* near misses (``--miss-frac`` of rows): cosine uniform in [1 - 1.5 eps, 1 - 1.1 eps], just outside
  the threshold; finding any of them is a false positive.

The data is generated in blocks straight into one float32 (n, dim) array (2 GiB at 1M x 512).

Baseline: exact global all-pairs search (the same blocked code as SemDeDup, with every row in one
cluster) timed on a ``--baseline-rows`` subset made of planted pairs, then extrapolated
quadratically to n. The extrapolation is labelled as such; running it for real at 1M rows would take
hours. The subset also checks that SemDeDup's within-cluster search misses nothing the global
search finds there.

Training budget: k-means costs (training rows x iterations x k x dim); on 2 cores the library
default (256 * k rows capped at n, 20 iterations) is about 20 full passes over 1M rows, over half an
hour. The benchmark spends the same budget as 16 rows per centroid x 20 iterations but as 64 rows x
5 iterations: at 100k rows / k=1,000 that kept more planted pairs inside one cluster (recall 0.989
vs 0.978), because with few rows per centroid the sampling noise, not convergence, is what limits
the centroids.

Run: ``python benchmarks/semdedup.py --n 100000 --k 1000`` (quick) or with no options (1M x 512, k=10,000).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from densefusion_hf.dedup.semantic import (  # noqa: E402
    FAISS_POINTS_PER_CENTROID,
    effective_k,
    near_duplicate_pairs,
    semdedup,
)
from densefusion_hf.recipe import SemDedup as RecipeSemDedup  # noqa: E402
from densefusion_hf.stages.semdedup import TRAIN_POINTS_PER_CLUSTER  # noqa: E402

GIB = 1 << 30


def peak_rss_gib() -> float:
    """Process peak resident memory (Linux reports ru_maxrss in KiB), including the data itself."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _normalise_rows(x: np.ndarray) -> None:
    x /= np.linalg.norm(x, axis=1, keepdims=True)


def _at_cosine(rng: np.random.Generator, src: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """Unit rows at exactly cosine ``cos`` from the unit rows ``src``, in a random orthogonal direction."""
    u = rng.standard_normal(src.shape, dtype=np.float32)
    u -= np.sum(u * src, axis=1, keepdims=True) * src
    _normalise_rows(u)
    out = cos[:, None] * src + np.sqrt(1.0 - cos * cos)[:, None] * u
    _normalise_rows(out)
    return out


def make_data(
    n: int,
    dim: int,
    centres: int,
    *,
    sigma: float,
    eps: float,
    dup_frac: float,
    miss_frac: float,
    seed: int,
    block: int = 65536,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (n, dim) float32, planted duplicate pairs (p, 2), planted near-miss pairs (q, 2))."""
    rng = np.random.default_rng([seed, 0])
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    _normalise_rows(c)
    weights = rng.lognormal(0.0, 1.0, size=centres)
    weights /= weights.sum()
    x = np.empty((n, dim), dtype=np.float32)
    dups: list[np.ndarray] = []
    misses: list[np.ndarray] = []
    scale = np.float32(sigma / np.sqrt(dim))
    for b, start in enumerate(range(0, n, block)):
        rng = np.random.default_rng([seed, 1, b])
        size = min(block, n - start)
        xb = x[start : start + size]
        xb[:] = c[rng.choice(centres, size=size, p=weights)]
        xb += scale * rng.standard_normal((size, dim), dtype=np.float32)
        _normalise_rows(xb)
        n_dup = int(round(size * dup_frac))
        n_miss = int(round(size * miss_frac))
        planted = n_dup + n_miss
        if 2 * planted > size:
            raise ValueError("dup-frac + miss-frac must be at most 0.5")
        perm = rng.permutation(size)
        target, source = perm[:planted], perm[planted : 2 * planted]
        cos = np.concatenate(
            [
                rng.uniform(1 - 0.9 * eps, 1 - 0.1 * eps, size=n_dup),
                rng.uniform(1 - 1.5 * eps, 1 - 1.1 * eps, size=n_miss),
            ]
        ).astype(np.float32)
        xb[target] = _at_cosine(rng, xb[source], cos)
        pairs = np.sort(np.stack([source, target], axis=1), axis=1).astype(np.int64) + start
        dups.append(pairs[:n_dup])
        misses.append(pairs[n_dup:])
    return x, np.concatenate(dups), np.concatenate(misses)


def same_group_fraction(groups: np.ndarray, pairs: np.ndarray) -> float:
    return float(np.mean(groups[pairs[:, 0]] == groups[pairs[:, 1]])) if len(pairs) else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="rows (default 1,000,000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512, CLIP ViT-B)")
    p.add_argument("--k", type=int, default=10_000, help="k-means clusters (default 10,000)")
    p.add_argument("--eps", type=float, default=0.05, help="duplicate if cosine > 1 - eps (default 0.05)")
    p.add_argument("--centres", type=int, default=10_000, help="true Gaussian centres in the data (default 10,000)")
    p.add_argument("--sigma", type=float, default=0.8, help="noise norm around a centre (default 0.8)")
    p.add_argument("--dup-frac", type=float, default=0.02, help="fraction of rows that are planted near duplicates")
    p.add_argument("--miss-frac", type=float, default=0.01, help="fraction of rows planted just outside eps")
    p.add_argument("--niter", type=int, default=RecipeSemDedup().iterations,
                   help="k-means iterations (default: the recipe's default)")
    p.add_argument(
        "--train-per-centroid",
        type=int,
        default=TRAIN_POINTS_PER_CLUSTER,
        help="k-means training sample = this * k rows (default: the semdedup stage's; the library default is "
        f"{FAISS_POINTS_PER_CENTROID}, faiss's cap, which at 1M rows and k=10,000 means training on all rows)",
    )
    p.add_argument("--baseline-rows", type=int, default=20_000, help="subset size for the brute-force baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-target", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--mem-target-gib", type=float, default=8.0, help="GiB (default 8)")
    p.add_argument("--recall-target", type=float, default=0.99)
    a = p.parse_args(argv)

    import faiss

    threads = faiss.omp_get_max_threads()
    print(f"os.cpu_count() = {os.cpu_count()}, faiss OpenMP threads = {threads}, faiss {faiss.__version__}")
    k = effective_k(a.k, a.n)
    n_train = min(a.n, max(k, a.train_per_centroid * k))
    print(
        f"n={a.n:,} dim={a.dim} k={k:,} eps={a.eps} centres={a.centres:,} sigma={a.sigma} "
        f"dup-frac={a.dup_frac} miss-frac={a.miss_frac} niter={a.niter} train-rows={n_train:,} seed={a.seed}"
    )

    t = time.perf_counter()
    x, dups, misses = make_data(
        a.n, a.dim, a.centres, sigma=a.sigma, eps=a.eps, dup_frac=a.dup_frac, miss_frac=a.miss_frac, seed=a.seed
    )
    t_data = time.perf_counter() - t
    print(
        f"data: {x.nbytes / GIB:.2f} GiB float32, {len(dups):,} planted duplicate pairs, "
        f"{len(misses):,} planted near misses, generated in {t_data:.1f} s (not counted below)"
    )

    res = semdedup(x, a.k, a.eps, seed=a.seed, niter=a.niter, max_train_points=n_train)
    tm = res.timings
    sizes = np.bincount(res.assignment, minlength=len(res.centroids))
    print("\n== SemDeDup phases (wall seconds)")
    print(f"train  {tm['train']:8.1f}   (faiss spherical k-means, {n_train:,} rows x {a.niter} iterations)")
    print(f"assign {tm['assign']:8.1f}   (IndexFlatIP over all {a.n:,} rows)")
    print(f"pairs  {tm['pairs']:8.1f}   (exact within clusters; sizes mean {sizes.mean():.0f}, max {sizes.max():,})")
    print(f"groups {tm['groups']:8.1f}   (connected components + keep rule)")
    print(f"total  {tm['total']:8.1f}")

    recall_group = same_group_fraction(res.groups, dups)
    same_cluster = float(np.mean(res.assignment[dups[:, 0]] == res.assignment[dups[:, 1]]))
    false_pos = same_group_fraction(res.groups, misses)
    n_multi = int(np.count_nonzero(np.bincount(res.groups[~res.keep]))) if res.n_dropped else 0
    print("\n== Result")
    dropped = res.n_dropped
    print(f"pairs found {res.n_pairs:,}; duplicate groups {n_multi:,}; rows dropped {dropped:,} ({dropped / a.n:.2%})")
    print(f"planted pairs in the same cluster      {same_cluster:.4f}  (upper bound for recall)")
    print(f"recall: planted pairs in the same group {recall_group:.4f}")
    print(f"near misses wrongly grouped           {false_pos:.4f}")

    # Baseline: exact global all-pairs search on a subset made of planted pairs, extrapolated as m^2.
    m = min(a.baseline_rows, a.n)
    take = dups[: m // 2].ravel()
    if len(take) < m:
        rest = np.setdiff1d(np.arange(a.n), take)
        take = np.concatenate([take, np.random.default_rng(a.seed).choice(rest, m - len(take), replace=False)])
    subset = np.sort(take)
    xs = x[subset]
    t = time.perf_counter()
    global_pairs = near_duplicate_pairs(xs, np.zeros(m, dtype=np.int64), a.eps)
    t_sub = time.perf_counter() - t
    t_full = t_sub * (a.n / m) ** 2
    ours = subset[global_pairs]  # back to global row numbers; compare with SemDeDup's groups
    agree = same_group_fraction(res.groups, ours) if len(ours) else float("nan")
    print("\n== Baseline: exact global all-pairs search (no clustering)")
    print(f"measured on {m:,} rows: {t_sub:.2f} s, {len(global_pairs):,} pairs; SemDeDup grouped {agree:.4f} of them")
    print(f"EXTRAPOLATED to {a.n:,} rows (x (n/m)^2 = {(a.n / m) ** 2:,.0f}): {t_full:,.0f} s = {t_full / 3600:.1f} h")
    print(f"speed-up of SemDeDup total over extrapolated baseline: {t_full / tm['total']:.0f}x")
    default_train = min(a.n, FAISS_POINTS_PER_CENTROID * k)
    if (default_train, 20) != (n_train, a.niter):
        est = tm["train"] * (default_train * 20) / (n_train * a.niter)
        print(
            f"(ESTIMATE, linear in rows x iterations: the library defaults, {default_train:,} training rows x 20 "
            f"iterations, would train in ~{est:,.0f} s instead of {tm['train']:.0f} s)"
        )

    peak = peak_rss_gib()
    print(f"\npeak RSS {peak:.2f} GiB (ru_maxrss: whole process peak, including the {x.nbytes / GIB:.2f} GiB of data)")
    print("\n== Targets")
    ok = True
    for name, met, text in (
        ("time", tm["total"] < a.time_target, f"total {tm['total']:.1f} s < {a.time_target:.0f} s"),
        ("memory", peak < a.mem_target_gib, f"peak {peak:.2f} GiB < {a.mem_target_gib:.0f} GiB"),
        ("recall", recall_group >= a.recall_target, f"recall {recall_group:.4f} >= {a.recall_target}"),
    ):
        ok &= met
        print(f"{name:7s} {'MET' if met else 'NOT MET'}: {text}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
