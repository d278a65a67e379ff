"""ingest: read the LAION-style metadata, give every row its key, apply the metadata filters.

A release source (``source.release``) is read the same way, from the Parquet file ``release.rows`` makes of
its JSON Lines (url, caption, image_id, image_path and any other field it has).

Nothing is downloaded here: rows are cut into shards of ``source.rows_per_shard`` in source order,
with the recipe's column names mapped to ours (key, url, text, width, height, similarity, punsafe,
pwatermark, and ``keep_columns``).  A row whose URL is empty, with a value that cannot be read
(``metadata_columns``), that a filter rejects, or whose URL was already kept, is recorded in the shard's
dropped rows with its reason and the value that decided it.

Repeated URLs are found in memory that does not grow with the metadata (LAION-2B has 2.3B rows), in
three passes that each spread over the executor:

    ingest/measure/shard-N.parquet     pass 1: shard N's rows that pass the filters (and its filter drops),
                                       plus ingest/keys/shard-N.parquet, their keys sorted
    ingest/keys/dups-P.parquet         pass 2: per key range P, the rows whose key was kept earlier
                                       (earlier = lower shard, then lower row: source order, as before)
    ingest/shard-N.parquet             pass 3: shard N without its repeated URLs
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from densefusion_hf.console import counted, progress
from densefusion_hf.errors import UserError
from densefusion_hf.keys import url_key
from densefusion_hf.recipe import MetadataFilters, Recipe
from densefusion_hf.sample.make import SAMPLE_VERSION, write_sample
from densefusion_hf.stages.metadata_columns import PROBLEM, typed_columns
from densefusion_hf.stages.removal import exclusion_params, load_removals, split_removed
from densefusion_hf.stages.shards import DROPPED_SCHEMA, shard_name, temporary_name
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
    if recipe.source.release is not None:
        from densefusion_hf.release.rows import release_metadata

        return [release_metadata(recipe, workdir)]
    files: list[Path] = []
    for pattern in recipe.source.metadata:
        matches = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
        if not matches:
            raise UserError(f"{recipe.path}: source.metadata: {pattern} matches no file. Check the path "
                            f"(relative paths start at the recipe's folder, {recipe.path.parent}).")
        files.extend(m for m in matches if m not in files)
    return files


def open_metadata(path: Path) -> pq.ParquetFile:
    """A metadata file opened for reading, or a UserError naming it."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:  # not Parquet, truncated, unreadable
        raise UserError(f"{path}: not a readable Parquet metadata file ({exc}).") from None


def _check_columns(recipe: Recipe, path: Path, schema: pa.Schema) -> dict[str, str]:
    """Map our names to the file's columns, or say which recipe field names a missing column."""
    if recipe.source.release is not None:
        return {name: name for name in schema.names}  # written by release.rows in our names already
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
    total = sum(open_metadata(f).metadata.num_rows for f in files)
    return min(total, recipe.source.limit) if recipe.source.limit else total


#: Keys per key range in the repeated-URL pass: memory of that pass is about 100 bytes a key.
KEYS_PER_PARTITION = 8_000_000
KEY_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.int64())])
DUP_SCHEMA = pa.schema([("shard", pa.int64()), ("row", pa.int64()), ("key", pa.string())])


def shard_rows(recipe: Recipe, files: list[Path], counts: list[int], index: int) -> pa.Table:
    """Rows ``[index * rows_per_shard, ...)`` of the metadata (the files in order, cut at ``source.limit``),
    reading only the row groups that hold them."""
    size = recipe.source.rows_per_shard
    start = index * size
    stop = min(start + size, sum(counts), recipe.source.limit or math.inf)
    tables, offset = [], 0
    for path, count in zip(files, counts):
        lo, hi = max(start, offset) - offset, min(stop, offset + count) - offset
        offset += count
        if lo >= hi:
            continue
        parquet = open_metadata(path)
        mapping = _check_columns(recipe, path, parquet.schema_arrow)
        groups, first, seen = [], None, 0
        for g in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if seen + n > lo and seen < hi:
                groups.append(g)
                first = seen if first is None else first
            seen += n
        try:
            table = parquet.read_row_groups(groups, columns=list(set(mapping.values()))).slice(lo - first, hi - lo)
        except (OSError, pa.ArrowException) as exc:  # a damaged data page
            raise UserError(f"{path}: its rows {lo} to {hi} cannot be read ({exc}).") from None
        table = pa.table({ours: table[theirs] for ours, theirs in mapping.items()})
        tables.append(typed_columns(table, mapping, path))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # only kept columns can still differ in type
        raise UserError(f"source.keep_columns: the metadata files {', '.join(str(f) for f in files)} hold a "
                        f"kept column in types that do not combine ({exc}).") from None


def _chunks(recipe: Recipe, files: list[Path]) -> Iterator[pa.Table]:
    """Tables of exactly rows_per_shard rows (the last may be shorter), in source order."""
    size, limit = recipe.source.rows_per_shard, recipe.source.limit
    pending: list[pa.Table] = []
    pending_rows = emitted = 0
    for path in files:
        parquet = open_metadata(path)
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


def _key_range(partition: int, partitions: int) -> tuple[str, str | None]:
    """Keys (hex) from ``lo`` up to ``hi`` (None: to the end) of one of ``partitions`` equal ranges."""
    bound = lambda p: format(p * 65_536 // partitions, "04x")  # noqa: E731 - by the first 16 bits
    return bound(partition), (bound(partition + 1) if partition + 1 < partitions else None)


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
        if source["release"] is None:
            source.pop("release")  # absent, as in work directories made before release sources existed
        source["metadata"] = [str(p) for p in recipe.source.metadata]
        source["exclude"] = exclusion_params(recipe.source.exclude)  # removal requests: their files' digests
        if source["exclude"] is None:
            source.pop("exclude")  # absent, as in work directories made before removal requests existed
        params = {"source": source, "filters": asdict(recipe.filters)}
        if not recipe.source.sample and recipe.source.release is None:
            # What the globs match now: a file added, removed or replaced moves every shard boundary.
            try:
                params["files"] = [[str(f), f.stat().st_size, open_metadata(f).metadata.num_rows]
                                   for f in source_files(recipe, Path("."))]
            except UserError:
                params["files"] = []  # reported when the stage runs
        return params

    def measures(self, ctx: BuildContext):
        return ctx.stage_dir(f"{self.name}/measure"), ctx.workdir / self.name / "keys"

    def has_outputs(self, ctx: BuildContext) -> bool:
        return super().has_outputs(ctx) or bool(self.measures(ctx)[0].done_shards())

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        recipe, out = ctx.recipe, ctx.stage_dir(self.name)
        measure, keys_dir = self.measures(ctx)
        out.prepare()
        measure.prepare()
        keys_dir.mkdir(parents=True, exist_ok=True)
        files = source_files(recipe, ctx.workdir)
        counts = [open_metadata(f).metadata.num_rows for f in files]
        total_rows = count_rows(recipe, files)
        shards = [shard_name(i) for i in range(math.ceil(total_rows / recipe.source.rows_per_shard))]
        partitions = max(1, math.ceil(total_rows / KEYS_PER_PARTITION))
        dups = [keys_dir / f"dups-{p:05d}.parquet" for p in range(partitions)]
        kept = dropped = 0
        if not all(map(out.is_done, shards)):
            # Every shard's keys decide which rows repeat an earlier URL, so a shard redone after the
            # passes' files were removed (a damaged one) has them all measured again.
            todo = [s for s in shards if not measure.is_done(s)]
            for _ in counted(ctx.executor.map(ctx, self, "filter_shard", todo, (files, counts), heavy=True),
                             len(shards), "ingest: read", "shard", ctx.show_progress, initial=len(shards) - len(todo)):
                pass
            todo = [p for p in range(partitions) if not dups[p].exists()]
            for _ in counted(ctx.executor.map(ctx, self, "find_repeats", todo, (shards, partitions), heavy=False),
                             partitions, "ingest: repeated URLs", "key range", ctx.show_progress,
                             initial=partitions - len(todo)):
                pass
        with progress(len(shards), self.name, "shard", ctx.show_progress,
                      initial=sum(map(out.is_done, shards))) as bar:
            todo = [s for s in shards if not out.is_done(s)]
            for _, stats in ctx.executor.map(ctx, self, "write_shard", todo, (partitions,), heavy=False):
                kept += stats["rows_out"]
                dropped += stats["rows_dropped"]
                bar.set_postfix(kept=kept, dropped=dropped)
                bar.update(1)
        measure.clear()  # the passes' files are only needed until every shard is written
        shutil.rmtree(keys_dir, ignore_errors=True)
        return {"shards_total": len(shards), "source_files": [str(f) for f in files], "rows_in": total_rows}

    def filter_shard(self, ctx: BuildContext, shard: str, files: list[Path], counts: list[int]) -> dict:
        """Pass 1: one shard's rows through the filters; its kept keys, sorted, for the repeated-URL pass."""
        started = time.monotonic()
        measure, keys_dir = self.measures(ctx)
        chunk = shard_rows(ctx.recipe, files, counts, int(shard))
        rows, drops = self._split(chunk, ctx.recipe.filters)
        rows, drops = split_removed(rows, drops, load_removals(ctx.recipe.source.exclude))
        schema = self._schema(chunk).append(pa.field("position", pa.int64()))
        table = pa.Table.from_pylist(rows, schema=schema)
        keys = pa.table({"key": table.column("key"), "row": pa.array(range(table.num_rows), pa.int64())})
        keys = keys.sort_by("key")
        path = keys_dir / f"shard-{shard}.parquet"
        tmp = temporary_name(path)
        pq.write_table(keys, tmp, row_group_size=65_536)
        os.replace(tmp, path)
        with measure.writer(shard, schema) as writer:
            writer.write(table)
        # The filter drops keep their positions, so pass 3 can put the repeated URLs among them in order.
        path = measure.path / f"shard-{shard}.filtered.parquet"
        tmp = temporary_name(path)
        pq.write_table(pa.Table.from_pylist(drops, schema=DROPPED_SCHEMA.append(pa.field("position", pa.int64()))),
                       tmp)
        os.replace(tmp, path)
        return measure.finish(shard, [], {"rows_in": chunk.num_rows, "rows_out": len(rows),
                                             "seconds": round(time.monotonic() - started, 3)})

    def find_repeats(self, ctx: BuildContext, partition: int, shards: list[str], partitions: int) -> int:
        """Pass 2: within one key range, every (shard, row) whose key a lower (shard, row) already has."""
        _, keys_dir = self.measures(ctx)
        lo, hi = _key_range(partition, partitions)
        parts = []
        for index, shard in enumerate(shards):
            filters = [("key", ">=", lo)] + ([("key", "<", hi)] if hi else [])
            found = pq.read_table(keys_dir / f"shard-{shard}.parquet", filters=filters)
            parts.append(found.append_column("shard", pa.array([index] * found.num_rows, pa.int64())))
        table = pa.concat_tables(parts).sort_by([("key", "ascending"), ("shard", "ascending"),
                                                 ("row", "ascending")]) if parts else None
        repeats = DUP_SCHEMA.empty_table()
        if table is not None and table.num_rows > 1:
            keys = table.column("key")
            repeated = pa.concat_arrays([pa.array([False]), pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1))
                                         .combine_chunks()])
            repeats = table.filter(repeated).select(DUP_SCHEMA.names).sort_by([("shard", "ascending"),
                                                                                ("row", "ascending")])
        path = keys_dir / f"dups-{partition:05d}.parquet"
        tmp = temporary_name(path)
        pq.write_table(repeats, tmp, row_group_size=65_536)
        os.replace(tmp, path)
        return repeats.num_rows

    def write_shard(self, ctx: BuildContext, shard: str, partitions: int) -> dict:
        """Pass 3: the shard without its repeated URLs; drops in source order, as one pass would give."""
        started = time.monotonic()
        measure, keys_dir = self.measures(ctx)
        out = ctx.stage_dir(self.name)
        rows = measure.read(shard)
        repeated = set()
        for p in range(partitions):
            found = pq.read_table(keys_dir / f"dups-{p:05d}.parquet", filters=[("shard", "==", int(shard))])
            repeated.update(found.column("row").to_pylist())
        positions = rows.column("position").to_pylist()
        drops = pq.read_table(measure.path / f"shard-{shard}.filtered.parquet").to_pylist()
        drops = [(d.pop("position"), d) for d in drops]
        keep = [i not in repeated for i in range(rows.num_rows)]
        for i in sorted(repeated):
            key = rows.column("key")[i].as_py()
            drops.append((positions[i], {"key": key, "url": rows.column("url")[i].as_py(), "reason": "duplicate_url",
                                         "dup_of": key, "detail": "the same URL was kept earlier in the metadata"}))
        drops = [d for _, d in sorted(drops, key=lambda item: item[0])]
        kept = rows.filter(pa.array(keep, pa.bool_())).drop_columns(["position"])
        with out.writer(shard, kept.schema) as writer:
            writer.write(kept)
        stats = measure.stats(shard)
        return out.finish(shard, drops, {"rows_in": stats["rows_in"], "rows_out": kept.num_rows,
                                         "seconds": round(stats["seconds"] + time.monotonic() - started, 3)})

    @staticmethod
    def _schema(chunk: pa.Table) -> pa.Schema:
        extra = [chunk.schema.field(name) for name in chunk.column_names
                 if name not in BASE_SCHEMA.names and name != PROBLEM]
        return pa.schema(list(BASE_SCHEMA) + extra)

    @staticmethod
    def _split(chunk: pa.Table, filters: MetadataFilters) -> tuple[list[dict], list[dict]]:
        """Rows that pass the filters and the drops of the others, each with its ``position`` in the chunk."""
        rows, drops = [], []
        for position, row in enumerate(chunk.to_pylist()):
            raw, problem = row.get("url"), row.pop(PROBLEM, None)
            url = raw.strip() if isinstance(raw, str) else ""
            key = url_key(url)
            if problem:  # a value no reader could make sense of, named with its column and file
                drops.append({"key": key, "url": url or None, "reason": "bad_metadata", "detail": problem[:300],
                              "position": position})
                continue
            if not url:
                drops.append({"key": key, "url": None if raw is None else str(raw), "reason": "no_url",
                              "detail": "no URL" if raw is None else f"not a URL: {raw!r}"[:200],
                              "position": position})
                continue
            rejected = filter_reason(row, filters)
            if rejected:
                drops.append({"key": key, "url": url, "reason": rejected[0], "detail": rejected[1],
                              "position": position})
                continue
            row.update(key=key, url=url, width=_as_int(row.get("width")), height=_as_int(row.get("height")),
                       position=position)
            for column in ("similarity", "punsafe", "pwatermark"):
                row[column] = _number(row.get(column))
            rows.append(row)
        return rows, drops
