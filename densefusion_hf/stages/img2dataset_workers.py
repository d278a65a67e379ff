"""img2dataset's worker processes kept from one shard to the next.

``img2dataset.download`` starts a fresh pool of spawned processes and a logger process on every call, and each
imports img2dataset (torch and albumentations with it: 9-18 s on two busy cores) before anything downloads.
Fetch calls it once per shard, so it paid that start on every shard: the main part of what fetch cost over
one img2dataset run on the same URLs (``benchmarks/pipeline_scale.py``).  While ``shared_workers`` is active,
img2dataset's multiprocessing distributor uses one pool per process and worker count, kept for the next shard
(workers are still replaced after ``MAX_TASKS`` parts, as img2dataset does, to bound leaks), and its logger
process, which only prints totals (fetch reads the per-part stats files itself), is not started.  With
``fetch.processes: 1`` the parts are downloaded in the calling process itself, with no worker to start.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import multiprocessing
import os
import signal
import sys

from img2dataset.distributor import retrier

# The module, not the ``main`` function that img2dataset's package namespace exports under the same name.
img2dataset_main = importlib.import_module("img2dataset.main")

MAX_TASKS = 5  # parts a worker downloads before it is replaced (img2dataset's maxtasksperchild)
_pools: dict[int, multiprocessing.pool.Pool] = {}


def close_pools() -> None:
    """Stop the kept workers (at exit, or after a download was interrupted)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.terminate()
        pool.join()


atexit.register(close_pools)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """In each worker: be killed when the process that started it dies, even by SIGKILL (Linux). Otherwise
    a worker of a killed build or Ray actor finishes the part it holds, writing into the scratch folder that
    the rerun downloads into (an idle one exits when its task queue closes)."""
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes, prctl.restype = [ctypes.c_int, ctypes.c_ulong], ctypes.c_int
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))  # best effort: a worker that cannot ask still works
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before the request was made
            os._exit(1)


def new_pool(processes: int) -> multiprocessing.pool.Pool:
    """The pool img2dataset's distributor would start (spawned, replaced after ``MAX_TASKS``), whose workers
    die with this process."""
    return multiprocessing.get_context("spawn").Pool(processes, initializer=_die_with_parent,
                                                     initargs=(os.getpid(),), maxtasksperchild=MAX_TASKS)


def _distributor(processes_count, downloader, reader, _subjob_size, max_shard_retry):
    """img2dataset's ``multiprocessing_distributor`` on a kept pool; with one process, in this one."""
    if processes_count == 1:
        # One worker would only run the parts in turn, as this process can: it adds its start (an import of
        # img2dataset and torch, 9-18 s on two busy cores) and no parallelism, which is img2dataset's thread pool
        # inside each part. A Ray actor is already a process of its own.
        def run(parts):
            return [row for ok, row in map(downloader, parts) if ok is False]

        retrier(run, run(reader), max_shard_retry)
        return
    pool = _pools.get(processes_count)
    if pool is None:
        pool = _pools[processes_count] = new_pool(processes_count)

    def run(parts):
        return [row for ok, row in pool.imap_unordered(downloader, parts) if ok is False]

    try:
        retrier(run, run(reader), max_shard_retry)
    except BaseException:
        close_pools()  # a pool stopped mid-part (Ctrl-C, a worker killed) is not used again
        raise


class _NoLogger:
    """Stands in for img2dataset's LoggerProcess: nothing to start, join or stop."""

    def __init__(self, *args, **kwargs):
        self.done_shards = set()

    def start(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass

    def terminate(self) -> None:
        pass


@contextlib.contextmanager
def shared_workers():
    saved = img2dataset_main.multiprocessing_distributor, img2dataset_main.LoggerProcess
    img2dataset_main.multiprocessing_distributor, img2dataset_main.LoggerProcess = _distributor, _NoLogger
    try:
        yield
    finally:
        img2dataset_main.multiprocessing_distributor, img2dataset_main.LoggerProcess = saved
