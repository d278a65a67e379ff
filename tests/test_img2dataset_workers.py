"""img2dataset's workers serve several shards in turn, each part's output going to its own shard's log, and
a session's end stops them, as does the death of the process that started them; with one process, the parts
are downloaded in the caller, with no worker at all."""

import contextlib
import json
import multiprocessing
import select
import signal
import subprocess
import sys

import psutil

import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.netguard.addresses import AddressPolicy
from densefusion_hf.netguard.opener import DownloadGuard
from densefusion_hf.stages import img2dataset_workers
from densefusion_hf.stages.fetch import _close_img2dataset_workers, run_img2dataset

OPTIONS = dict(timeout=10, retries=0, processes_count=2, thread_count=4, resize_mode="no",
               disable_all_reencoding=True)


def _part_stats(folder):
    """img2dataset's stats summed over the parts of one shard."""
    totals: dict = {"status_dict": {}}
    for path in sorted(folder.glob("*_stats.json")):
        stats = json.loads(path.read_text())
        for name in ("count", "successes"):
            totals[name] = totals.get(name, 0) + stats[name]
        totals["status_dict"].update(stats["status_dict"])
    return totals


def _shard(tmp_path, name, urls):
    folder = tmp_path / name
    folder.mkdir()
    pq.write_table(pa.table({"url": urls, "text": [""] * len(urls), "row_key": [f"{name}-{i}" for i in range(len(urls))]}),
                   folder / "urls.parquet")
    return folder


def test_workers_are_kept_across_shards_with_each_shards_output_in_its_log(tmp_path, image_server, photo_files):
    guard = DownloadGuard(AddressPolicy.from_environment(False))
    good = [f"{image_server}/{p}" for p in photo_files if p.startswith("img/")]
    runs = {}
    for name, urls in (("a", good[:3]), ("b", good[3:] + [f"{image_server}/nothing-here.jpg"])):
        folder = _shard(tmp_path, name, urls)
        log = folder / "img2dataset.log"
        parts = run_img2dataset(str(folder / "urls.parquet"), str(folder / "out"), len(urls), OPTIONS, guard, str(log))
        stats = _part_stats(folder / "out")
        pool = img2dataset_workers._pools[2]
        runs[name] = (parts, stats, {p.pid for p in pool._pool}, log.exists())
    (parts_a, stats_a, pids_a, log_a), (parts_b, stats_b, pids_b, log_b) = runs["a"], runs["b"]
    assert parts_a == parts_b == 2
    assert stats_a["successes"] == 3 and stats_b["successes"] == len(good) - 3 and stats_b["count"] == len(good) - 2
    assert pids_a == pids_b and len(pids_a) == 2  # the second shard was downloaded by the first shard's workers
    assert "404" in json.dumps(stats_b["status_dict"])
    # Only the worker writes these logs here (the caller does not open them): each part's own shard log.
    assert log_a and log_b
    _close_img2dataset_workers()
    assert not img2dataset_workers._pools
    assert all(not p.is_alive() for p in multiprocessing.active_children() if p.pid in pids_a)


def test_one_process_downloads_in_the_caller_with_no_worker_started(tmp_path, image_server, photo_files):
    # A worker would only add its start (importing img2dataset and torch) to the parts it runs in turn.
    guard = DownloadGuard(AddressPolicy.from_environment(False))
    urls = [f"{image_server}/{p}" for p in photo_files if p.startswith("img/")] + [f"{image_server}/nothing-here.jpg"]
    folder = _shard(tmp_path, "one", urls)
    children_before = set(psutil.Process().children(recursive=True))
    parts = run_img2dataset(str(folder / "urls.parquet"), str(folder / "out"), len(urls),
                            dict(OPTIONS, processes_count=1), guard)
    assert parts == 1
    assert not img2dataset_workers._pools
    assert not set(psutil.Process().children(recursive=True)) - children_before
    stats = _part_stats(folder / "out")
    assert stats["count"] == len(urls) and stats["successes"] == len(urls) - 1
    assert "404" in json.dumps(stats["status_dict"])
    table = pq.read_table(folder / "out" / "00000.parquet", columns=["row_key", "status"])
    assert sorted(table["row_key"].to_pylist()) == sorted(f"one-{i}" for i in range(len(urls)))


def test_a_killed_process_stops_its_busy_img2dataset_workers_at_once(tmp_path):
    # A parent killed by SIGKILL runs no exit handler: its spawned workers would go on with the part they hold
    # (here a 10-minute one), writing into the scratch folder that the rerun downloads into.
    code = ("import os, sys, time; from densefusion_hf.stages.img2dataset_workers import new_pool; "
            "pool = new_pool(2); pool.map(abs, range(2), chunksize=1); "
            "pool.map_async(time.sleep, [600, 600], chunksize=1); time.sleep(2); "
            "print(*(p.pid for p in pool._pool), flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 120)
        assert ready, "the pool's workers did not start within 2 minutes"
        workers = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(w.is_running() and w.ppid() == parent.pid for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [w.pid for w in alive]
    finally:
        parent.kill()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
