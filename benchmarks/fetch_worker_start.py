"""fetch with ``fetch.processes: 1``: parts downloaded in the calling process against one kept worker process.

Writes N synthetic photos, serves them from 127.0.0.1 in a process of their own (as a remote host would be),
and in a fresh process per run downloads them as shards of 2,000 URLs through ``stages.fetch.run_img2dataset``:
once as fetch does (``stages.img2dataset_workers``: one process, no worker started), once with the baseline
of one spawned worker kept from shard to shard (what fetch did before). Both runs import everything first, so
the figures are the download itself plus, for the baseline, the worker's start (it imports img2dataset and
torch). It prints seconds per shard and in all, per mode, twice each, alternating.

    python benchmarks/fetch_worker_start.py [--images 6000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARD = 2000
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def serve(root: str) -> None:
    from densefusion_hf.sample.server import SampleServer

    with SampleServer(Path(root)) as server:
        print(server.address, flush=True)
        sys.stdin.read()  # until the parent closes the pipe


def download(mode: str, root: str, address: str) -> None:
    import importlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset.distributor import retrier

    from densefusion_hf.netguard.addresses import AddressPolicy
    from densefusion_hf.netguard.opener import DownloadGuard
    from densefusion_hf.stages import img2dataset_workers
    from densefusion_hf.stages.fetch import _close_img2dataset_workers, run_img2dataset

    importlib.import_module("img2dataset")  # imported before timing, in both modes
    if mode == "kept-worker":
        pools = {}

        def one_kept_worker(processes_count, downloader, reader, _subjob_size, max_shard_retry):
            if processes_count not in pools:  # started once, kept for the next shards
                pools[processes_count] = img2dataset_workers.new_pool(processes_count)
            pool = pools[processes_count]

            def run(parts):
                return [row for ok, row in pool.imap_unordered(downloader, parts) if ok is False]
            retrier(run, run(reader), max_shard_retry)

        img2dataset_workers._distributor = one_kept_worker  # what shared_workers installs
    paths = sorted(p.relative_to(root).as_posix() for p in (Path(root) / "img").iterdir())
    guard = DownloadGuard(AddressPolicy.from_environment(False, [address.split("//", 1)[1]]))
    options = dict(timeout=10, retries=0, processes_count=1, thread_count=16, resize_mode="no",
                   disable_all_reencoding=True)
    shards, started = [], time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(0, len(paths), SHARD):
            folder = Path(scratch) / f"shard-{i}"
            folder.mkdir()
            urls = [f"{address}/{p}" for p in paths[i:i + SHARD]]
            keys = [str(k) for k in range(len(urls))]
            pq.write_table(pa.table({"url": urls, "text": [""] * len(urls), "row_key": keys}), folder / "urls.parquet")
            begun = time.monotonic()
            run_img2dataset(str(folder / "urls.parquet"), str(folder / "out"), len(urls), options, guard,
                            str(folder / "log"))
            stats = [json.loads(p.read_text()) for p in (folder / "out").glob("*_stats.json")]
            if sum(s["successes"] for s in stats) != len(urls):
                raise SystemExit(f"{mode}: shard {i // SHARD} lost downloads: {stats}")
            shards.append(round(time.monotonic() - begun, 2))
        if mode == "kept-worker":
            for pool in pools.values():
                pool.terminate()
        _close_img2dataset_workers()
    print(json.dumps({"shards": shards, "total": round(time.monotonic() - started, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "ADDRESS"), help=argparse.SUPPRESS)
    parser.add_argument("--serve", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.child:
        return download(*args.child)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pipeline_scale import write_dataset

    print(f"machine: {os.cpu_count()} cores; {args.images:,} photos in shards of {SHARD:,}, 16 threads")
    with tempfile.TemporaryDirectory() as root:
        write_dataset(Path(root), args.images)
        server = subprocess.Popen([sys.executable, __file__, "--serve", root], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            address = server.stdout.readline().strip()
            results: dict[str, list] = {"in-process": [], "kept-worker": []}
            for _ in range(args.rounds):
                for mode in results:
                    out = subprocess.run([sys.executable, __file__, "--child", mode, root, address], cwd=REPO,
                                         capture_output=True, text=True, check=True).stdout
                    results[mode].append(json.loads(out.strip().splitlines()[-1]))
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    for mode, runs in results.items():
        print(f"{mode:<12} " + "; ".join(f"{r['total']:.1f} s (shards {', '.join(map(str, r['shards']))})"
                                         for r in runs))
    best = {mode: min(r["total"] for r in runs) for mode, runs in results.items()}
    print(f"in this process / one kept worker (best of {args.rounds}): {best['in-process'] / best['kept-worker']:.2f}")


if __name__ == "__main__":
    main()
