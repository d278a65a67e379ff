"""Publishing the same images: our publish (the publish stage, then ``hub.push``) against
``datasets.Dataset.push_to_hub``, each to a fresh local fake Hub (``densefusion_hf.testing.hub_server``).

Setup, not timed: ``--images`` distinct JPEGs (scikit-image's photographs: random crops, tone curves and
flips/rotations, resized to 500x400..1024x768, some portrait, light noise, JPEG quality 80-95, ~90 kB
each) served over HTTP on 127.0.0.1, and a recipe with the stages ingest, fetch, dedup, select and
publish, built with the real pipeline up to select (img2dataset keeps the served bytes: no resize).
The rows that select keeps (dedup may drop a few perceptual near-duplicates) are what both sides publish.

Timed, interleaved ``--repeat`` times, each side in a child process whose environment points
huggingface_hub and datasets at a fresh FakeHub of its own (so neither finds the other's blobs stored):

* ours: ``runners.local.build(recipe, workdir, only="publish", fresh=True)`` (Parquet shards of at most
  ``--shard-mb`` MB, build.json, charts, the card), then ``hub.push(folder, "bench/ours")`` (commits,
  tag); the two are timed separately and summed;
* baseline: the same rows from the same work directory (the select stage's rows with their image bytes
  joined from fetch's shards, as the publish stage reads them) made into an in-memory ``datasets.Dataset``
  with the ``Image`` feature, then ``ds.push_to_hub("bench/baseline", config_name=CONFIG,
  max_shard_size=<shard-mb> MB)``; the two are timed separately and summed (``--same-shard-count``:
  ``num_shards=`` our file count instead).

The fake hub answers on loopback with no added latency, so this compares the work each side does
(client and server share the machine's cores); on the real Hub every sequential request also costs a
network round trip, which favours the side that makes fewer of them in a row.

Both repos are read back with ``datasets.load_dataset(repo, CONFIG, split="train")`` (not timed): the row
counts, and a digest of every row's key and image bytes in order, must be the same on both sides and match
the select stage, or the run exits 1.  Prints images, MB of image bytes, seconds, images/s and MB/s of
each side in each run, the best of each, and the ratio against ``--target`` (reported only: timings on a
shared machine vary).  ``--profile DIR`` runs each side once under cProfile (slower; do not compare those
timings with plain runs), saves DIR/ours.prof and DIR/baseline.prof and prints their top functions.

    python benchmarks/publish_throughput.py [--images 1000] [--shard-mb 8] [--repeat 3]
    python benchmarks/publish_throughput.py --images 300 --profile /tmp/publish-prof
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CONFIG = "bench"
TARGET = 1.5


# ---------------------------------------------------------------------------------------------------
# Setup (not timed)
# ---------------------------------------------------------------------------------------------------


def _sources() -> list[np.ndarray]:
    """scikit-image's bundled photographs (no download needed), as RGB arrays."""
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
                 "immunohistochemistry", "retina", "coins", "moon"):
        try:
            out.append(np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB")))
        except Exception:  # a photo missing from this scikit-image install: use the others
            continue
    try:
        left, right, _ = data.stereo_motorcycle()
        out += [np.asarray(Image.fromarray(a).convert("RGB")) for a in (left, right)]
    except Exception:
        pass
    return out


def _picture(rng: np.random.Generator, source: np.ndarray) -> bytes:
    """A distinct JPEG: a random crop, tone curve and flip/rotation, resized to 500x400..1024x768 (some
    portrait), light noise, quality 80-95."""
    h, w = source.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    width = int(rng.integers(500, 1025))
    height = int(round(width * rng.uniform(0.72, 0.8)))
    if rng.random() < 0.2:
        width, height = height, width
    crop = source[y:y + ch, x:x + cw].astype(np.float32) / 255.0
    crop = crop ** rng.uniform(0.6, 1.6) * rng.uniform(0.8, 1.2, size=3)  # gamma, white balance
    image = Image.fromarray((np.clip(crop, 0, 1) * 255 + 0.5).astype(np.uint8))
    transpose = int(rng.integers(0, 8))  # one of the 8 flips/rotations
    if transpose:
        image = image.transpose(Image.Transpose(transpose - 1))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 3.0, size=(height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                  quality=int(rng.integers(80, 96)))
    return buf.getvalue()


def write_images(folder: Path, count: int, seed: int) -> list[tuple[str, int, int]]:
    """The JPEGs under ``folder/img``; returns (path on the server, width, height) of each."""
    rng = np.random.default_rng(seed)
    sources = _sources()
    (folder / "img").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        blob = _picture(rng, sources[i % len(sources)])
        rel = f"img/{i:05d}.jpg"
        (folder / rel).write_bytes(blob)
        width, height = Image.open(io.BytesIO(blob)).size
        out.append((rel, width, height))
    return out


def write_recipe(folder: Path, base_url: str, images: list[tuple[str, int, int]], args) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rows = [{"URL": f"{base_url}/{rel}", "TEXT": f"a photograph, number {i}", "WIDTH": float(w),
             "HEIGHT": float(h), "similarity": 0.3, "punsafe": 0.01, "pwatermark": 0.02}
            for i, (rel, w, h) in enumerate(images)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "meta.parquet")
    recipe = {
        "name": "publish-bench", "version": "1.0.0", "license": "other",
        "description": "Images for the publish throughput benchmark.",
        "stages": ["ingest", "fetch", "dedup", "select", "publish"],
        "source": {"metadata": ["meta.parquet"], "rows_per_shard": args.rows_per_shard},
        "fetch": {"timeout": 30, "retries": 1, "processes": 1, "threads": 8},  # no resize: the served bytes
        "dedup": {"algorithm": "phash", "threshold": args.dedup_threshold},
        "publish": {"config": CONFIG, "max_shard_mb": args.shard_mb, "min_shards": args.min_shards},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def hub_env(hub_url: str, scratch: Path) -> dict[str, str]:
    """The environment of a client child process talking to the fake hub at ``hub_url``."""
    from densefusion_hf.testing.hub_server import client_env

    return dict(client_env(hub_url, scratch, "hf_fake_benchmark_token"), PYTHONUNBUFFERED="1")


# ---------------------------------------------------------------------------------------------------
# The child processes (run with the hub environment)
# ---------------------------------------------------------------------------------------------------


def _profiled(spec: dict, func):
    if not spec.get("profile"):
        return func()
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(func)
    finally:
        profiler.dump_stats(spec["profile"])


def _hub_log() -> dict:
    """The fake hub's counters so far: what the timed part sent, before the read-back adds its requests."""
    import urllib.request

    with urllib.request.urlopen(f"{os.environ['HF_ENDPOINT']}/_fake/log") as reply:
        log = json.loads(reply.read())
    return {"lfs_uploads": log["lfs_uploads"], "lfs_bytes": log["lfs_bytes"], "commits": log["commits"],
            "requests": len(log["requests"]) - 1}  # not counting this one


class RowDigest:
    """Rows, image bytes and a digest of every row's key and image bytes, in order."""

    def __init__(self):
        self.rows, self.image_bytes, self._digest = 0, 0, hashlib.sha256()

    def add(self, keys, blobs) -> None:
        for key, blob in zip(keys, blobs):
            self._digest.update(key.encode() + b"\0" + hashlib.sha256(blob).digest())
            self.rows += 1
            self.image_bytes += len(blob)

    def result(self) -> dict:
        return {"rows": self.rows, "image_bytes": self.image_bytes, "digest": self._digest.hexdigest()}


def _read_back(repo_id: str) -> tuple[dict, int]:
    """The RowDigest of the repo's rows, loaded from the hub with datasets, and its Parquet file count."""
    import datasets
    from huggingface_hub import HfApi

    ds = datasets.load_dataset(repo_id, CONFIG, split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    digest = RowDigest()
    for batch in ds.iter(batch_size=100):
        digest.add(batch["key"], [image["bytes"] for image in batch["image"]])
    files = [f for f in HfApi().list_repo_files(repo_id, repo_type="dataset") if f.endswith(".parquet")]
    return digest.result(), len(files)


def child_ours(spec: dict) -> dict:
    from densefusion_hf.publish import hub
    from densefusion_hf.runners.local import build
    from densefusion_hf.recipe import load_recipe
    from densefusion_hf.stages.publish import dataset_folder

    recipe = load_recipe(spec["recipe"])
    workdir = Path(spec["workdir"])
    folder = dataset_folder(recipe, workdir)
    times = {}

    def run():
        started = time.perf_counter()
        build(recipe, workdir, only="publish", fresh=True, show_progress=False)
        times["write"] = time.perf_counter() - started
        started = time.perf_counter()
        done = hub.push(folder, "bench/ours", show_progress=False)
        times["push"] = time.perf_counter() - started
        return done

    _profiled(spec, run)
    log = _hub_log()
    back, shards = _read_back("bench/ours")
    return {**times, **log, "seconds": times["write"] + times["push"], "shards": shards, "read_back": back}


def baseline_dataset(recipe, workdir: Path):
    """The rows select kept, with their image bytes joined from fetch's shards (as publish reads them), as an
    in-memory ``datasets.Dataset`` whose ``image`` column is the ``Image`` feature: what a user of
    ``push_to_hub`` builds from the same work directory."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    from densefusion_hf.stages.base import BuildContext, with_images

    ctx = BuildContext(recipe=recipe, workdir=workdir, show_progress=False)
    source = ctx.stage_dir("select")
    table = pa.concat_tables([with_images(ctx, source.read(s), s) for s in source.done_shards()])
    image = pa.StructArray.from_arrays([table.column("image").combine_chunks(),
                                        pa.nulls(table.num_rows, pa.string())], names=["bytes", "path"])
    table = table.set_column(table.column_names.index("image"), "image", image)
    features = datasets.Features.from_arrow_schema(table.drop_columns(["image"]).schema)
    features["image"] = datasets.Image()
    return datasets.Dataset(InMemoryTable(table.cast(features.arrow_schema)),
                            info=datasets.DatasetInfo(features=features))


def child_baseline(spec: dict) -> dict:
    import importlib

    from densefusion_hf.recipe import load_recipe

    for module in ("datasets", "densefusion_hf.stages.base"):  # imported before timing, as ours does
        importlib.import_module(module)

    recipe = load_recipe(spec["recipe"])
    shard = {"num_shards": spec["num_shards"]} if spec.get("num_shards") else \
        {"max_shard_size": round(spec["shard_mb"] * 1_000_000)}  # "<shard-mb>MB", as bytes (1 MB = 10^6)
    times = {}

    def run():
        started = time.perf_counter()
        ds = baseline_dataset(recipe, Path(spec["workdir"]))
        times["write"] = time.perf_counter() - started
        started = time.perf_counter()
        ds.push_to_hub("bench/baseline", config_name=CONFIG, **shard)
        times["push"] = time.perf_counter() - started

    _profiled(spec, run)
    log = _hub_log()
    back, shards = _read_back("bench/baseline")
    return {**times, **log, "seconds": times["write"] + times["push"], "shards": shards, "read_back": back}


def run_child(side: str, spec: dict, env: dict) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", side, json.dumps(spec)],
                            env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed (exit {result.returncode})\n--- stdout ---\n{result.stdout[-5000:]}\n"
                         f"--- stderr ---\n{result.stderr[-10000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _print_profile(path: str, top: int) -> None:
    import pstats

    stats = pstats.Stats(path)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="distinct JPEGs (default 1000)")
    parser.add_argument("--shard-mb", type=float, default=8,
                        help="largest Parquet file in MB, both sides (default 8: several shards)")
    parser.add_argument("--min-shards", type=int, default=1, help="publish.min_shards (default 1)")
    parser.add_argument("--same-shard-count", action="store_true",
                        help="give push_to_hub num_shards = our file count instead of max_shard_size")
    parser.add_argument("--rows-per-shard", type=int, default=100, help="work shards of the build (default 100)")
    parser.add_argument("--dedup-threshold", type=int, default=8, help="dedup.threshold (default 8)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of each side, interleaved; the best is compared (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=TARGET, help=f"ours / baseline images/s (default {TARGET})")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run each child once under cProfile, dump ours.prof / baseline.prof here and print them")
    parser.add_argument("--profile-top", type=int, default=35)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        side, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps({"ours": child_ours, "baseline": child_baseline}[side](spec)))
        return 0

    from densefusion_hf.runners.local import build
    from densefusion_hf.recipe import load_recipe
    from densefusion_hf.testing.hub_server import FakeHub
    from densefusion_hf.sample.server import SampleServer
    from densefusion_hf.stages.base import BuildContext, with_images

    with tempfile.TemporaryDirectory(prefix="publish_bench_") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        images = write_images(tmp / "served", args.images, args.seed)
        served_mb = sum((tmp / "served" / rel).stat().st_size for rel, _, _ in images) / 1e6
        workdir = tmp / "work"
        with SampleServer(tmp / "served") as server:
            recipe_path = write_recipe(tmp, server.address, images, args)
            build(load_recipe(recipe_path), workdir, only="ingest,fetch,dedup,select", show_progress=False)
        # What publish reads: the select stage's rows, in shard order, joined with their images.
        ctx = BuildContext(recipe=load_recipe(recipe_path), workdir=workdir, show_progress=False)
        source, selected = ctx.stage_dir("select"), RowDigest()
        for shard in source.done_shards():
            table = with_images(ctx, source.read(shard), shard)
            selected.add(table.column("key").to_pylist(), table.column("image").to_pylist())
        expected = selected.result()
        rows, image_bytes = expected["rows"], expected["image_bytes"]
        mb = image_bytes / 1e6
        print(f"setup (not timed): {len(images)} JPEGs served ({served_mb:.1f} MB); ingest..select built in "
              f"{time.perf_counter() - started:.1f}s: {rows} rows, {mb:.1f} MB of image bytes "
              f"({image_bytes / max(rows, 1) / 1e3:.0f} kB each)")
        if rows == 0:
            print("no rows survived the build: nothing to publish")
            return 1

        runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
        repeat = 1 if args.profile else args.repeat
        for run in range(repeat):
            for side in ("ours", "baseline"):
                scratch = tmp / f"{side}-{run}"
                scratch.mkdir()
                spec = {"recipe": str(recipe_path), "workdir": str(workdir), "folder": str(workdir / "dataset"),
                        "shard_mb": args.shard_mb}
                if side == "baseline" and args.same_shard_count:
                    spec["num_shards"] = runs["ours"][-1]["shards"]
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spec["profile"] = str((args.profile / f"{side}.prof").resolve())
                with FakeHub(scratch / "hub") as fake:  # a fresh hub: no blob is already stored
                    runs[side].append(run_child(side, spec, hub_env(fake.url, scratch)))

        ours, base = runs["ours"], runs["baseline"]
        for a, b in zip(ours, base):
            if not a["read_back"] == b["read_back"] == expected:
                print(f"MISMATCH: read back from ours {a['read_back']}, from the baseline {b['read_back']}; "
                      f"the select stage has {expected}")
                return 1
        print(f"read back with datasets.load_dataset, every run: both repos hold the select stage's {rows} rows, "
              f"the same keys and image bytes in the same order ({mb:.1f} MB)")

        def line(name, r):
            return (f"{name:9s} {r['seconds']:6.2f}s  {rows / r['seconds']:7.1f} images/s  "
                    f"{mb / r['seconds']:6.1f} MB/s  (uploaded {r['lfs_uploads']} LFS files, "
                    f"{r['lfs_bytes'] / 1e6:.1f} MB, {r['commits']} commits, {r['requests']} requests)")

        print(f"\n{rows} images, {mb:.1f} MB of image bytes, shards <= {args.shard_mb:g} MB: ours "
              f"{ours[0]['shards']} Parquet files, the baseline {base[0]['shards']}"
              f"{'  [under cProfile]' if args.profile else ''}")
        for i, (a, b) in enumerate(zip(ours, base), 1):
            print(f"run {i}: ours = publish stage {a['write']:.2f}s + push {a['push']:.2f}s; baseline = "
                  f"Dataset from the work directory {b['write']:.2f}s + push_to_hub {b['push']:.2f}s")
            print("  " + line("ours", a))
            print("  " + line("baseline", b))
        best_ours = min(r["seconds"] for r in ours)
        best_base = min(r["seconds"] for r in base)
        best = min(ours, key=lambda r: r["seconds"])
        best_b = min(base, key=lambda r: r["seconds"])
        ratio = best_base / best_ours
        print(f"\nbest of {repeat}: ours {rows / best_ours:.1f} images/s ({best_ours:.2f}s = write "
              f"{best['write']:.2f}s + push {best['push']:.2f}s, {mb / best_ours:.1f} MB/s), "
              f"datasets.Dataset.push_to_hub {rows / best_base:.1f} images/s ({best_base:.2f}s = Dataset "
              f"{best_b['write']:.2f}s + push_to_hub {best_b['push']:.2f}s, {mb / best_base:.1f} MB/s)")
        print(f"ours / baseline: {ratio:.2f}x   target >= {args.target:g}x: "
              f"{'MET' if ratio >= args.target else 'NOT MET'}   (os.cpu_count() {os.cpu_count()}, "
              f"1-min load average {os.getloadavg()[0]:.2f})")
        if args.profile:
            for side in ("ours", "baseline"):
                print(f"\n===== cProfile of {side} =====")
                _print_profile(str(args.profile / f"{side}.prof"), args.profile_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
