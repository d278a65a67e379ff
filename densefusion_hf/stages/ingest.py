"""ingest: read the LAION-style metadata, give every row its key, apply the metadata filters.

Nothing is downloaded here: rows are cut into shards of ``source.rows_per_shard`` in source order,
with the recipe's column names mapped to ours (key, url, text, width, height, similarity, punsafe,
pwatermark, and ``keep_columns``).  A row whose URL is empty, that a filter rejects, or whose URL was
already kept, is recorded in the shard's dropped rows with its reason and the value that decided it.
"""

from __future__ import annotations

import glob
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.console import progress
from densefusion_hf.errors import UserError
from densefusion_hf.keys import url_key
from densefusion_hf.recipe import MetadataFilters, Recipe
from densefusion_hf.sample.make import SAMPLE_VERSION, write_sample
from densefusion_hf.stages.removal import exclusion_params, load_removals, split_removed
from densefusion_hf.stages.shards import shard_name
from densefusion_hf.stages.base import BuildContext, Stage

# Our column name -> the recipe field (in source.columns) that names it in the metadata.
CANONICAL_COLUMNS = ("url", "text", "width", "height", "similarity", "punsafe", "pwatermark")

BASE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("similarity", pa.float64()),
    ("punsafe", pa.float64()),
    ("pwatermark", pa.float64()),
])


def source_files(recipe: Recipe, workdir: Path) -> list[Path]:
    """The metadata files, in the recipe's order (each glob sorted); the sample is written on demand."""
    if recipe.source.sample:
        return [write_sample(workdir / "sample")]
    files: list[Path] = []
    for pattern in recipe.source.metadata:
        matches = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
        if not matches:
            raise UserError(f"{recipe.path}: source.metadata: {pattern} matches no file. Check the path "
                            f"(relative paths start at the recipe's folder, {recipe.path.parent}).")
        files.extend(m for m in matches if m not in files)
    return files


def _check_columns(recipe: Recipe, path: Path, schema: pa.Schema) -> dict[str, str]:
    """Map our names to the file's columns, or say which recipe field names a missing column."""
    names = set(schema.names)
    mapping = {}
    for ours in CANONICAL_COLUMNS:
        theirs = getattr(recipe.source.columns, ours)
        if theirs is None:
            continue
        if theirs not in names:
            raise UserError(f"{path} has no column {theirs!r}, which the recipe names in "
                            f"source.columns.{ours}. Its columns are: {', '.join(schema.names)}. "
                            f"Set source.columns.{ours} to the right name"
                            + (" (or null if it has none)." if ours not in ("url", "text") else "."))
        mapping[ours] = theirs
    for extra in recipe.source.keep_columns:
        if extra not in names:
            raise UserError(f"{path} has no column {extra!r} listed in source.keep_columns. "
                            f"Its columns are: {', '.join(schema.names)}.")
        if extra in BASE_SCHEMA.names:
            raise UserError(f"source.keep_columns: {extra!r} clashes with a column the build writes; "
                            f"map it through source.columns instead.")
        mapping[extra] = extra
    return mapping


def count_rows(recipe: Recipe, files: list[Path]) -> int:
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return min(total, recipe.source.limit) if recipe.source.limit else total


def _chunks(recipe: Recipe, files: list[Path]) -> Iterator[pa.Table]:
    """Tables of exactly rows_per_shard rows (the last may be shorter), in source order."""
    size, limit = recipe.source.rows_per_shard, recipe.source.limit
    pending: list[pa.Table] = []
    pending_rows = emitted = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        mapping = _check_columns(recipe, path, parquet.schema_arrow)
        for batch in parquet.iter_batches(batch_size=min(size, 65_536), columns=list(set(mapping.values()))):
            table = pa.Table.from_batches([batch])
            table = pa.table({ours: table[theirs] for ours, theirs in mapping.items()})
            if limit is not None:
                table = table.slice(0, max(0, limit - emitted - pending_rows))
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= size:
                whole = pa.concat_tables(pending, promote_options="permissive")
                yield whole.slice(0, size)
                emitted += size
                pending, pending_rows = [whole.slice(size)], pending_rows - size
            if limit is not None and emitted + pending_rows >= limit:
                break
        if limit is not None and emitted + pending_rows >= limit:
            break
    if pending_rows:
        yield pa.concat_tables(pending, promote_options="permissive")


def _number(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def filter_reason(row: dict, filters: MetadataFilters, size_source: str = "listed") -> tuple[str, str] | None:
    """(reason, detail) when a filter rejects the row; unknown values pass.

    ``filters`` is any object with the MetadataFilters fields (select's filters have the same names);
    ``size_source`` says in the detail whether the size is the metadata's or the decoded image's.
    """
    width, height = _number(row.get("width")), _number(row.get("height"))
    if width and height:
        short, long = min(width, height), max(width, height)
        if filters.min_short_side is not None and short < filters.min_short_side:
            return "too_small", f"{size_source} {width:.0f}x{height:.0f}, short side {short:.0f} < {filters.min_short_side}"
        if filters.max_aspect_ratio is not None and long / short > filters.max_aspect_ratio:
            return "aspect_ratio", (f"{size_source} {width:.0f}x{height:.0f}, "
                                    f"aspect ratio {long / short:.2f} > {filters.max_aspect_ratio}")
    checks = (
        ("punsafe", filters.max_punsafe, "unsafe", lambda v, t: v > t, ">"),
        ("pwatermark", filters.max_pwatermark, "watermark", lambda v, t: v > t, ">"),
        ("similarity", filters.min_similarity, "low_similarity", lambda v, t: v < t, "<"),
    )
    for column, threshold, reason, rejects, sign in checks:
        value = _number(row.get(column))
        if threshold is not None and value is not None and rejects(value, threshold):
            return reason, f"{column} {value:.3f} {sign} {threshold}"
    return None


def _as_int(value) -> int | None:
    number = _number(value)
    return None if number is None else int(round(number))


class Ingest(Stage):
    name = "ingest"

    def params(self, recipe: Recipe) -> dict:
        source = asdict(recipe.source)
        if recipe.source.sample:
            source["sample_version"] = SAMPLE_VERSION
        source["metadata"] = [str(p) for p in recipe.source.metadata]
        source["exclude"] = exclusion_params(recipe.source.exclude)  # removal requests: their files' digests
        if source["exclude"] is None:
            source.pop("exclude")  # absent, as in work directories made before removal requests existed
        params = {"source": source, "filters": asdict(recipe.filters)}
        if not recipe.source.sample:
            # What the globs match now: a file added, removed or replaced moves every shard boundary.
            try:
                params["files"] = [[str(f), f.stat().st_size, pq.ParquetFile(f).metadata.num_rows]
                                   for f in source_files(recipe, Path("."))]
            except UserError:
                params["files"] = []  # reported when the stage runs
        return params

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        recipe, out = ctx.recipe, ctx.stage_dir(self.name)
        out.prepare()
        files = source_files(recipe, ctx.workdir)
        total_rows = count_rows(recipe, files)
        n_shards = math.ceil(total_rows / recipe.source.rows_per_shard)
        # Every shard's keys are needed to spot repeated URLs, so done shards are read too (not written).
        seen: set[str] = set()
        bar = progress(total_rows, self.name, "row", ctx.show_progress)
        kept = dropped = 0
        with bar:
            for index, chunk in enumerate(_chunks(recipe, files)):
                shard = shard_name(index)
                started = time.monotonic()
                rows, drops = self._split(chunk, seen, recipe.filters)
                rows, drops = split_removed(rows, drops, load_removals(recipe.source.exclude))
                if not out.is_done(shard):
                    with out.writer(shard, self._schema(chunk)) as writer:
                        writer.write(pa.Table.from_pylist(rows, schema=self._schema(chunk)))
                    out.finish(shard, drops, {"rows_in": chunk.num_rows, "rows_out": len(rows),
                                              "seconds": round(time.monotonic() - started, 3)})
                kept += len(rows)
                dropped += len(drops)
                bar.set_postfix(kept=kept, dropped=dropped)
                bar.update(chunk.num_rows)
        return {"shards_total": n_shards, "source_files": [str(f) for f in files], "rows_in": total_rows}

    @staticmethod
    def _schema(chunk: pa.Table) -> pa.Schema:
        extra = [chunk.schema.field(name) for name in chunk.column_names if name not in BASE_SCHEMA.names]
        return pa.schema(list(BASE_SCHEMA) + extra)

    @staticmethod
    def _split(chunk: pa.Table, seen: set[str], filters: MetadataFilters) -> tuple[list[dict], list[dict]]:
        rows, drops = [], []
        for row in chunk.to_pylist():
            raw = row.get("url")
            url = raw.strip() if isinstance(raw, str) else ""
            key = url_key(url)
            if not url:
                drops.append({"key": key, "url": None if raw is None else str(raw), "reason": "no_url",
                              "detail": "no URL" if raw is None else f"not a URL: {raw!r}"[:200]})
                continue
            rejected = filter_reason(row, filters)
            if rejected:
                drops.append({"key": key, "url": url, "reason": rejected[0], "detail": rejected[1]})
                continue
            # Only kept rows are remembered, so memory grows with what passes the filters.
            if key in seen:
                drops.append({"key": key, "url": url, "reason": "duplicate_url", "dup_of": key,
                              "detail": "the same URL was kept earlier in the metadata"})
                continue
            seen.add(key)
            row.update(key=key, url=url, width=_as_int(row.get("width")), height=_as_int(row.get("height")))
            for column in ("similarity", "punsafe", "pwatermark"):
                row[column] = _number(row.get(column))
            rows.append(row)
        return rows, drops
