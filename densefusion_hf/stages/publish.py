"""publish: write the dataset folder in the Hub's no-script layout, one config per dataset.

    DATASET/README.md                               card: YAML configs + dataset_info, a body for people
    DATASET/CONFIG/train-00000-of-0000N.parquet     image (datasets Image feature, bytes embedded) + columns
    DATASET/assets/CONFIG/build.json                the numbers the card is rendered from
    DATASET/assets/CONFIG/resolutions.png           charts the card shows
    DATASET/assets/CONFIG/categories.png

File names are those ``push_to_hub`` gives, so the folder can be pushed as it is (``df-hf publish``) and
``datasets.load_dataset(DATASET, CONFIG)`` loads it locally.  Two passes over the rows: the first measures
them (sizes for the shard plan, statistics for the card), the second writes them.  Parquet is written as
``datasets`` writes it for the Hub: content-defined chunking, a page index, image bytes stored plain.
Nothing depends on the clock, so the same inputs give byte-identical files and a re-push uploads nothing.
The folder is built beside its final place and swapped in whole, so it is never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_writer import get_parquet_column_options

from densefusion_hf.publish.build_info import (assets_dir, build_info, describe_files, file_sha256,
                                       write_build_info)
from densefusion_hf.publish.cards import render_card, write_charts
from densefusion_hf.console import progress
from densefusion_hf.publish.dataset_stats import PublishedStats
from densefusion_hf.errors import UserError
from densefusion_hf.recipe import Recipe
from densefusion_hf.runners.report import stage_summary
from densefusion_hf.publish.shard_plan import plan_row_groups, plan_shards
from densefusion_hf.stages.shards import temporary_name
from densefusion_hf.stages.base import BuildContext, Stage, image_batches

_DONE = "all"
_MB = 1_000_000


def dataset_folder(recipe: Recipe, workdir: Path) -> Path:
    return Path(recipe.publish.output) if recipe.publish.output else Path(workdir) / "dataset"


def published_features(schema: pa.Schema) -> datasets.Features:
    """The image column as the datasets ``Image`` feature first, then every other column as it is."""
    rest = pa.schema([f for f in schema if f.name != "image"])
    features = datasets.Features({"image": datasets.Image()})
    features.update(datasets.Features.from_arrow_schema(rest))
    return features


def _to_published(table: pa.Table, schema: pa.Schema) -> pa.Table:
    keys, formats = table.column("key").to_pylist(), table.column("image_format").to_pylist()
    paths = [f"{k}.{(f or 'bin').lower().replace('jpeg', 'jpg')}" for k, f in zip(keys, formats)]
    image = pa.StructArray.from_arrays([table.column("image").combine_chunks(), pa.array(paths, pa.string())],
                                       names=["bytes", "path"])
    columns = {name: (image if name == "image" else table.column(name)) for name in schema.names}
    return pa.table(columns, schema=schema)


def parquet_writer(path: Path, features: datasets.Features) -> pq.ParquetWriter:
    """A writer with the settings ``datasets`` uses for the Hub: content-defined chunking (so a changed
    row re-uploads only its pages), a page index for the viewer, image bytes stored plain."""
    schema = features.arrow_schema
    cdc = datasets.config.DEFAULT_CDC_OPTIONS
    writer = pq.ParquetWriter(path, schema, use_content_defined_chunking=cdc, write_page_index=True,
                              **get_parquet_column_options(features, schema))
    writer.add_key_value_metadata({"content_defined_chunking": json.dumps(cdc)})
    return writer


def _check_replaceable(folder: Path, config: str) -> None:
    """The folder is replaced whole: refuse when it holds anything publish did not write."""
    if not folder.exists():
        return
    ours = {"README.md", "assets", config}
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours)
    if foreign:
        raise UserError(f"publish.output {folder} already holds files publish did not write "
                        f"({', '.join(foreign[:5])}); it replaces the whole folder. Point publish.output at a "
                        f"new or empty folder, or remove those files.")


def _row_bytes(table: pa.Table) -> list[int]:
    """What each row adds to a file: its image plus an equal share of the other columns."""
    images = pc.binary_length(table.column("image")).fill_null(0).to_pylist()
    rest = round((table.nbytes - table.column("image").nbytes) / max(table.num_rows, 1))
    return [size + rest for size in images]


_READ_BATCH = 256  # rows (with their images) read from the work directory at a time


class _RowStream:
    """The upstream rows with their images, in shard order, handed out ``count`` at a time."""

    def __init__(self, ctx: BuildContext, source, shards: list[str]):
        self._tables = (batch for shard in shards
                        for batch in image_batches(ctx, source.read(shard), shard, _READ_BATCH))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def take(self, count: int) -> pa.Table:
        while self._pending_rows < count:
            table = next(self._tables)
            self._pending.append(table)
            self._pending_rows += table.num_rows
        table = pa.concat_tables(self._pending)
        head, rest = table.slice(0, count), table.slice(count)
        self._pending, self._pending_rows = [rest], rest.num_rows
        return head


class Publish(Stage):
    name = "publish"

    def params(self, recipe: Recipe) -> dict:
        settings = recipe.publish
        return {"output": str(dataset_folder(recipe, Path("WORKDIR"))), "config": recipe.config_name,
                "max_shard_mb": settings.max_shard_mb, "max_row_group_mb": settings.max_row_group_mb,
                "min_shards": settings.min_shards,
                "card": {"name": recipe.name, "version": recipe.version, "pretty_name": recipe.pretty_name,
                         "description": recipe.description, "license": recipe.license,
                         "changelog": dict(recipe.changelog)}}

    @staticmethod
    def _upstream_schema(source, shards) -> pa.Schema:
        from densefusion_hf.stages.fetch import Fetch
        from densefusion_hf.stages.ingest import BASE_SCHEMA

        if not shards:
            return Fetch.output_schema(BASE_SCHEMA)
        schema = pq.read_schema(source.shard_path(shards[0]))
        return schema if "image" in schema.names else schema.append(pa.field("image", pa.binary()))

    def has_outputs(self, ctx: BuildContext) -> bool:
        return ctx.stage_dir(self.name).is_done(_DONE)

    @staticmethod
    def _release(ctx: BuildContext) -> dict | None:
        """A release build's per-zip-shard table for the card (what fetch read, repaired and lost)."""
        if ctx.recipe.source.release is None:
            return None
        from densefusion_hf.release.report import release_summary

        return release_summary(ctx.recipe, ctx.stage_dir("fetch").all_stats())

    @staticmethod
    def _measure(ctx: BuildContext, source, shards: list[str], total: int):
        """Pass 1: every row's size in a file, the card's statistics, the prompt versions met."""
        sizes, stats, prompt_versions = [], PublishedStats(bool(ctx.recipe.select.categories)), set()
        with progress(total, "publish: measure", "row", ctx.show_progress) as bar:
            for table in (b for shard in shards for b in image_batches(ctx, source.read(shard), shard, _READ_BATCH)):
                sizes += _row_bytes(table)
                stats.add(table)
                if "prompt_version" in table.column_names:
                    prompt_versions.update(v for v in table.column("prompt_version").to_pylist() if v)
                bar.update(table.num_rows)
        return sizes, stats.result(), sorted(prompt_versions)

    @staticmethod
    def _write(ctx: BuildContext, rows: _RowStream, folder: Path, features: datasets.Features,
               sizes: list[int], ranges: list[tuple[int, int]]) -> tuple[list[Path], list[str], int]:
        """Pass 2: the Parquet files, row group by row group; returns their paths, their SHA-256 and the
        Arrow bytes.  Each file is hashed on another thread while the next one is written."""
        settings, schema = ctx.recipe.publish, features.arrow_schema
        paths, digests, num_bytes = [], [], 0
        with progress(len(sizes), "publish: write", "row", ctx.show_progress) as bar, \
                ThreadPoolExecutor(1) as hasher:
            for index, (start, stop) in enumerate(ranges):
                path = folder / f"train-{index:05d}-of-{len(ranges):05d}.parquet"
                with parquet_writer(path, features) as writer:
                    if start == stop:  # an empty dataset still gets one file with the schema
                        writer.write_table(schema.empty_table())
                    for count in plan_row_groups(sizes[start:stop], round(settings.max_row_group_mb * _MB)):
                        part = _to_published(rows.take(count), schema)
                        writer.write_table(part, row_group_size=count)
                        num_bytes += part.nbytes
                        bar.update(count)
                paths.append(path)
                digests.append(hasher.submit(file_sha256, path))
            return paths, [d.result() for d in digests], num_bytes

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        recipe, bookkeeping = ctx.recipe, ctx.stage_dir(self.name)
        final, config = dataset_folder(recipe, ctx.workdir), recipe.config_name
        if bookkeeping.is_done(_DONE) and (final / "README.md").exists():
            return bookkeeping.stats(_DONE)
        bookkeeping.prepare()
        started = time.monotonic()
        source = ctx.stage_dir(upstream)
        shards = source.done_shards()
        total = sum(source.stats(s)["rows_out"] for s in shards)

        _check_replaceable(final, config)
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".{final.name}*.tmp-*"):  # from a publish that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        staging = temporary_name(final)
        (staging / config).mkdir(parents=True)

        sizes, stats, prompt_versions = self._measure(ctx, source, shards, total)
        ranges = plan_shards(sizes, round(recipe.publish.max_shard_mb * _MB), recipe.publish.min_shards)
        features = published_features(self._upstream_schema(source, shards))
        paths, digests, num_bytes = self._write(ctx, _RowStream(ctx, source, shards), staging / config,
                                                features, sizes, ranges)

        selection = ctx.stage_dir("select").path / "summary.json"
        stages = [stage_summary(ctx.workdir, s) for s in recipe.stages if s != self.name]
        info = build_info(recipe, features=features.to_dict(), stages=stages,
                          selection=json.loads(selection.read_text()) if selection.exists() else None,
                          stats=stats, files=describe_files(staging, paths, digests), num_bytes=num_bytes,
                          prompt_versions=prompt_versions, release=self._release(ctx))
        write_build_info(staging, info)
        write_charts(assets_dir(staging, config), stats)
        render_card(staging, [info], load_path=str(final))
        if final.exists():
            old = temporary_name(final.with_name(final.name + ".old"))
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        return bookkeeping.finish(_DONE, [], {
            "rows_in": total, "rows_out": total, "files": len(paths), "dataset": str(final), "config": config,
            "seconds": round(time.monotonic() - started, 3),
        })
