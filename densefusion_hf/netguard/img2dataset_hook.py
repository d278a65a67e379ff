"""Runs img2dataset's downloads through the guarded opener.

img2dataset 1.47 downloads with ``urllib.request.urlopen`` in processes it spawns (a fresh interpreter
each), so a patch made in the parent would not reach them.  Its ``Downloader`` object is what gets
pickled to every worker; ``GuardedDownloader`` carries the guard along and installs the opener in the
worker before each shard.
"""

from __future__ import annotations

import contextlib
import importlib
import urllib.request

from img2dataset.downloader import Downloader

# The module, not the ``main`` function that img2dataset's package namespace exports under the same name.
img2dataset_main = importlib.import_module("img2dataset.main")

from densefusion_hf.console import output_to_file
from densefusion_hf.netguard.opener import DownloadGuard, guarded_opener


class GuardedDownloader(Downloader):
    def __init__(self, guard: DownloadGuard, log_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.guard = guard
        self.log_path = log_path  # where this part's output goes, whichever worker downloads it

    def download_shard(self, row):
        # urllib's opener is process-wide: put back the one before, in case this runs in the caller's process.
        previous = urllib.request._opener
        urllib.request.install_opener(guarded_opener(self.guard))
        try:
            with output_to_file(self.log_path) if self.log_path else contextlib.nullcontext():
                return super().download_shard(row)
        finally:
            urllib.request.install_opener(previous)


@contextlib.contextmanager
def guarded_downloads(guard: DownloadGuard, log_path: str | None = None):
    """While active, ``img2dataset.download`` builds a ``GuardedDownloader`` (its parts' output to ``log_path``:
    workers kept from an earlier shard would otherwise write to that shard's log)."""
    original = img2dataset_main.Downloader
    img2dataset_main.Downloader = lambda **kwargs: GuardedDownloader(guard, log_path, **kwargs)
    try:
        yield
    finally:
        img2dataset_main.Downloader = original
