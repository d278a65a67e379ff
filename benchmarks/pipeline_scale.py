"""The whole pipeline as it grows: fetch through publish on N synthetic photos served from 127.0.0.1.

For each N (default 10k, 30k, 100k) it writes N distinct synthetic photos (2% planted exact copies under
other URLs, 2% re-encoded near copies), LAION-style metadata naming them, and a recipe (tiny CLIP, SemDeDup,
selection, template captions without OCR, publish), then builds it stage by stage (`df-hf build --only
STAGE`, one process per stage) with the local runner and with the Ray runner (a local Ray), and runs bare
img2dataset on the same URL list right before each runner's fetch (so both meet the same load). It prints, per stage: seconds, images/s, peak memory (the resident set of
the build's whole process tree, Ray's workers included); fetch's time over bare img2dataset's (goal <= 1.10);
and the growth from the smallest to the largest N per stage (goal: linear, within 1.3x of the size ratio).

    python benchmarks/pipeline_scale.py                       # 10k, 30k, 100k: hours on 2 cores
    python benchmarks/pipeline_scale.py --sizes 1000,3000 --runners local,ray
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "fetch", "dedup", "embed", "semdedup", "select", "caption", "publish"]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on loopback only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def photo(seed: int, size: int = 160) -> np.ndarray:
    """A distinct, photo-like image: smooth colour fields at a few scales (distinct pHashes)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((3, 1.0), (6, 0.5), (12, 0.25)):
        grid = rng.random((cells, cells, 3)).astype(np.float32)
        out += weight * np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size),
                                                                                        Image.BICUBIC), np.float32)
    return np.clip(out / 1.75, 0, 255).astype(np.uint8)


def jpeg(array: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_dataset(root: Path, n: int) -> list[str]:
    """N files under root/img (the last 4% copies of earlier ones); the relative paths, in URL order."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    planted = n // 25
    paths = []
    for i in range(n - planted):
        (root / "img" / f"{i}.jpg").write_bytes(jpeg(photo(i), 90))
        paths.append(f"img/{i}.jpg")
    for j in range(planted):
        source = (j * 7919) % (n - planted)
        data = (root / "img" / f"{source}.jpg").read_bytes() if j % 2 == 0 else jpeg(photo(source), 75)
        (root / "img" / f"copy-{j}.jpg").write_bytes(data)
        paths.append(f"img/copy-{j}.jpg")
    return paths


def write_inputs(folder: Path, base_url: str, paths: list[str]) -> Path:
    urls = [f"{base_url}/{p}" for p in paths]
    metadata = pa.table({"URL": urls, "TEXT": [f"a synthetic photo number {i}" for i in range(len(urls))],
                         "WIDTH": [160.0] * len(urls), "HEIGHT": [160.0] * len(urls),
                         "similarity": [0.3] * len(urls), "punsafe": [0.01] * len(urls),
                         "pwatermark": [0.02] * len(urls)})
    pq.write_table(metadata, folder / "metadata.parquet")
    recipe = {
        "name": "scale", "source": {"metadata": [str(folder / "metadata.parquet")], "rows_per_shard": 2000},
        "fetch": {"timeout": 10, "retries": 0, "processes": 1, "threads": 16,
                  "allow_networks": [base_url.split("//", 1)[1]]},  # exactly the loopback server
        "dedup": {"processes": 1},
        "embed": {"model": "sample:tiny-clip", "batch_size": 64},
        # The tiny random CLIP puts distinct photos about 1e-3 apart in cosine distance, so a larger eps chains
        # most of them into one group: 1e-4 keeps them, and the stages after see rows in proportion to N.
        "semdedup": {"clusters": max(4, len(urls) // 200), "eps": 1e-4},
        "select": {"top_per_cluster": 150},
        "caption": {"engine": "template", "experts": {"ocr": {"engine": None}}, "rows_per_chunk": 500},
        "publish": {"min_shards": 2},
        "runner": {"embed": {"workers": 1}, "caption": {"workers": 1}},
    }
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += parents.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measured(command: list[str], cwd: Path) -> tuple[float, int]:
    """(seconds, peak resident bytes of the process tree) of one command."""
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def watch():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, stderr = child.communicate()
    stop.set()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return time.monotonic() - started, peak


def bare_img2dataset(folder: Path, distributor: str = "multiprocessing") -> float:
    """img2dataset alone on the same URLs: its multiprocessing distributor, or its Ray one (one Ray task per
    img2dataset shard, on a local Ray with every core)."""
    urls = folder / "urls.parquet"
    table = pq.read_table(folder / "metadata.parquet", columns=["URL", "TEXT"])
    pq.write_table(table.rename_columns(["url", "text"]), urls)
    start = "import ray; ray.init(address='local', include_dashboard=False); " if distributor == "ray" else ""
    processes = os.cpu_count() if distributor == "ray" else 1
    code = (start + "import img2dataset; img2dataset.download(url_list=%r, input_format='parquet', url_col='url', "
            "caption_col='text', output_folder=%r, output_format='parquet', number_sample_per_shard=2000, "
            "processes_count=%d, thread_count=16, timeout=10, retries=0, resize_mode='no', distributor=%r, "
            "disable_all_reencoding=True, compute_hash=None, enable_wandb=False, incremental_mode='incremental')"
            % (str(urls), str(folder / "bare"), processes, distributor))
    seconds, _ = measured([sys.executable, "-c", code], folder)
    shutil.rmtree(folder / "bare", ignore_errors=True)
    return seconds


def rows_out(workdir: Path, stage: str) -> int:
    """Rows the stage kept, from its shards' stats (a fetch that lost downloads would look fast)."""
    if stage == "publish":
        return sum(pq.ParquetFile(p).metadata.num_rows for p in (workdir / "dataset").rglob("*.parquet"))
    return sum(json.loads(p.read_text()).get("rows_out", 0) for p in (workdir / stage).glob("shard-*.stats.json"))


def run(n: int, runners: list[str], keep: Path | None) -> dict:
    from densefusion_hf.sample.server import SampleServer

    folder = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=keep))
    paths = write_dataset(folder / "files", n)
    results: dict = {"n": n}
    with SampleServer(folder / "files") as server:
        recipe = write_inputs(folder, server.address, paths)
        for runner in runners:
            workdir = folder / f"work-{runner}"
            stages = {}
            for stage in STAGES:
                if stage == "fetch":
                    # Bare img2dataset right before each fetch, so that both meet the same load on the machine:
                    # its multiprocessing distributor, and for the Ray runner its Ray distributor too.
                    results[f"img2dataset_before_{runner}_s"] = bare_img2dataset(folder)
                    if runner == "ray":
                        results["img2dataset_ray_s"] = bare_img2dataset(folder, "ray")
                command = [sys.executable, "-m", "densefusion_hf", "build", str(recipe), "--workdir", str(workdir),
                           "--only", stage, "--no-progress", "--runner", runner]
                load = os.getloadavg()[0]  # other work on the machine slows a stage: printed beside it
                seconds, peak = measured(command, REPO)
                stages[stage] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
                                 "peak_mb": round(peak / 1e6), "load_before": round(load, 1),
                                 "rows_out": rows_out(workdir, stage)}
            results[runner] = stages
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,30000,100000", help="image counts, comma-separated")
    parser.add_argument("--runners", default="local,ray", help="local, ray or both")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folders under this folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    print(f"machine: {os.cpu_count()} cores; sizes {sizes}; runners {runners}")
    all_results = []
    for n in sizes:
        result = run(n, runners, args.keep)
        all_results.append(result)
        print(f"\nN = {n:,}  bare img2dataset: " + ", ".join(
            f"{result[f'img2dataset_before_{r}_s']:.1f} s before the {r} fetch" for r in runners)
              + (f"; with its Ray distributor: {result['img2dataset_ray_s']:.1f} s" if "img2dataset_ray_s" in result
                 else ""))
        print(f"{'stage':<10}" + "".join(f"{r + ' s':>12}{'img/s':>9}{'peak MB':>9}{'rows':>8}{'load':>6}"
                                         for r in runners))
        for stage in STAGES:
            print(f"{stage:<10}" + "".join(f"{result[r][stage]['seconds']:>12.1f}{result[r][stage]['images_per_s']:>9.0f}"
                                           f"{result[r][stage]['peak_mb']:>9}{result[r][stage]['rows_out']:>8}"
                                           f"{result[r][stage]['load_before']:>6.1f}" for r in runners))
        print("(rows: kept by the stage; load: the machine's 1-minute load average as the stage started)")
        for r in runners:
            ratio = result[r]["fetch"]["seconds"] / result[f"img2dataset_before_{r}_s"]
            print(f"fetch / bare img2dataset ({r}): {ratio:.2f} (goal <= 1.10; each fetch includes the "
                  f"process start and the full decode check)")
            if r == "ray":  # both start a local Ray first
                print(f"fetch (ray) / img2dataset's Ray distributor: "
                      f"{result[r]['fetch']['seconds'] / result['img2dataset_ray_s']:.2f}")
    if len(all_results) > 1:
        first, last = all_results[0], all_results[-1]
        factor = last["n"] / first["n"]
        print(f"\ngrowth from N = {first['n']:,} to {last['n']:,} ({factor:.0f}x the images; goal within "
              f"{1.3 * factor:.1f}x)")
        for r in runners:
            print(f"  {r}: " + ", ".join(f"{s} {last[r][s]['seconds'] / max(first[r][s]['seconds'], 1e-9):.1f}x"
                                         for s in STAGES))
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2))


if __name__ == "__main__":
    main()
