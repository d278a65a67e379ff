"""embed: image embeddings with the recipe's CLIP / SigLIP model, in clip-retrieval's on-disk layout.

    embed/img_emb/img_emb_N.npy          float16, L2-normalised, one row per kept image of shard N
    embed/metadata/metadata_N.parquet    key, url, caption: row i describes row i of img_emb_N.npy

so that tools of that ecosystem (clip-retrieval's index building, autofaiss) read them as they are.
The stage's own shard passes the rows through unchanged; the model is loaded once per run.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.models import ImageTextEmbedder, resolved_dtype_name
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.shards import StageDir, temporary_name
from densefusion_hf.stages.base import BuildContext, ShardStage, decode_rows, image_batches


def embedding_paths(workdir: Path, shard: str) -> tuple[Path, Path]:
    base = Path(workdir) / "embed"
    return base / "img_emb" / f"img_emb_{int(shard)}.npy", base / "metadata" / f"metadata_{int(shard)}.parquet"


def load_embeddings(workdir: Path, shards: list[str]) -> tuple[list[str], np.ndarray]:
    """(keys, embeddings as float32) of the given shards, in shard order."""
    keys, blocks = [], []
    for shard in shards:
        emb_path, meta_path = embedding_paths(workdir, shard)
        block = np.load(emb_path)
        if len(block) == 0:  # a shard whose rows were all dropped upstream
            continue
        keys.extend(pq.read_table(meta_path, columns=["key"]).column("key").to_pylist())
        blocks.append(block.astype(np.float32))
    dim = blocks[0].shape[1] if blocks else 0
    return keys, (np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32))


class ShardedEmbeddings:
    """Rows of several shards' ``img_emb_N.npy`` as one read-only array, memory-mapped: only the rows indexed
    are read, so a seeded sample for k-means never loads the whole pool."""

    def __init__(self, workdir: Path, shards: list[str]):
        self.blocks = [np.load(embedding_paths(workdir, s)[0], mmap_mode="r") for s in shards]
        self.blocks = [b for b in self.blocks if len(b)]
        self.starts = np.cumsum([0] + [len(b) for b in self.blocks])
        dim = self.blocks[0].shape[1] if self.blocks else 0
        self.shape, self.ndim = (int(self.starts[-1]), dim), 2
        self.dtype = self.blocks[0].dtype if self.blocks else np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        block = np.searchsorted(self.starts, rows, side="right") - 1
        for b in np.unique(block):
            mine = block == b
            out[mine] = self.blocks[b][rows[mine] - self.starts[b]]
        return out


class Embed(ShardStage):
    name = "embed"
    session_per_worker = True  # the model, loaded once per worker

    def params(self, recipe: Recipe) -> dict:
        # The dtype changes the numbers a little ('auto' is resolved, so moving a half-built work directory
        # from a GPU to a CPU machine is detected); the batch size does not.
        return {"model": recipe.embed.model, "dtype": resolved_dtype_name(recipe.embed.dtype, recipe.embed.device)}

    @contextlib.contextmanager
    def session(self, ctx: BuildContext):
        settings = ctx.recipe.embed
        self.embedder = ImageTextEmbedder(settings.model, ctx.workdir, settings.device, settings.dtype)
        try:
            yield
        finally:
            del self.embedder

    def run_shard(self, ctx: BuildContext, shard: str, source: StageDir, out: StageDir) -> dict:
        started = time.monotonic()
        rows = source.read(shard)
        vectors, decoded, drops = [], [], []
        for batch in image_batches(ctx, rows, shard, ctx.recipe.embed.batch_size):
            images, batch_decoded, batch_drops = decode_rows(batch)
            decoded += batch_decoded
            drops += batch_drops
            if images:
                vectors.append(self.embedder.embed_images(images))
        rows_in = rows.num_rows
        if drops:
            rows = rows.filter(pa.array(decoded))
        dim = vectors[0].shape[1] if vectors else 0
        embeddings = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)

        emb_path, meta_path = embedding_paths(ctx.workdir, shard)
        emb_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(emb_path)
        with open(tmp, "wb") as handle:
            np.save(handle, embeddings.astype(np.float16))
        os.replace(tmp, emb_path)
        metadata = pa.table({"key": rows.column("key"), "url": rows.column("url"), "caption": rows.column("text")})
        tmp = temporary_name(meta_path)
        pq.write_table(metadata, tmp)
        os.replace(tmp, meta_path)

        passthrough = rows.drop_columns([c for c in ("image",) if c in rows.column_names])
        with out.writer(shard, passthrough.schema) as writer:
            writer.write(passthrough)
        return out.finish(shard, drops, {"rows_in": rows_in, "rows_out": rows.num_rows, "dim": int(dim),
                                         "model": ctx.recipe.embed.model,
                                         "seconds": round(time.monotonic() - started, 3)})
