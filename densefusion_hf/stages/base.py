"""What every stage is: a name, the settings that decide its output, and a ``run``.

A ``ShardStage`` is a plain function of (one input shard, settings) -> one output shard, so any runner
(the local one, or the Ray one) can call ``run_shard`` for shards in any order: the stage hands its shards to
``ctx.executor`` (see ``runners.executor``), which decides where each call runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from densefusion_hf.console import progress
from densefusion_hf.recipe import Recipe
from densefusion_hf.runners.executor import SerialExecutor
from densefusion_hf.stages.shards import StageDir, temporary_name


@dataclass
class BuildContext:
    recipe: Recipe
    workdir: Path
    show_progress: bool = True
    executor: object = field(default_factory=SerialExecutor, repr=False, compare=False)

    def __getstate__(self):
        # Workers get the recipe and the work directory; the executor stays with the driver.
        state = dict(self.__dict__)
        state["executor"] = None
        return state

    def stage_dir(self, name: str) -> StageDir:
        return StageDir(self.workdir, name)


class Stage:
    name: str = ""

    def params(self, recipe: Recipe) -> dict:
        """The settings that decide this stage's output (its fingerprint is made of them)."""
        raise NotImplementedError

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        """Do the stage's work, skipping what is done; return a summary for the manifest."""
        raise NotImplementedError

    def has_outputs(self, ctx: BuildContext) -> bool:
        return bool(ctx.stage_dir(self.name).done_shards())

    def clear(self, ctx: BuildContext) -> None:
        ctx.stage_dir(self.name).clear()


class ShardStage(Stage):
    """One output shard per input shard of the upstream stage."""

    #: Its session is costly to enter (a model loaded, img2dataset's worker processes started): on a cluster
    #: the stage runs in actors that enter it once each and take shard after shard (else in tasks, one
    #: session per shard).
    session_per_worker = False

    def session(self, ctx: BuildContext):
        """Resources held while shards run (a server, a loaded model); entered once per run, or once per
        worker on a cluster."""
        return contextlib.nullcontext()

    def run_shard(self, ctx: BuildContext, shard: str, source: StageDir, out: StageDir) -> dict:
        """Process one shard and commit it with ``out.finish``; return its stats."""
        raise NotImplementedError

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        source, out = ctx.stage_dir(upstream), ctx.stage_dir(self.name)
        out.prepare()
        shards = source.done_shards()
        todo = [s for s in shards if not out.is_done(s)]
        kept = dropped = 0
        bar = progress(len(shards), self.name, "shard", ctx.show_progress, initial=len(shards) - len(todo))
        with bar:
            for _, stats in ctx.executor.map(ctx, self, "run_shard", todo, (source, out), session=True,
                                             heavy=self.heavy_apply):
                kept += stats["rows_out"]
                dropped += stats["rows_dropped"]
                bar.set_postfix(kept=kept, dropped=dropped, s_per_shard=f"{stats.get('seconds', 0):.1f}")
                bar.update(1)
        return {"shards_total": len(shards)}

    #: Whether ``run_shard`` is the stage's main work (its ``runner`` settings apply), not a light apply step.
    heavy_apply = True


def small_columns(path) -> list[str]:
    """Every column of a shard but the image bytes."""
    return [name for name in pq.read_schema(path).names if name != "image"]


def with_images(ctx: BuildContext, rows: pa.Table, shard: str) -> pa.Table:
    """``rows`` (a shard of a stage after fetch) with the ``image`` bytes from the fetch shard of the same id.

    Stages after fetch keep only the small columns; the bytes stay in fetch's shards and are joined by key
    when a stage needs pixels, so no stage copies the images again.
    """
    if "image" in rows.column_names:
        return rows
    fetched = ctx.stage_dir("fetch").read(shard, columns=["key", "image"])
    position = {key: i for i, key in enumerate(fetched.column("key").to_pylist())}
    order = [position[key] for key in rows.column("key").to_pylist()]
    return rows.append_column("image", fetched.column("image").take(pa.array(order, pa.int64())))


def image_batches(ctx: BuildContext, rows: pa.Table, shard: str, batch_rows: int):
    """``rows`` with their ``image`` bytes, about ``batch_rows`` at a time, read from fetch's shard as it goes:
    a stage holds one batch of images, never a whole shard's.  Later stages only drop rows, so ``rows`` are
    in the order of fetch's shard."""
    if "image" in rows.column_names:
        for start in range(0, rows.num_rows, batch_rows):
            yield rows.slice(start, batch_rows)
        return
    wanted, done = rows.column("key").to_pylist(), 0
    path = ctx.stage_dir("fetch").shard_path(shard)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["key", "image"]):
        take = []
        for i, key in enumerate(batch.column(0).to_pylist()):
            if done + len(take) < len(wanted) and key == wanted[done + len(take)]:
                take.append(i)
        if take:
            images = batch.column(1).take(pa.array(take, pa.int64()))
            yield rows.slice(done, len(take)).append_column("image", images)
            done += len(take)
    if done != len(wanted):
        raise RuntimeError(f"{path}: {len(wanted) - done} rows of this shard are not in fetch's shard in order; "
                           f"the work directory is damaged: rebuild from fetch with --fresh --only fetch,...")


def image_chunks(ctx: BuildContext, rows: pa.Table, shard: str, size: int):
    """``rows`` with their images in consecutive tables of exactly ``size`` rows (the last may be shorter), read
    a batch at a time like ``image_batches``."""
    pending, count = [], 0
    for batch in image_batches(ctx, rows, shard, size):
        pending.append(batch)
        count += batch.num_rows
        while count >= size:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, size)
            pending, count = [joined.slice(size)], count - size
    if count:
        yield pa.concat_tables(pending)


def decode_rows(rows: pa.Table) -> tuple[list, list[bool], list[dict]]:
    """(RGB images of the rows that decode, which rows decoded, drop records of the others) for rows that
    carry ``image``: what a stage that feeds pixels to a model does first."""
    from densefusion_hf.images import load_rgb

    images, decoded, drops = [], [], []
    for key, url, blob in zip(rows.column("key").to_pylist(), rows.column("url").to_pylist(),
                              rows.column("image").to_pylist()):
        try:
            images.append(load_rgb(blob))
            decoded.append(True)
        except Exception as exc:  # whatever the decoder raises, the row is recorded, not fatal
            decoded.append(False)
            drops.append({"key": key, "url": url, "reason": "undecodable", "detail": f"{type(exc).__name__}: {exc}"})
    return images, decoded, drops


def decision_table(keys, reasons, details, dup_of=None, **columns: pa.Array) -> pa.Table:
    """A GlobalStage decision: per key, why it is dropped (None keeps it), and the columns to add.  Each of
    keys, reasons, details and dup_of is a list or an Arrow string column."""

    def strings(values):
        return values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, pa.string())

    return pa.table({
        "key": strings(keys), "reason": strings(reasons), "detail": strings(details),
        "dup_of": strings(dup_of) if dup_of is not None else pa.nulls(len(keys), pa.string()),
        **columns,
    })


_SHARD_GROUPS = b"densefusion.shard_row_groups"


def _in_shard_order(decision: pa.Table, source: StageDir, shards: list[str]) -> list[int] | None:
    """Each shard's row count when ``decision`` already lists the shards' keys in their order (what the
    decisions do), compared one shard at a time; None otherwise."""
    sizes, offset, decided = [], 0, decision.column("key")
    for shard in shards:
        keys = source.read(shard, columns=["key"]).column("key")
        if offset + len(keys) > len(decision) or not decided.slice(offset, len(keys)).equals(keys):
            return None
        sizes.append(len(keys))
        offset += len(keys)
    return sizes if offset == len(decision) else None


def write_by_shard(decision: pa.Table, source: StageDir, shards: list[str], path) -> None:
    """``decision`` saved in the shards' row order, one row group per shard, the shard -> row group map in the
    file's metadata."""
    sizes = _in_shard_order(decision, source, shards)
    if sizes is None:  # reorder: an index over every key, so only when the decision is not in order already
        keys = [source.read(s, columns=["key"]).column("key").combine_chunks() for s in shards]
        wanted = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        positions = pc.index_in(wanted, value_set=decision.column("key"))
        if positions.null_count or len(decision) != len(wanted):
            raise RuntimeError(f"the decision of {path.parent.name} does not cover exactly the rows of its input "
                               f"({len(decision)} decided, {len(wanted)} rows); this is a bug")
        decision, sizes = decision.take(positions), [len(k) for k in keys]
    groups = {shard: group for group, shard in enumerate(s for s, size in zip(shards, sizes) if size)}
    metadata = dict(decision.schema.metadata or {})
    metadata[_SHARD_GROUPS] = json.dumps(groups).encode()
    schema = decision.schema.with_metadata(metadata)
    offset = 0
    with pq.ParquetWriter(path, schema) as writer:
        for size in sizes:
            if size:
                writer.write_table(decision.slice(offset, size).replace_schema_metadata(metadata),
                                   row_group_size=size)
            offset += size


class GlobalStage(ShardStage):
    """A decision over all rows at once (duplicate groups, clusters, quotas), applied shard by shard.

    ``decide`` sees only small columns and returns one row per input key: ``reason`` (null keeps the
    row), ``detail``, ``dup_of``, and any columns to add.  It is saved in ``decision.parquet`` before any
    shard is written, so an interrupted run applies the same decision when it resumes.
    """

    heavy_apply = False  # applying a saved decision is light: plain tasks on a cluster

    def measure(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> None:
        """Per-shard measurements the decision needs (hashes, assignments), saved before ``decide``; run
        through ``ctx.executor`` so they spread over a cluster.  Nothing by default."""

    def decide(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> pa.Table:
        raise NotImplementedError

    def decision_path(self, ctx: BuildContext):
        return ctx.stage_dir(self.name).path / "decision.parquet"

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        source, out = ctx.stage_dir(upstream), ctx.stage_dir(self.name)
        out.prepare()
        shards = source.done_shards()
        path = self.decision_path(ctx)
        if not path.exists() and not all(out.is_done(s) for s in shards):
            self.measure(ctx, source, shards)
            decision = self.decide(ctx, source, shards)
            tmp = temporary_name(path)
            write_by_shard(decision, source, shards, tmp)
            os.replace(tmp, path)
        self._decision = None
        return super().run(ctx, upstream)

    def _decided(self, ctx: BuildContext, shard: str) -> tuple[pa.Table, dict]:
        """The saved decision for ``shard`` and its key positions: one row group, so that a worker applying
        it holds one shard's decision, not every row's."""
        with pq.ParquetFile(self.decision_path(ctx)) as decision_file:
            metadata = decision_file.schema_arrow.metadata or {}
            if _SHARD_GROUPS in metadata:
                group = json.loads(metadata[_SHARD_GROUPS]).get(shard)
                table = (decision_file.read_row_group(group) if group is not None
                         else decision_file.schema_arrow.empty_table())
                return table, {k: i for i, k in enumerate(table.column("key").to_pylist())}
            # A decision saved whole (older work directories): read once per process.
            if getattr(self, "_decision", None) is None:
                self._decision = decision_file.read()
                self._position = {k: i for i, k in enumerate(self._decision.column("key").to_pylist())}
        return self._decision, self._position

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_decision", None)
        state.pop("_position", None)
        return state

    def has_outputs(self, ctx: BuildContext) -> bool:
        # A decision or measurements made with other settings must not be reused either.
        return (super().has_outputs(ctx) or self.decision_path(ctx).exists()
                or bool(ctx.stage_dir(f"{self.name}/measure").done_shards()))

    def run_shard(self, ctx: BuildContext, shard: str, source: StageDir, out: StageDir) -> dict:
        started = time.monotonic()
        rows = source.read(shard, columns=small_columns(source.shard_path(shard)))
        decision, position = self._decided(ctx, shard)
        decided = decision.take(pa.array([position[k] for k in rows.column("key").to_pylist()], pa.int64()))
        added = [n for n in decided.column_names if n not in ("key", "reason", "detail", "dup_of")]
        for name in added:
            column = decided.column(name)
            if name in rows.column_names:
                rows = rows.set_column(rows.column_names.index(name), name, column)
            else:
                rows = rows.append_column(name, column)
        reasons = decided.column("reason")
        keep = pc.is_null(reasons)
        drops = decided.filter(pc.invert(keep)).select(["key", "reason", "detail", "dup_of"]).to_pylist()
        urls = dict(zip(rows.column("key").to_pylist(), rows.column("url").to_pylist()))
        for drop in drops:
            drop["url"] = urls[drop["key"]]
        kept = rows.filter(keep)
        with out.writer(shard, kept.schema) as writer:
            writer.write(kept)
        return out.finish(shard, drops, {"rows_in": rows.num_rows, "rows_out": kept.num_rows,
                                         "seconds": round(time.monotonic() - started, 3)})
