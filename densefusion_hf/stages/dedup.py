"""dedup: exact duplicates (sha256 of the bytes) and perceptual near duplicates (image hashes).

First every shard's images are hashed from a fast draft decode (resumable, kept in ``dedup/measure/``);
then one global decision groups duplicates (union of exact pairs and hash pairs within the Hamming
threshold, found by multi-index hashing, never all-pairs; pairs whose draft distance is near the
threshold are decided on full-decode hashes, as imagehash computes them) and keeps one image per group: the most pixels, then the least compressed copy
(``dedup.fidelity``), then the highest similarity, then the smallest key.  The others are dropped as ``exact_dup`` or ``near_dup`` with
``dup_of`` naming the kept row.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from densefusion_hf.dedup.fidelity import fidelity
from densefusion_hf.dedup.phash import hamming, phash_many, refined_pairs
from densefusion_hf.dedup.semantic import choose_kept
from densefusion_hf.dedup.unionfind import connected_components
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.stages.base import BuildContext, GlobalStage, decision_table, image_batches

MEASURE_SCHEMA = pa.schema([("key", pa.string()), ("phash", pa.string())])
HASH_BATCH = 2048  # images held at once while hashing


def hash_hex(value: int | None, bits: int) -> str | None:
    return None if value is None else format(value, f"0{(bits + 3) // 4}x")


def exact_pairs(digests: list[str]) -> np.ndarray:
    """Pairs (first, other) of rows with the same digest."""
    first: dict[str, int] = {}
    pairs = []
    for index, digest in enumerate(digests):
        if digest is None:
            continue
        if digest in first:
            pairs.append((first[digest], index))
        else:
            first[digest] = index
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def keep_order(pixels: np.ndarray, similarity: np.ndarray, keys: list[str],
               fidelity: list[tuple] | None = None) -> np.ndarray:
    """Rank of every row under the keep rule (0 = best): most pixels, least compressed (``fidelity``
    tuples, larger is better), highest similarity, smallest key."""
    sim = np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=-np.inf)
    n = len(keys)
    if fidelity is None:
        fidelity_rank = np.zeros(n, dtype=np.int64)
    else:
        distinct = sorted(set(fidelity))
        position = {value: i for i, value in enumerate(distinct)}
        fidelity_rank = np.array([position[value] for value in fidelity], dtype=np.int64).reshape(n)
    order = np.lexsort((np.asarray(keys), -sim, -fidelity_rank, -np.asarray(pixels, dtype=np.float64)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


class Dedup(GlobalStage):
    name = "dedup"

    def params(self, recipe: Recipe) -> dict:
        params = asdict(recipe.dedup)
        params.pop("processes")
        return params

    def measures(self, ctx: BuildContext) -> StageDir:
        return ctx.stage_dir(f"{self.name}/measure")

    def measure(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> None:
        """Hash every shard's images (the expensive part), resumable per shard, spread by the executor."""
        measures = self.measures(ctx)
        measures.prepare()
        if ctx.recipe.dedup.perceptual:
            todo = [s for s in shards if not measures.is_done(s)]
            for _ in ctx.executor.map(ctx, self, "measure_shard", todo, (source,)):
                pass

    def measure_shard(self, ctx: BuildContext, shard: str, source: StageDir) -> dict:
        """Hash one shard's images, resumable per shard."""
        settings, measures = ctx.recipe.dedup, self.measures(ctx)
        rows = source.read(shard, columns=["key"])
        bits = settings.hash_size ** 2
        hashes = []
        for batch in image_batches(ctx, rows, shard, HASH_BATCH):  # a bounded batch of images at a time
            hashes += phash_many(batch.column("image").to_pylist(), hash_size=settings.hash_size,
                                 algorithm=settings.algorithm, processes=settings.processes)
        table = pa.table({"key": rows.column("key"), "phash": [hash_hex(h, bits) for h in hashes]},
                         schema=MEASURE_SCHEMA)
        with measures.writer(shard, MEASURE_SCHEMA) as writer:
            writer.write(table)
        return measures.finish(shard, [], {"rows_in": rows.num_rows, "rows_out": rows.num_rows})

    @staticmethod
    def _exact_hashes(ctx: BuildContext, wanted: list[tuple[str, str]]) -> list[int | None]:
        """Full-decode hashes for (shard, key) pairs, read from fetch's shards one shard at a time."""
        settings = ctx.recipe.dedup
        result: dict[str, int | None] = {}
        for shard in sorted({s for s, _ in wanted}):
            keys = {k for s, k in wanted if s == shard}
            images = ctx.stage_dir("fetch").read(shard, columns=["key", "image"])
            images = images.filter(pc.is_in(images.column("key"), pa.array(sorted(keys))))
            hashes = phash_many(images.column("image").to_pylist(), hash_size=settings.hash_size,
                                algorithm=settings.algorithm, processes=settings.processes, draft=False)
            result.update(zip(images.column("key").to_pylist(), hashes))
        return [result.get(k) for _, k in wanted]

    @staticmethod
    def _fidelity(ctx: BuildContext, labels: np.ndarray, row_shard: list[str], keys: list[str]) -> list[tuple]:
        """``fidelity`` of the rows that have duplicates (read from fetch's shards); the rest compete with
        no one and get a placeholder."""
        counts = np.bincount(labels, minlength=len(keys)) if len(keys) else np.zeros(0, np.int64)
        in_group = np.flatnonzero(counts[labels] > 1)
        found: dict[str, tuple] = {}
        for shard in sorted({row_shard[i] for i in in_group}):
            wanted = sorted(keys[i] for i in in_group if row_shard[i] == shard)
            images = ctx.stage_dir("fetch").read(shard, columns=["key", "image"])
            images = images.filter(pc.is_in(images.column("key"), pa.array(wanted)))
            for key, data in zip(images.column("key").to_pylist(), images.column("image").to_pylist()):
                found[key] = fidelity(data)
        return [found.get(k, (0, 0.0, 0.0)) for k in keys]

    def decide(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> pa.Table:
        settings, measures = ctx.recipe.dedup, self.measures(ctx)
        small = ["key", "sha256", "width", "height", "similarity"]
        parts = [source.read(s, columns=small) for s in shards]
        row_shard = [s for s, part in zip(shards, parts) for _ in range(part.num_rows)]
        table = pa.concat_tables(parts) if parts else None
        if table is None or table.num_rows == 0:
            return decision_table([], [], [], phash=pa.array([], pa.string()))
        keys = table.column("key").to_pylist()
        if settings.perceptual:
            hashes = pa.concat_tables([measures.read(s) for s in shards])
            assert hashes.column("key").to_pylist() == keys
            phash = hashes.column("phash").to_pylist()
        else:
            phash = [None] * len(keys)
        pairs = [exact_pairs(table.column("sha256").to_pylist())] if settings.exact else []
        if settings.perceptual:
            have = np.array([i for i, h in enumerate(phash) if h is not None], dtype=np.int64)
            values = np.array([int(phash[i], 16) for i in have], dtype=np.uint64)
            bits = settings.hash_size ** 2

            def exact_hashes(rows: np.ndarray) -> list[int | None]:
                """Full-decode hashes of rows near the threshold; they also replace the draft ones."""
                found = self._exact_hashes(ctx, [(row_shard[have[r]], keys[have[r]]) for r in rows])
                for r, value in zip(rows, found):
                    phash[have[r]] = hash_hex(value, bits) if value is not None else phash[have[r]]
                return found

            found = refined_pairs(values, settings.threshold, exact_hashes)
            pairs.append(have[found] if len(found) else found)
        labels = connected_components(len(keys), np.concatenate(pairs) if pairs else np.zeros((0, 2)))
        pixels = pc.multiply(table.column("width"), table.column("height")).to_numpy(zero_copy_only=False)
        quality = self._fidelity(ctx, labels, row_shard, keys)
        rank = keep_order(pixels, table.column("similarity").to_numpy(zero_copy_only=False), keys, quality)
        keep, dup_index = choose_kept(labels, -rank)
        kept = np.where(keep, np.arange(len(keys)), dup_index)
        digests = table.column("sha256").to_pylist()
        reasons, details, dup_of = [], [], []
        for index, winner in enumerate(kept):
            if winner == index:
                reasons.append(None), details.append(None), dup_of.append(None)
                continue
            dup_of.append(keys[winner])
            if digests[index] == digests[winner]:
                reasons.append("exact_dup")
                details.append(f"same sha256 as {keys[winner]}")
            else:
                distance = hamming(int(phash[index], 16), int(phash[winner], 16)) \
                    if phash[index] and phash[winner] else None
                reasons.append("near_dup")
                details.append(f"{settings.algorithm} distance {distance} to {keys[winner]}"
                               if distance is not None else f"in the duplicate group of {keys[winner]}")
        return decision_table(keys, reasons, details, dup_of, phash=pa.array(phash, pa.string()))
