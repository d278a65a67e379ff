"""publish: write the dataset folder in the Hub's no-script layout.

    DATASET/README.md                          card with YAML configs and dataset_info
    DATASET/data/train-00000-of-0000N.parquet  image (datasets Image feature, bytes embedded) + columns

The folder is built beside its final place and swapped in whole, so it is never half-written.
``datasets.load_dataset(DATASET)`` loads it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.cards import render_card
from densefusion_hf.console import progress
from densefusion_hf.errors import UserError
from densefusion_hf.recipe import Recipe
from densefusion_hf.report import stage_summary
from densefusion_hf.shards import temporary_name
from densefusion_hf.stages.base import BuildContext, Stage, with_images

# Image datasets are read in small row groups: datasets uses 100 rows for images, so do we.
ROW_GROUP_ROWS = 100
_DONE = "all"


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


# What a dataset folder written by publish holds; anything else there is not ours to delete.
_OURS = {"README.md", "data"}


def _check_replaceable(folder: Path) -> None:
    if not folder.exists():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OURS and p.suffix != ".png")
    if foreign:
        raise UserError(f"publish.output {folder} already holds files publish did not write "
                        f"({', '.join(foreign[:5])}); it replaces the whole folder. Point publish.output at a "
                        f"new or empty folder, or remove those files.")


def _row_chunks(ctx, source, shards):
    """The upstream rows with their images in shard order, ROW_GROUP_ROWS at a time."""
    for shard in shards:
        table = with_images(ctx, source.read(shard), shard)
        for start in range(0, table.num_rows, ROW_GROUP_ROWS):
            yield table.slice(start, ROW_GROUP_ROWS)


class Publish(Stage):
    name = "publish"

    def params(self, recipe: Recipe) -> dict:
        return {"output": str(dataset_folder(recipe, Path("WORKDIR"))), "rows_per_file": recipe.publish.rows_per_file,
                "card": {"name": recipe.name, "version": recipe.version, "pretty_name": recipe.pretty_name,
                         "description": recipe.description, "license": recipe.license}}

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

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        recipe, bookkeeping = ctx.recipe, ctx.stage_dir(self.name)
        final = dataset_folder(recipe, ctx.workdir)
        if bookkeeping.is_done(_DONE) and (final / "README.md").exists():
            return bookkeeping.stats(_DONE)
        bookkeeping.prepare()
        started = time.monotonic()
        source = ctx.stage_dir(upstream)
        shards = source.done_shards()
        total = sum(source.stats(s)["rows_out"] for s in shards)
        n_files = max(1, math.ceil(total / recipe.publish.rows_per_file))

        _check_replaceable(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".{final.name}*.tmp-*"):  # from a publish that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        staging = temporary_name(final)
        (staging / "data").mkdir(parents=True)

        features = published_features(self._upstream_schema(source, shards))
        schema = features.arrow_schema
        num_bytes = 0
        file_index, in_file = 0, 0

        def open_file(index: int) -> pq.ParquetWriter:
            return pq.ParquetWriter(staging / "data" / f"train-{index:05d}-of-{n_files:05d}.parquet", schema)

        with progress(total, self.name, "row", ctx.show_progress) as bar:
            writer = open_file(file_index)
            for chunk in _row_chunks(ctx, source, shards):
                while chunk.num_rows:
                    if in_file == recipe.publish.rows_per_file:
                        writer.close()
                        file_index, in_file = file_index + 1, 0
                        writer = open_file(file_index)
                    part = chunk.slice(0, recipe.publish.rows_per_file - in_file)
                    chunk = chunk.slice(part.num_rows)
                    part = _to_published(part, schema)
                    writer.write_table(part)
                    num_bytes += part.nbytes
                    in_file += part.num_rows
                    bar.update(part.num_rows)
            writer.close()

        summaries = [stage_summary(ctx.workdir, s) for s in recipe.stages if s != self.name]
        selection = ctx.stage_dir("select").path / "summary.json"
        render_card(staging, recipe=recipe, features=features, num_examples=total, num_bytes=num_bytes,
                    stage_summaries=summaries, load_path=str(final),
                    selection=json.loads(selection.read_text()) if selection.exists() else None)
        if final.exists():
            old = temporary_name(final.with_name(final.name + ".old"))
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        return bookkeeping.finish(_DONE, [], {
            "rows_in": total, "rows_out": total, "files": n_files, "dataset": str(final),
            "seconds": round(time.monotonic() - started, 3),
        })
