"""Throughput and agreement of ``densefusion_hf.dedup.phash`` against imagehash.

Builds a folder of 1024-px (long side) JPEGs at quality 90 from scikit-image's bundled photos
(random crops, flips/rotations and tone changes of them, so each is a distinct picture), plus known
near-duplicate sets (a resized copy, a copy re-encoded at lower quality and a lightly cropped copy
of some of them), then, in the same run:

* baseline: ``imagehash.phash(PIL.Image.open(path))``, one process, images/s;
* ours: ``phash_many`` on the files' bytes (reading included), all cores, images/s;
* agreement: mean Hamming distance between the two hashes of each image, and whether the pairs
  within distance ``--threshold`` are the same set for both.

Exits 1 if the agreement target fails (speed depends on the machine and its load, so it is only
reported).

    python benchmarks/phash_throughput.py [--distinct 400] [--dup-sets 25] [--processes N]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from densefusion_hf.dedup.phash import hamming, phash_many, refined_pairs
from densefusion_hf.recipe import Dedup

LONG_SIDE = 1024


def _sources() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled photographs (no download needed), as RGB uint8 arrays."""
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "retina", "hubble_deep_field",
             "immunohistochemistry", "moon", "coins", "clock", "brick", "grass", "gravel", "cell",
             "colorwheel", "page", "text")
    out = []
    for name in names:
        try:
            out.append((name, getattr(data, name)()))
        except Exception:  # a photo missing from this scikit-image install: use the others
            continue
    try:
        left, right, _ = data.stereo_motorcycle()
        out += [("motorcycle_left", left), ("motorcycle_right", right)]
    except Exception:
        pass
    rgb = []
    for name, arr in out:
        image = Image.fromarray(arr)
        rgb.append((name, np.asarray(image.convert("RGB"))))
    return rgb


def _to_long_side(image: Image.Image, long_side: int) -> Image.Image:
    w, h = image.size
    scale = long_side / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _variant(rng: np.random.Generator, arr: np.ndarray) -> Image.Image:
    """A distinct picture from one source: a random crop, one of 8 flips/rotations, a tone curve."""
    h, w = arr.shape[:2]
    ch = int(h * rng.uniform(0.45, 1.0))
    cw = int(w * rng.uniform(0.45, 1.0))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    crop = arr[y:y + ch, x:x + cw].astype(np.float32) / 255.0
    crop = crop ** rng.uniform(0.6, 1.6)  # gamma
    crop = crop * rng.uniform(0.8, 1.2, size=3)  # white balance
    image = Image.fromarray((np.clip(crop, 0, 1) * 255 + 0.5).astype(np.uint8))
    transpose = int(rng.integers(0, 8))
    if transpose:
        image = image.transpose(Image.Transpose(transpose - 1))
    return _to_long_side(image, LONG_SIDE)


def build_dataset(folder: Path, distinct: int, dup_sets: int, seed: int) -> tuple[list[Path], list[list[int]]]:
    """Write the JPEGs; return their paths and the known duplicate groups (indices into paths)."""
    rng = np.random.default_rng(seed)
    sources = _sources()
    paths: list[Path] = []
    groups: list[list[int]] = []

    def write(name: str, blob: bytes) -> int:
        path = folder / name
        path.write_bytes(blob)
        paths.append(path)
        return len(paths) - 1

    originals: list[Image.Image] = []
    for i in range(distinct):
        name, arr = sources[i % len(sources)]
        image = _variant(rng, arr)
        write(f"{i:04d}_{name}.jpg", _jpeg(image, 90))
        if i < dup_sets:
            originals.append(image)

    for i, image in enumerate(originals):
        group = [i]
        w, h = image.size
        # resized to 40-70% and saved again
        smaller = _to_long_side(image, int(LONG_SIDE * rng.uniform(0.4, 0.7)))
        group.append(write(f"dup{i:03d}_resized.jpg", _jpeg(smaller, 90)))
        # same pixels, re-encoded at a low quality
        group.append(write(f"dup{i:03d}_q{(q := int(rng.integers(30, 60)))}.jpg", _jpeg(image, q)))
        # 2-3% cropped off each side
        f = rng.uniform(0.02, 0.03)
        dx, dy = round(w * f), round(h * f)
        group.append(write(f"dup{i:03d}_crop.jpg", _jpeg(image.crop((dx, dy, w - dx, h - dy)), 85)))
        groups.append(group)
    return paths, groups


def close_pairs(hashes: list[int], threshold: int) -> set[tuple[int, int]]:
    """All index pairs (i < j) whose hashes are within ``threshold`` bits."""
    if all(h < (1 << 64) for h in hashes) and hasattr(np, "bitwise_count"):
        arr = np.array(hashes, dtype=np.uint64)
        dist = np.bitwise_count(arr[:, None] ^ arr[None, :])
        i, j = np.nonzero(np.triu(dist <= threshold, k=1))
        return set(zip(i.tolist(), j.tolist()))
    return {(i, j) for i, j in combinations(range(len(hashes)), 2)
            if hamming(hashes[i], hashes[j]) <= threshold}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distinct", type=int, default=400, help="distinct 1024-px JPEGs (default 400)")
    parser.add_argument("--dup-sets", type=int, default=25,
                        help="originals that also get a resized, a low-quality and a cropped copy (default 25)")
    parser.add_argument("--processes", type=int, default=None, help="workers for ours (default: os.cpu_count())")
    parser.add_argument("--hash-size", type=int, default=8)
    parser.add_argument("--threshold", type=int, default=Dedup().threshold,
                        help="near-duplicate Hamming threshold (default: the recipe's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timing runs; the best of each is reported (default 3)")
    parser.add_argument("--target-speedup", type=float, default=5.0)
    parser.add_argument("--target-mean-bits", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None, help="write the JPEGs here instead of a temp dir")
    args = parser.parse_args(argv)

    import imagehash

    with tempfile.TemporaryDirectory(prefix="phash_bench_") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths, groups = build_dataset(folder, args.distinct, args.dup_sets, args.seed)
        n = len(paths)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"dataset: {n} JPEGs ({args.distinct} distinct + {len(groups)} duplicate sets of 4), "
              f"{mb:.1f} MB, built in {time.perf_counter() - t0:.1f}s")

        # Best of --repeat runs, interleaved, so a burst of load from other processes on a shared
        # machine hurts neither side more than the other.
        t_base = t_ours = t_ours_1 = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            theirs = []
            for p in paths:
                with Image.open(p) as image:
                    theirs.append(int(str(imagehash.phash(image, args.hash_size)), 16))
            t_base = min(t_base, time.perf_counter() - t0)

            t0 = time.perf_counter()
            blobs = [p.read_bytes() for p in paths]
            ours = phash_many(blobs, hash_size=args.hash_size, processes=args.processes)
            # What the dedup stage does next: rows in a pair near the threshold are hashed again in full.
            refined_rows = []

            def exact(rows):
                refined_rows[:] = rows.tolist()
                return phash_many([blobs[r] for r in rows], hash_size=args.hash_size, processes=args.processes,
                                  draft=False)

            valid = np.array([h if h is not None else 0 for h in ours], dtype=np.uint64)
            refined = {tuple(p) for p in refined_pairs(valid, args.threshold, exact).tolist()}
            t_ours = min(t_ours, time.perf_counter() - t0)

            t0 = time.perf_counter()
            blobs = [p.read_bytes() for p in paths]
            phash_many(blobs, hash_size=args.hash_size, processes=1)
            t_ours_1 = min(t_ours_1, time.perf_counter() - t0)

    cpus = os.cpu_count()
    workers = args.processes or cpus
    speedup = t_base / t_ours
    print(f"os.cpu_count(): {cpus}   workers for ours: {workers}   timings: best of {args.repeat}, "
          f"1-min load average now {os.getloadavg()[0]:.2f}")
    print(f"imagehash.phash(Image.open(path)), 1 process: {n / t_base:8.1f} images/s ({t_base:.2f}s)")
    print(f"phash_many(file bytes), 1 process:           {n / t_ours_1:8.1f} images/s ({t_ours_1:.2f}s)"
          f"   [{t_base / t_ours_1:.1f}x]")
    print(f"phash_many + refined pairs, {workers} processes:      {n / t_ours:8.1f} images/s ({t_ours:.2f}s; "
          f"{len(refined_rows)} images near the threshold hashed again in full)")
    print(f"speed-up (all cores vs imagehash): {speedup:.1f}x   target >= {args.target_speedup:g}x: "
          f"{'MET' if speedup >= args.target_speedup else 'NOT MET'}")

    failed = [p.name for p, h in zip(paths, ours) if h is None]
    if failed:
        print(f"ours could not hash {len(failed)} images: {failed[:5]}")
        return 1
    dists = np.array([hamming(a, b) for a, b in zip(ours, theirs)])
    mean_ok = dists.mean() <= args.target_mean_bits
    hist = np.bincount(dists)
    print(f"agreement: mean Hamming(ours, imagehash) = {dists.mean():.3f} bits, max {dists.max()}, "
          f"identical {int((dists == 0).sum())}/{n}; histogram by distance {hist.tolist()}")
    print(f"mean distance target <= {args.target_mean_bits:g} bits: {'MET' if mean_ok else 'NOT MET'}")

    draft_pairs = close_pairs(ours, args.threshold)
    their_pairs = close_pairs(theirs, args.threshold)
    print(f"pairs within {args.threshold} bits from draft hashes alone: {len(draft_pairs)}, "
          f"symmetric difference with imagehash {len(draft_pairs ^ their_pairs)}")
    ours_pairs = refined
    diff = ours_pairs ^ their_pairs
    same = not diff
    print(f"pairs within {args.threshold} bits (refined): ours {len(ours_pairs)}, imagehash {len(their_pairs)}, "
          f"symmetric difference {len(diff)}: {'SAME SET' if same else 'DIFFERENT'}")
    for i, j in sorted(diff)[:10]:
        print(f"  only in {'ours' if (i, j) in ours_pairs else 'imagehash'}: {paths[i].name} ~ {paths[j].name} "
              f"(ours {hamming(ours[i], ours[j])}, imagehash {hamming(theirs[i], theirs[j])})")

    known = {(min(a, b), max(a, b)) for g in groups for a, b in combinations(g, 2)}
    if known:
        print(f"known duplicate pairs found at <= {args.threshold}: ours {len(known & ours_pairs)}/{len(known)}, "
              f"imagehash {len(known & their_pairs)}/{len(known)}")
        for k, kind in enumerate(("resized", "low quality", "cropped"), start=1):
            pairs = {(g[0], g[k]) for g in groups}
            d_ours = [hamming(ours[a], ours[b]) for a, b in pairs]
            d_theirs = [hamming(theirs[a], theirs[b]) for a, b in pairs]
            print(f"  original ~ {kind:11s}: found ours {len(pairs & ours_pairs)}/{len(pairs)}, "
                  f"imagehash {len(pairs & their_pairs)}/{len(pairs)}; max distance ours {max(d_ours)}, "
                  f"imagehash {max(d_theirs)}")
    return 0 if mean_ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
