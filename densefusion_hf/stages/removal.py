"""Removal requests (``source.exclude``): URLs and keys dropped at ingest, image SHA-256s after fetch.

A text file holds one entry a line (blank lines and ``#`` comments ignored): 64 hex digits are an image
SHA-256, 24 hex digits a row key, anything else a URL (matched through its key, as ingest derives it).
A Parquet file may have ``url``, ``key`` and ``sha256`` columns.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from densefusion_hf.errors import UserError
from densefusion_hf.keys import url_key

REASON = "removal_request"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class Removals:
    keys: frozenset = frozenset()
    sha256: frozenset = frozenset()

    def __bool__(self) -> bool:
        return bool(self.keys or self.sha256)


def _entries(path: Path) -> tuple[set, set]:
    keys, digests = set(), set()
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"source.exclude: {path} is not a readable Parquet file ({exc})") from None
        known = [c for c in ("url", "key", "sha256") if c in table.column_names]
        if not known:
            raise UserError(f"source.exclude: {path} has none of the columns url, key, sha256 "
                            f"(found {', '.join(table.column_names)})")
        keys |= {url_key(u.strip()) for u in table.column("url").to_pylist() if u} if "url" in known else set()
        keys |= {k.strip().lower() for k in table.column("key").to_pylist() if k} if "key" in known else set()
        if "sha256" in known:
            digests |= {d.strip().lower() for d in table.column("sha256").to_pylist() if d}
        return keys, digests
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"source.exclude: cannot read {path} as UTF-8 text ({exc})") from None
    for line in lines:
        entry = line.split("#", 1)[0].strip() if not line.lstrip().startswith(("http", "HTTP")) else line.strip()
        if not entry:
            continue
        if _SHA256.fullmatch(entry.lower()):
            digests.add(entry.lower())
        elif _KEY.fullmatch(entry.lower()):
            keys.add(entry.lower())
        else:
            keys.add(url_key(entry))
    return keys, digests


@functools.lru_cache(maxsize=8)
def _load(paths: tuple[str, ...], stamps: tuple) -> Removals:
    keys, digests = set(), set()
    for path in paths:
        more_keys, more_digests = _entries(Path(path))
        keys |= more_keys
        digests |= more_digests
    return Removals(frozenset(keys), frozenset(digests))


def load_removals(paths) -> Removals:
    """The removal requests of a recipe's ``source.exclude`` files (cached while the files are unchanged)."""
    paths = tuple(str(p) for p in paths)
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"source.exclude: {path} does not exist; give a text or Parquet file of URLs, "
                            f"keys or image SHA-256s")
    return _load(paths, tuple(Path(p).stat().st_mtime_ns for p in paths))


def exclusion_params(paths) -> list | None:
    """What decides the output: each file's SHA-256 (None when there are no removal requests)."""
    if not paths:
        return None
    return [[str(p), hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).is_file() else None]
            for p in paths]


def split_removed(rows: list[dict], drops: list[dict], removals: Removals) -> tuple[list[dict], list[dict]]:
    """Move the rows whose key was asked to be removed from ``rows`` into ``drops``."""
    if not removals.keys:
        return rows, drops
    kept = []
    for row in rows:
        if row["key"] in removals.keys:
            drops.append({"key": row["key"], "url": row["url"], "reason": REASON,
                          "detail": "URL or key listed in source.exclude", "position": row.get("position")})
        else:
            kept.append(row)
    return kept, drops
