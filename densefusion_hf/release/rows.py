"""A release's JSON Lines as the metadata ingest reads: one Parquet file in the work directory.

Read tolerantly: ``image_id`` may be a number or a string (kept as text, so 13-digit ids never lose digits),
fields the layout does not name are kept (text as it is, anything else as its JSON text), and a line that
is not a JSON object becomes a row without a URL, which ingest drops as ``no_url``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import Recipe
from densefusion_hf.release.repo import ReleaseRepo
from densefusion_hf.stages.shards import temporary_name

# Our column -> the layout field that holds it.
NAMED = ("url", "caption", "image_path", "image_id")
# Columns the build writes itself; a release field of the same name is kept as release_<name>.
RESERVED = {"key", "text", "width", "height", "similarity", "punsafe", "pwatermark", "original_width",
            "original_height", "image_format", "sha256", "image", "image_source", "caption_model",
            "prompt_version", "position"}
_BATCH = 65_536


def _text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _lines(path: Path):
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line


def _parse(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def convert(jsonl: Path, out: Path, recipe: Recipe) -> Path:
    """Write the JSON Lines at ``jsonl`` as Parquet at ``out`` (atomically), in the file's order."""
    release = recipe.source.release
    layout = release.layout
    theirs = {getattr(layout, ours): ours for ours in NAMED}
    extra: dict[str, str] = {}   # release field -> our column, in order of first appearance
    for _, line in _lines(jsonl):
        for name in _parse(line) or {}:
            if name not in theirs and name not in extra:
                extra[name] = f"release_{name}" if name in RESERVED or name in NAMED else name
    schema = pa.schema([("url", pa.string()), ("text", pa.string()), ("caption", pa.string()),
                        ("caption_model", pa.string()), ("prompt_version", pa.string()),
                        ("image_id", pa.string()), ("image_path", pa.string())]
                       + [(column, pa.string()) for column in extra.values()])
    tmp = temporary_name(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema) as writer:
        batch: list[dict] = []
        for _, line in _lines(jsonl):
            row = _parse(line) or {}
            record = {ours: _text(row.get(field)) for field, ours in theirs.items()}
            record.update({column: _text(row.get(name)) for name, column in extra.items()})
            record.update(text=None, prompt_version=None, caption_model=release.caption_model if row else None)
            batch.append(record)
            if len(batch) == _BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    os.replace(tmp, out)
    return out


def release_metadata(recipe: Recipe, workdir: Path) -> Path:
    """The release's rows as Parquet under ``WORKDIR/release/``, converted once per release and layout."""
    release = recipe.source.release
    repo = ReleaseRepo(release, Path(workdir) / "release" / "downloads")
    jsonl = repo.file(release.layout.jsonl)
    if jsonl is None:
        raise UserError(f"source.release: {repo.where} has no {release.layout.jsonl} (source.release.layout.jsonl); "
                        f"check the path and the revision.")
    stat = jsonl.stat()
    name = hashlib.sha256(json.dumps([asdict(release), str(jsonl), stat.st_size, stat.st_mtime_ns],
                                     sort_keys=True).encode()).hexdigest()[:16]
    out = Path(workdir) / "release" / f"rows-{name}.parquet"
    return out if out.exists() else convert(jsonl, out, recipe)
