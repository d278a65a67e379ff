"""The stage contract on disk: ``WORKDIR/<stage>/`` holds one set of files per shard.

    shard-00003.parquet          the rows kept (written under a temporary name, renamed when complete)
    shard-00003.dropped.parquet  every row dropped, with its key, URL, reason and detail
    shard-00003.stats.json       counts for ``df-hf status`` and the dataset card
    shard-00003.done             written last: a shard without it is redone on the next run

Renames are atomic, so a build killed at any instant leaves each shard either complete or absent.
The done marker records the size and SHA-256 of each of the shard's files, so a shard damaged after it
was committed (truncated, deleted, a stats file edited) is found by ``is_done``, reported with the file's
name, and redone; no other shard is touched.  Data files are checked by size and Parquet footer on every
``is_done`` (cheap); ``verify(shard, checksums=True)`` also rehashes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

DROPPED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("dup_of", pa.string()),   # the key of the row kept in its place (duplicates only)
])


def shard_name(index: int) -> str:
    return f"{index:05d}"


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before its rename; ``StageDir.prepare`` removes leftovers."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temporary_name(path)
    try:
        tmp.write_bytes(data)
    except OSError:  # a full disk: leave no partial file
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read a MiB at a time (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Write a Parquet file under a temporary name; ``commit()`` renames it into place."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.tmp = temporary_name(path)
        self.rows = 0
        self._writer = pq.ParquetWriter(self.tmp, schema)

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self._writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()  # may fail again on a full disk
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class StageDir:
    """The folder of one stage's outputs."""

    def __init__(self, workdir: Path, stage: str):
        self.stage = stage
        self.path = Path(workdir) / stage

    def shard_path(self, shard: str) -> Path:
        return self.path / f"shard-{shard}.parquet"

    def dropped_path(self, shard: str) -> Path:
        return self.path / f"shard-{shard}.dropped.parquet"

    def stats_path(self, shard: str) -> Path:
        return self.path / f"shard-{shard}.stats.json"

    def done_path(self, shard: str) -> Path:
        return self.path / f"shard-{shard}.done"

    def is_done(self, shard: str) -> bool:
        """Whether the shard is committed and intact.  A damaged one is reported (naming the file), its
        done marker removed so that the run redoes it, and False returned."""
        marker = self.done_path(shard)
        if not marker.exists():
            return False
        problem = self.verify(shard)
        if problem is None:
            return True
        print(f"{self.stage}: shard {shard} is damaged: {problem}; it will be redone.", file=sys.stderr)
        marker.unlink(missing_ok=True)
        return False

    def verify(self, shard: str, checksums: bool = False) -> str | None:
        """What is wrong with a committed shard's files (None: nothing), from its done marker's record."""
        marker = self.done_path(shard)
        try:
            text = marker.read_text()
        except FileNotFoundError:
            return f"{marker} is missing"
        if not text.strip():
            return None  # a marker from before markers recorded files: trusted as it is
        try:
            files = json.loads(text)["files"]
        except (ValueError, KeyError, TypeError):
            return f"{marker} is not a done marker this version wrote (not JSON with 'files')"
        for name, record in sorted(files.items()):
            path = self.path / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return f"{path} is missing (its done marker lists it)"
            if size != record.get("size"):
                return f"{path} is {size} bytes; its done marker recorded {record.get('size')} (truncated or replaced)"
            small = name.endswith(".json")
            if name.endswith(".parquet") and not small:
                with open(path, "rb") as handle:
                    handle.seek(max(0, size - 4))
                    if handle.read(4) != b"PAR1":
                        return f"{path} has no Parquet footer (overwritten)"
            if (checksums or small) and file_digest(path) != record.get("sha256"):
                return f"{path} does not match the checksum its done marker recorded (edited)"
            if small:
                try:
                    json.loads(path.read_text())
                except ValueError as exc:
                    return f"{path} is not JSON ({exc})"
        return None

    def done_shards(self) -> list[str]:
        """Committed shards, in order; a damaged one is reported and left out (so it is redone)."""
        if not self.path.is_dir():
            return []
        names = [p.name[len("shard-"):-len(".done")] for p in self.path.glob("shard-*.done")]
        names = [n for n in names if self.is_done(n)]
        return sorted(names, key=lambda n: (len(n), n))  # numeric order, also past 99999

    def prepare(self) -> None:
        """Create the folder and remove what an interrupted run left half-written."""
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.rglob(".*.tmp-*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def remove_unfinished(self) -> None:
        """Delete the files of shards that have no done marker (a write stopped part-way)."""
        for path in self.path.glob("shard-*.*"):
            shard = path.name[len("shard-"):].split(".", 1)[0]
            if path.is_file() and not self.done_path(shard).exists():
                path.unlink(missing_ok=True)

    def writer(self, shard: str, schema: pa.Schema) -> ShardWriter:
        return ShardWriter(self.shard_path(shard), schema)

    def scratch(self, shard: str) -> Path:
        """A temporary folder for one shard's intermediate files, removed by ``prepare`` if left over."""
        path = temporary_name(self.path / f"shard-{shard}.scratch")
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def finish(self, shard: str, dropped: Iterable[dict], stats: dict) -> dict:
        """Write the dropped rows and stats, then the done marker: the shard's commit point."""
        dropped = list(dropped)
        tmp = temporary_name(self.dropped_path(shard))
        pq.write_table(pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA), tmp)
        os.replace(tmp, self.dropped_path(shard))
        stats = dict(stats, shard=shard, dropped=dict(sorted(Counter(d["reason"] for d in dropped).items())))
        stats["rows_dropped"] = len(dropped)
        atomic_write_json(self.stats_path(shard), stats)
        files = [p for p in (self.shard_path(shard), self.dropped_path(shard), self.stats_path(shard)) if p.exists()]
        record = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)} for p in files}
        atomic_write_json(self.done_path(shard), {"files": record})
        return stats

    def read(self, shard: str, columns: list[str] | None = None, memory_map: bool = True) -> pa.Table:
        return pq.read_table(self.shard_path(shard), columns=columns, memory_map=memory_map)

    def read_dropped(self) -> pa.Table:
        tables = [pq.read_table(self.dropped_path(s)) for s in self.done_shards()]
        return pa.concat_tables(tables) if tables else DROPPED_SCHEMA.empty_table()

    def stats(self, shard: str) -> dict:
        return json.loads(self.stats_path(shard).read_text())

    def all_stats(self) -> list[dict]:
        return [self.stats(s) for s in self.done_shards()]

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
