"""img2dataset's output for one of our shards, read a batch of our rows at a time.

img2dataset writes each of its parts as Parquet in row groups of 100 samples, in the order the downloads
finished.  Reading a part whole would hold every image of the shard in memory (Parquet pages are
decompressed on read, so a memory map does not help), so only the small columns are read up front, to
find each row's part and row group; the image bytes are read one row group at a time, when a batch of
our rows asks for them, with a few row groups cached because neighbouring rows finish close together.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.errors import UserError

# Columns of img2dataset's rows that fetch reads; the image column is named after the encode format.
RESULT_COLUMNS = ("row_key", "status", "error_message", "original_width", "original_height")
IMAGE_FORMATS = ("jpg", "png", "webp")
_CACHED_GROUPS = 4
_LOW_SPACE = 64 * 2**20


class IncompleteDownload(UserError):
    """img2dataset finished without writing every part of the shard."""


def check_complete(folder: Path, parts: int, log_path: Path) -> None:
    """Every part img2dataset was given has its stats file and its Parquet; else say why, a full disk included.

    img2dataset catches a part's failure, prints it to its log and goes on, so without this check the part's
    rows would read as missing from the download and be dropped, while they are only not downloaded yet.
    """
    finished = {int(name) for name in (p.name[: -len("_stats.json")] for p in folder.glob("*_stats.json"))
                if name.isdigit() and (folder / f"{name}.parquet").exists()}
    missing = [part for part in range(parts) if part not in finished]
    if not missing:
        return
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    # The log is on the same disk, so the traceback saying so may be lost with it: a part missing while the
    # disk is nearly full is taken for a full disk too.
    if "No space left on device" in log or "Errno 28" in log or shutil.disk_usage(folder).free < _LOW_SPACE:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    raise IncompleteDownload(f"img2dataset did not finish {len(missing)} of its {parts} parts of this shard "
                             f"(parts {missing[:5]}); see {log_path}. The shard is not marked done, so running "
                             f"the same command again retries it.")


def download_stats(folder: Path) -> dict:
    """img2dataset's counts summed over the parts of one shard."""
    totals: dict = {}
    for stats_file in sorted(folder.glob("*_stats.json")):
        part = json.loads(stats_file.read_text())
        for field in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[field] = totals.get(field, 0) + part.get(field, 0)
        for status, count in part.get("status_dict", {}).items():
            totals.setdefault("status_dict", {})
            totals["status_dict"][status] = totals["status_dict"].get(status, 0) + count
    return totals


class DownloadedRows:
    """Where each row key is in img2dataset's parts, and its result read by row group on demand."""

    def __init__(self, folder: Path):
        self._files = [pq.ParquetFile(p, memory_map=True) for p in sorted(folder.glob("*.parquet"))]
        self._where: dict[str, tuple[int, int, int]] = {}
        for f, part in enumerate(self._files):
            names = part.schema_arrow.names
            self._image_column = next((c for c in IMAGE_FORMATS if c in names), "jpg")
            for g in range(part.num_row_groups):
                keys = part.read_row_group(g, columns=["row_key"]).column(0).to_pylist()
                for i, key in enumerate(keys):
                    self._where.setdefault(key, (f, g, i))
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Let go of the files (their scratch folder is removed next, maybe on a disk to unmount)."""
        self._groups.clear()
        for part in self._files:
            part.close()
        self._files = []

    def __enter__(self) -> "DownloadedRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _group(self, f: int, g: int) -> pa.Table:
        if (f, g) in self._groups:
            self._groups.move_to_end((f, g))
        else:
            part = self._files[f]
            columns = [c for c in RESULT_COLUMNS if c in part.schema_arrow.names] + [self._image_column]
            self._groups[(f, g)] = part.read_row_group(g, columns=columns)
            while len(self._groups) > _CACHED_GROUPS:
                self._groups.popitem(last=False)
        return self._groups[(f, g)]

    def results(self, keys: list[str]) -> dict[str, dict]:
        """img2dataset's result for each of ``keys`` it has, the image bytes under ``"image"``."""
        wanted: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for key in keys:
            if key in self._where:
                f, g, i = self._where[key]
                wanted.setdefault((f, g), []).append((key, i))
        found = {}
        for (f, g), members in wanted.items():
            rows = self._group(f, g).take([i for _, i in members]).to_pylist()
            for (key, _), row in zip(members, rows):
                row["image"] = row.pop(self._image_column)
                found[key] = row
        return found
