"""What ``df-hf browse PATH`` looks at, and reading its rows a row group at a time.

PATH is one of:

- a work directory (it has ``manifest.json``): the published rows of its ``dataset/CONFIG`` folder (or, before
  publish, the shards of the last stage that has any, with the images joined from fetch's shards), its
  per-stage counts and its dropped rows;
- a published dataset folder (``README.md`` with ``configs``, or Parquet files): its rows and card;
- a Hub dataset repo id (``org/name``): the same, read through ``huggingface_hub``'s ``HfFileSystem`` with
  ranged reads, pinned to the commit ``--revision`` resolved to when the server started.

Only the footers are read up front; a page reads the row groups that hold its rows (published row groups
hold at most 100 rows), without the image column unless it shows an image.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from densefusion_hf.errors import UserError

CACHE_FOLDER = "browse-cache"
#: Stages whose shards hold rows, latest first: what an unpublished work directory shows.
ROW_STAGES = ("caption", "select", "semdedup", "embed", "dedup", "fetch")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SHARD = re.compile(r"shard-(\d+)\.parquet$")
_GROUP_CACHE = 64                   # row groups of small columns kept in memory
_IMAGE_CACHE_BYTES = 256 * 2 ** 20  # image columns of row groups kept in memory


@dataclass
class DataFile:
    """One Parquet file of the rows: where its row groups start, globally and in the file."""

    path: str
    start: int                       # global index of its first row
    group_rows: list[int]
    columns: list[str]
    group_starts: list[int] = field(default_factory=list)

    def __post_init__(self):
        total, self.group_starts = 0, []
        for count in self.group_rows:
            self.group_starts.append(total)
            total += count
        self.rows = total

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass
class Stage:
    """A stage's counts, as ``df-hf status`` shows them."""

    name: str
    rows_in: int
    rows_out: int
    rows_dropped: int
    dropped: dict[str, int]


class Source:
    """The rows, the card and the build of one PATH."""

    def __init__(self, *, kind: str, label: str, config: str | None, configs: list[str], root: str,
                 files: list[str], cache_dir: Path, fingerprint: str, fs=None, workdir: Path | None = None,
                 stages: list[Stage] | None = None, join_images: bool = False, revision: str | None = None,
                 build_state: str | None = None):
        self.kind, self.label, self.config, self.configs = kind, label, config, configs
        self.build_state = build_state          # a work directory's done markers, when it was opened
        self.opened_with: tuple | None = None   # open_source's arguments, to open it again when it changed
        self.root, self.fs, self.workdir, self.revision = root, fs, workdir, revision
        self.cache_dir, self.fingerprint = cache_dir, fingerprint
        self.stages = stages or []
        self.join_images = join_images          # rows without an image column: bytes from fetch's shards
        self._handles: dict[str, pq.ParquetFile] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._groups: OrderedDict = OrderedDict()
        self._images: OrderedDict = OrderedDict()
        self._image_locks: dict[tuple[str, int], threading.Lock] = {}
        self._image_bytes_cached = 0
        self._fetch_keys: dict[str, dict[str, tuple[int, int]]] = {}
        self.files = self._read_footers(files)
        self.num_rows = sum(f.rows for f in self.files)
        self._starts = [f.start for f in self.files]
        self.columns = self.files[0].columns if self.files else []

    # -- files ---------------------------------------------------------------------------------------------

    def _open(self, path: str) -> pq.ParquetFile:
        with self._lock:
            handle = self._handles.get(path)
        if handle is not None:
            return handle
        # opened outside the lock: opening reads the footer, over the network a few round trips per file
        if self.fs is None:
            handle = pq.ParquetFile(path, memory_map=True)
        else:
            handle = pq.ParquetFile(self.fs.open(path, "rb", block_size=2 ** 20))
        with self._lock:
            self._locks.setdefault(path, threading.Lock())
            return self._handles.setdefault(path, handle)

    def _read(self, path: str, group: int, columns: list[str]) -> pa.Table:
        with self._explained(path, f"row group {group}"):
            handle = self._open(path)
            with self._locks[path]:   # a ParquetFile over one file object reads one thing at a time
                return handle.read_row_group(group, columns=columns)

    @contextmanager
    def _explained(self, path: str, what: str):
        """A Hub that cannot be read (unreachable, an HTTP error, a connection reset, after huggingface_hub's
        own retries) as a UserError naming the repo, the file and what to do."""
        if self.fs is None:
            yield
            return
        from huggingface_hub import errors

        try:
            yield
        except (getattr(errors, "HTTPError", errors.HfHubHTTPError), OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            endpoint = getattr(self.fs, "endpoint", "the Hub")
            raise UserError(f"{self.label}: cannot read {what} of {path[len(self.root) + 1:]} from {endpoint} "
                            f"({type(exc).__name__}: {reason}). Check the network and HF_ENDPOINT, then "
                            f"retry.") from None

    def _read_footers(self, paths: list[str]) -> list[DataFile]:
        def footer(path):
            with self._explained(path, "the Parquet footer"):
                meta = self._open(path).metadata
                return ([meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
                        self._open(path).schema_arrow.names)

        if len(paths) > 1:  # footers parse outside the GIL, and over the network they are round trips
            pool = ThreadPoolExecutor(min(16 if self.fs is not None else 4, len(paths)))
            try:
                footers = list(pool.map(footer, paths))
            finally:  # after an error, the files not started yet are not tried
                pool.shutdown(cancel_futures=True)
        else:
            footers = [footer(p) for p in paths]
        files, start = [], 0
        for path, (groups, columns) in zip(paths, footers):
            files.append(DataFile(path, start, groups, columns))
            start += sum(groups)
        return files

    def locate(self, row: int) -> tuple[DataFile, int, int]:
        """(file, row group, offset in the group) of global row ``row``."""
        if not 0 <= row < self.num_rows:
            raise IndexError(row)
        data = self.files[bisect.bisect_right(self._starts, row) - 1]
        within = row - data.start
        group = bisect.bisect_right(data.group_starts, within) - 1
        return data, group, within - data.group_starts[group]

    @property
    def small_columns(self) -> list[str]:
        return [c for c in self.columns if c != "image"]

    def group(self, data: DataFile, group: int) -> pa.Table:
        """The small columns (everything but the image) of one row group, from a small LRU cache."""
        cache_key = (data.path, group)
        with self._lock:
            if cache_key in self._groups:
                self._groups.move_to_end(cache_key)
                return self._groups[cache_key]
        table = self._read(data.path, group, [c for c in data.columns if c != "image"])
        with self._lock:
            self._groups[cache_key] = table
            while len(self._groups) > _GROUP_CACHE:
                self._groups.popitem(last=False)
        return table

    def rows(self, ids: list[int]) -> list[dict]:
        """The small columns of rows ``ids`` (global indexes), each with its ``_row`` index, in that order."""
        out = []
        for row in ids:
            data, group, offset = self.locate(row)
            record = self.group(data, group).slice(offset, 1).to_pylist()[0]
            record["_row"] = row
            out.append(record)
        return out

    def image_bytes(self, row: int) -> bytes | None:
        """The encoded image of global row ``row`` (None when the row has no image)."""
        data, group, offset = self.locate(row)
        if "image" in data.columns:
            return self._group_image(data.path, group, offset)
        if self.join_images:
            key = self.group(data, group).column("key")[offset].as_py()
            match = _SHARD.search(data.name)
            return self.fetched_image(key, match.group(1)) if match else None
        return None

    def _group_image(self, path: str, group: int, offset: int) -> bytes | None:
        cache_key = (path, group)
        with self._lock:
            group_lock = self._image_locks.setdefault(cache_key, threading.Lock())
        with group_lock:  # the thumbnails of one page ask for the same row groups at once: read each once
            return self._cached_image_column(cache_key)[offset].as_py()

    def _cached_image_column(self, cache_key: tuple[str, int]) -> pa.Array:
        path, group = cache_key
        with self._lock:
            column = self._images.get(cache_key)
            if column is not None:
                self._images.move_to_end(cache_key)
        if column is None:
            column = self._read(path, group, ["image"]).column("image").combine_chunks()
            if pa.types.is_struct(column.type):
                column = column.field("bytes")
            with self._lock:
                self._images[cache_key] = column
                self._image_bytes_cached += column.nbytes
                while self._image_bytes_cached > _IMAGE_CACHE_BYTES and len(self._images) > 1:
                    old_key, old = self._images.popitem(last=False)
                    self._image_bytes_cached -= old.nbytes
                    self._image_locks.pop(old_key, None)
        return column

    # -- a work directory's fetch shards (dropped rows, unpublished rows) -----------------------------------

    def fetch_shard_path(self, shard: str) -> Path | None:
        if self.workdir is None:
            return None
        path = self.workdir / "fetch" / f"shard-{shard}.parquet"
        return path if path.exists() else None

    def fetched_image(self, key: str, shard: str | None) -> bytes | None:
        """The image bytes fetch kept for ``key`` (in fetch's shard ``shard``), or None."""
        if shard is None:
            return None
        path = self.fetch_shard_path(shard)
        if path is None:
            return None
        with self._lock:
            keys = self._fetch_keys.get(shard)
        if keys is None:
            handle = self._open(str(path))
            keys = {}
            for group in range(handle.metadata.num_row_groups):
                column = self._read(str(path), group, ["key"]).column("key").to_pylist()
                keys.update((k, (group, i)) for i, k in enumerate(column))
            with self._lock:
                self._fetch_keys[shard] = keys
        where = keys.get(key)
        return self._group_image(str(path), *where) if where else None

    # -- the card and its assets -----------------------------------------------------------------------------

    def read_bytes(self, relative: str) -> bytes | None:
        """A file of the dataset folder (the card, its assets), or None when it is not there."""
        parts = [p for p in relative.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return None
        if self.fs is None:
            path = Path(self.root) / Path(*parts)
            return path.read_bytes() if path.is_file() else None
        try:
            return self.fs.cat_file(f"{self.root}/{'/'.join(parts)}")
        except (FileNotFoundError, OSError):
            return None

    def card(self) -> tuple[dict, str]:
        """(the card's YAML metadata, its Markdown body); empty when there is no card."""
        raw = self.read_bytes("README.md")
        return split_card(raw.decode("utf-8", "replace")) if raw else ({}, "")

    @property
    def index_fingerprint(self) -> str:
        """What the index depends on: the data files, and a work directory's finished shards (its drops)."""
        if self.build_state is None:
            return self.fingerprint
        return hashlib.sha256(f"{self.fingerprint}\0{self.build_state}".encode()).hexdigest()[:16]

    def changed(self) -> bool:
        """Whether a work directory's build moved on since it was opened (a shard finished, a stage redone)."""
        return self.build_state is not None and self.workdir is not None \
            and build_state(self.workdir) != self.build_state

    def reopen(self) -> "Source":
        """A new Source over the same PATH, as it is now."""
        return open_source(*self.opened_with)

    def describe(self) -> str:
        where = {"workdir": "work directory", "folder": "dataset folder", "hub": "Hub dataset"}[self.kind]
        config = f", config {self.config}" if self.config else ""
        return f"{where} {self.label}{config}: {self.num_rows:,} rows in {len(self.files)} files"


def split_card(text: str) -> tuple[dict, str]:
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            try:
                meta = yaml.safe_load(text[3:end]) or {}
            except yaml.YAMLError:
                meta = {}
            return (meta if isinstance(meta, dict) else {}), text[end + 4:].lstrip("\n")
    return {}, text


def _card_configs(meta: dict) -> dict[str, list[str]]:
    """config name -> its data file patterns (every split), from a card's ``configs``."""
    found = {}
    for entry in meta.get("configs") or []:
        if not isinstance(entry, dict) or "config_name" not in entry:
            continue
        files = entry.get("data_files") or []
        if isinstance(files, str):
            files = [files]
        patterns = []
        for item in files:
            paths = item.get("path") if isinstance(item, dict) else item
            patterns += [paths] if isinstance(paths, str) else list(paths or [])
        found[str(entry["config_name"])] = patterns
    return found


def _choose_config(configs: list[str], wanted: str | None, where: str) -> str | None:
    if wanted is not None:
        if wanted not in configs:
            raise UserError(f"{where} has no config {wanted!r}; its configs: {', '.join(configs) or 'none'}.")
        return wanted
    return configs[0] if configs else None


def _user_cache(slug: str, identity: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    safe = re.sub(r"[^\w.-]+", "-", slug).strip("-")[:60] or "dataset"
    return base / "densefusion-hf" / "browse" / f"{safe}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _writable_cache(preferred: Path, slug: str, identity: str) -> Path:
    target = preferred if os.access(preferred.parent if not preferred.exists() else preferred, os.W_OK) else None
    return target or _user_cache(slug, identity)


def _local_fingerprint(paths: list[str], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _folder_files(folder: Path, config: str | None) -> tuple[str | None, list[str], list[str]]:
    """(chosen config, all configs, its Parquet files) of a published dataset folder."""
    meta, _ = split_card((folder / "README.md").read_text("utf-8", "replace")) if (folder / "README.md").is_file() \
        else ({}, "")
    declared = _card_configs(meta)
    if declared:
        chosen = _choose_config(list(declared), config, str(folder))
        files = sorted({str(p) for pattern in declared[chosen] for p in folder.glob(pattern)
                        if p.suffix == ".parquet" and p.is_file()})
        return chosen, list(declared), files
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
    if subfolders:
        chosen = _choose_config(subfolders, config, str(folder))
        return chosen, subfolders, sorted(str(p) for p in (folder / chosen).glob("*.parquet"))
    return None, [], sorted(str(p) for p in folder.glob("*.parquet"))


def _stages_from_build_info(info: dict) -> list[Stage]:
    stages = [Stage(s["name"], s.get("rows_in", 0), s.get("rows_out", 0), s.get("rows_dropped", 0),
                    dict(s.get("dropped", {}))) for s in info.get("stages", [])]
    rows = sum(f.get("rows", 0) for f in info.get("files", []) if isinstance(f, dict))
    if stages and rows:
        stages.append(Stage("publish", stages[-1].rows_out, rows, 0, {}))
    return stages


def _manifest(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{workdir}/manifest.json cannot be read ({exc}); is {workdir} a work directory?") from None


def build_state(workdir: Path) -> str:
    """A digest of a work directory's done markers (name, size, time) and its manifest: it changes when a shard
    finishes, is redone or removed, so a server started while the build runs sees its later rows and drops."""
    from densefusion_hf.recipe import STAGE_ORDER

    digest = hashlib.sha256()
    for name in ("manifest.json", *(f"{stage}/{done}" for stage in STAGE_ORDER if (workdir / stage).is_dir()
                                   for done in sorted(os.listdir(workdir / stage)) if done.endswith(".done"))):
        try:
            stat = os.stat(workdir / name)
        except FileNotFoundError:  # removed while listed: the next look sees it gone
            continue
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _workdir_stages(workdir: Path, manifest: dict) -> list[Stage]:
    """What ``df-hf status`` counts (``runners.status.collect_status``), read from the same stats files without
    importing the stages (and so torch, datasets and the models' libraries)."""
    from densefusion_hf.recipe import STAGE_ORDER

    recorded = manifest.get("stages") or {}
    stages = []
    for name in STAGE_ORDER:
        if name not in recorded:
            continue
        folder = workdir / name
        stats = []
        for done in sorted(folder.glob("shard-*.done")) if folder.is_dir() else []:
            try:
                stats.append(json.loads((folder / (done.name[:-len(".done")] + ".stats.json")).read_text()))
            except (OSError, ValueError):
                continue
        dropped: dict[str, int] = {}
        for s in stats:
            for reason, count in (s.get("dropped") or {}).items():
                dropped[reason] = dropped.get(reason, 0) + count
        stages.append(Stage(name, sum(s.get("rows_in", 0) for s in stats), sum(s.get("rows_out", 0) for s in stats),
                            sum(s.get("rows_dropped", 0) for s in stats),
                            dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))))
    return stages


def open_source(path: str, config: str | None = None, revision: str | None = None,
                cache_dir: Path | None = None) -> Source:
    """The Source for PATH (a work directory, a dataset folder or a Hub repo id); a UserError that says what
    was looked for when PATH is none of them."""
    source = _open(path, config, revision, cache_dir)
    source.opened_with = (path, config, revision, cache_dir)
    return source


def _open(path: str, config: str | None, revision: str | None, cache_dir: Path | None) -> Source:
    local = Path(path).expanduser()
    if local.exists():
        if revision is not None:
            raise UserError(f"--revision is for a Hub repo; {path} is a local folder.")
        if not local.is_dir():
            raise UserError(f"{path} is a file. {ACCEPTED}")
        return _open_workdir(local.resolve(), config, cache_dir) if (local / "manifest.json").exists() \
            else _open_folder(local.resolve(), config, cache_dir)
    repo = path[len("hf://datasets/"):] if path.startswith("hf://datasets/") else path
    if _REPO_ID.match(repo) and (repo != path or not looks_like_a_path(path)):
        return _open_hub(repo, config, revision, cache_dir)
    raise UserError(f"{path}: no such file or folder{_missing_part(local)}. {ACCEPTED}")


#: What PATH may be, for the messages that refuse one.
ACCEPTED = ("Pass a work directory (the --workdir of `df-hf build`), a published dataset folder, or a Hub "
            "dataset repo id ORG/NAME (hf://datasets/ORG/NAME when a local folder is named ORG).")


def looks_like_a_path(path: str) -> bool:
    """Whether PATH, which does not exist, was meant as a local path rather than a Hub repo id: it starts like
    one, has more than one ``/``, or its first part exists here (``build/nope`` beside a ``build`` folder)."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    first = path.split("/", 1)[0]
    return bool(first) and Path(first).exists()


def _missing_part(local: Path) -> str:
    """ " (FOLDER exists, NAME does not)" for the deepest part of ``local`` that exists, if any."""
    for parent in local.parents:
        if str(parent) not in ("", ".") and parent.exists():
            return f" ({parent} exists, {local.relative_to(parent)} does not)"
    return ""


def _open_workdir(workdir: Path, config: str | None, cache_dir: Path | None) -> Source:
    state = build_state(workdir)  # before reading: a shard finishing meanwhile is seen as a change later
    manifest = _manifest(workdir)
    recorded = ((manifest.get("stages") or {}).get("publish") or {}).get("dataset")
    folder = Path(recorded) if recorded else workdir / "dataset"
    if not folder.is_absolute():
        folder = workdir / folder
    stages = _workdir_stages(workdir, manifest)
    cache = cache_dir or _writable_cache(workdir / CACHE_FOLDER, workdir.name, str(workdir))
    chosen, configs, files = (_folder_files(folder, config) if folder.is_dir() else (None, [], []))
    join = False
    if not files:  # not published yet: the last stage with finished shards, images from fetch
        if config is not None:
            raise UserError(f"{workdir} has no published dataset yet, so no configs; drop --config.")
        for stage in ROW_STAGES:
            stage_dir = workdir / stage
            shards = sorted(stage_dir.glob("shard-*.done")) if stage_dir.is_dir() else []
            files = [str(stage_dir / f"{p.name[:-len('.done')]}.parquet") for p in shards]
            files = [f for f in files if Path(f).exists()]
            if files:
                join = stage != "fetch"
                break
        folder = workdir
    fingerprint = _local_fingerprint(files, f"workdir\0{chosen}")
    return Source(kind="workdir", label=str(workdir), config=chosen, configs=configs, root=str(folder), files=files,
                  cache_dir=cache, fingerprint=fingerprint, workdir=workdir, stages=stages, join_images=join,
                  build_state=state)


def _open_folder(folder: Path, config: str | None, cache_dir: Path | None) -> Source:
    chosen, configs, files = _folder_files(folder, config)
    if not files:
        raise UserError(f"{folder} is neither a work directory (no manifest.json) nor a dataset folder (no "
                        f"Parquet files{' for config ' + chosen if chosen else ''}). Pass the folder given to "
                        f"`df-hf build --workdir`, its dataset/ folder, or a Hub dataset repo id.")
    parent = folder.parent
    if cache_dir is None and (parent / "manifest.json").exists():  # WORKDIR/dataset: the work directory's cache
        cache_dir = _writable_cache(parent / CACHE_FOLDER, parent.name, str(parent))
    cache = cache_dir or _user_cache(folder.name, str(folder))
    info = _build_info(folder / "assets" / (chosen or "") / "build.json")
    return Source(kind="folder", label=str(folder), config=chosen, configs=configs, root=str(folder),
                  files=files, cache_dir=cache, fingerprint=_local_fingerprint(files, f"folder\0{chosen}"),
                  stages=_stages_from_build_info(info))


def _build_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _open_hub(repo: str, config: str | None, revision: str | None, cache_dir: Path | None) -> Source:
    from urllib.parse import quote

    try:
        from huggingface_hub import HfApi, HfFileSystem, constants
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise UserError(f"browsing a Hub repo needs huggingface_hub ({exc}).") from None
    endpoint = constants.ENDPOINT
    api = HfApi()
    try:
        info = api.dataset_info(repo, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise UserError(f"{repo} on {endpoint} is gated: accept its conditions on the Hub and set HF_TOKEN "
                        f"(or run `hf auth login`).") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo} on {endpoint} has no revision {revision!r} (a branch, a tag such as v1.0.0, "
                        f"or a commit).") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo}: no such dataset repo on {endpoint}, or it is private and needs a token "
                        f"(set HF_TOKEN or run `hf auth login`).") from None
    except HfHubHTTPError as exc:
        raise UserError(f"{repo} on {endpoint}: {exc}") from None
    except OSError as exc:  # connection refused, DNS, timeouts
        raise UserError(f"cannot reach {endpoint} for {repo}: {exc}. Check the network, or HF_ENDPOINT.") from None
    sha = info.sha
    names = sorted(s.rfilename for s in info.siblings or [])
    fs = HfFileSystem()
    root = f"datasets/{repo}@{quote(sha, safe='')}"
    meta, _ = split_card(fs.cat_file(f"{root}/README.md").decode("utf-8", "replace")) if "README.md" in names \
        else ({}, "")
    declared = _card_configs(meta)
    if declared:
        chosen = _choose_config(list(declared), config, repo)
        matched = sorted({n for pattern in declared[chosen] for n in names
                          if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, pattern.rstrip("*") + "*")})
        configs = list(declared)
    else:
        configs = sorted({n.split("/")[0] for n in names if n.endswith(".parquet") and "/" in n})
        chosen = _choose_config(configs, config, repo) if configs else None
        matched = [n for n in names if n.endswith(".parquet") and (chosen is None or n.startswith(chosen + "/"))]
    files = [n for n in matched if n.endswith(".parquet")]
    if not files:
        raise UserError(f"{repo}@{revision or 'main'} has no Parquet files{' for config ' + chosen if chosen else ''}"
                        f"; browse reads Parquet datasets (as `df-hf publish` and `push_to_hub` write them).")
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    fingerprint = hashlib.sha256(f"hub\0{repo}\0{sha}\0{chosen}\0".encode()
                                 + "".join(f"{n}:{sizes.get(n)}\n" for n in files).encode()).hexdigest()[:16]
    build = {}
    if chosen and f"assets/{chosen}/build.json" in names:
        try:
            build = json.loads(fs.cat_file(f"{root}/assets/{chosen}/build.json"))
        except (OSError, ValueError):
            build = {}
    label = repo + (f"@{revision}" if revision else "")
    return Source(kind="hub", label=label, config=chosen, configs=configs, root=root,
                  files=[f"{root}/{n}" for n in files], fs=fs, revision=sha,
                  cache_dir=cache_dir or _user_cache(repo, f"{endpoint}\0{repo}\0{sha}"), fingerprint=fingerprint,
                  stages=_stages_from_build_info(build))
