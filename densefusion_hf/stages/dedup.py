"""dedup: exact duplicates (sha256 of the bytes) and perceptual near duplicates (image hashes).

First every shard's images are hashed from a fast draft decode (resumable, kept in ``dedup/measure/``);
then one global decision groups duplicates (union of exact pairs and hash pairs within the Hamming
threshold, found by multi-index hashing, never all-pairs; pairs whose draft distance is near the
threshold are decided on full-decode hashes, as imagehash computes them) and keeps one image per group: the most pixels, then the least compressed copy
(``dedup.fidelity``), then the highest similarity, then the smallest key.  The others are dropped as ``exact_dup`` or ``near_dup`` with
``dup_of`` naming the kept row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from densefusion_hf.console import counted
from densefusion_hf.dedup.fidelity import fidelity
from densefusion_hf.dedup.hamming import _popcount
from densefusion_hf.dedup.phash import phash_many, refined_pairs
from densefusion_hf.dedup.semantic import choose_kept
from densefusion_hf.dedup.unionfind import connected_components
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.columnar import at_rows, chunked, concatenate, gather, hex_to_uint64, ranks, uint64_to_hex
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.stages.base import BuildContext, GlobalStage, decision_table, image_batches

MEASURE_SCHEMA = pa.schema([("key", pa.string()), ("phash", pa.string())])
HASH_BATCH = 2048  # images held at once while hashing


def hash_hex(value: int | None, bits: int) -> str | None:
    return None if value is None else format(value, f"0{(bits + 3) // 4}x")


def exact_pairs(words: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pairs of rows with the same digest, given each digest as an (n, 4) array of its 64-bit words: every
    row paired with the next one holding the same digest (enough to join them into one group)."""
    rows = np.flatnonzero(valid)
    order = rows[np.lexsort(tuple(words[rows, k] for k in reversed(range(words.shape[1]))))]
    same = np.all(words[order[1:]] == words[order[:-1]], axis=1)
    return np.stack([order[:-1][same], order[1:][same]], axis=1).astype(np.int64).reshape(-1, 2)


def fidelity_ranks(values: np.ndarray) -> np.ndarray:
    """Dense ranks (1 = worst) of ``fidelity`` tuples, one per row of ``values``; equal tuples rank equal."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    _, inverse = np.unique(np.asarray(values, dtype=np.float64), axis=0, return_inverse=True)
    return inverse.ravel().astype(np.int64) + 1


def keep_order(pixels: np.ndarray, similarity: np.ndarray, keys, fidelity_rank: np.ndarray | None = None) -> np.ndarray:
    """Rank of every row under the keep rule (0 = best): most pixels, least compressed (``fidelity_rank``,
    larger is better), highest similarity, smallest key (``keys``: the keys, or any array sorting as they do)."""
    sim = np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=-np.inf)
    n = len(sim)
    fidelity_rank = np.zeros(n, dtype=np.int64) if fidelity_rank is None else np.asarray(fidelity_rank)
    order = np.lexsort((np.asarray(keys), -sim, -fidelity_rank, -np.asarray(pixels, dtype=np.float64)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _fetched_images(ctx: BuildContext, shard: str, keys: pa.Array) -> pa.Table:
    """The keys and image bytes of these rows of one of fetch's shards."""
    images = ctx.stage_dir("fetch").read(shard, columns=["key", "image"])
    return images.filter(pc.is_in(images.column("key"), keys))


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
            for _ in counted(ctx.executor.map(ctx, self, "measure_shard", todo, (source,)), len(shards),
                             "dedup: hash", "shard", ctx.show_progress, initial=len(shards) - len(todo)):
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
            images = _fetched_images(ctx, shard, pa.array(sorted(keys), pa.string()))
            hashes = phash_many(images.column("image").to_pylist(), hash_size=settings.hash_size,
                                algorithm=settings.algorithm, processes=settings.processes, draft=False)
            result.update(zip(images.column("key").to_pylist(), hashes))
        return [result.get(k) for _, k in wanted]

    @staticmethod
    def _fidelity_rank(ctx: BuildContext, columns: "_Columns", labels: np.ndarray) -> np.ndarray:
        """``fidelity_ranks`` of the rows that have duplicates (their images read from fetch's shards, one shard
        at a time); the rest compete with no one and get 0."""
        n = len(labels)
        counts = np.bincount(labels, minlength=n)
        in_group = np.flatnonzero(counts[labels] > 1)
        quality = np.zeros((len(in_group), 3), dtype=np.float64)
        for shard_index in np.unique(columns.shard_of[in_group]):
            at = np.flatnonzero(columns.shard_of[in_group] == shard_index)
            wanted = gather(columns.keys, in_group[at]).combine_chunks()
            images = _fetched_images(ctx, columns.shards[shard_index], wanted)
            found = dict(zip(images.column("key").to_pylist(), map(fidelity, images.column("image").to_pylist())))
            quality[at] = [found.get(key, (0, 0.0, 0.0)) for key in wanted.to_pylist()]
        rank = np.zeros(n, dtype=np.int64)
        rank[in_group] = fidelity_ranks(quality)
        return rank

    def decide(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> pa.Table:
        settings = ctx.recipe.dedup
        columns = _Columns.read(source, self.measures(ctx) if settings.perceptual else None, shards)
        keys, n = columns.keys, len(columns.keys)
        width = (settings.hash_size ** 2 + 3) // 4
        phash, have_phash = columns.phash, columns.phash_valid
        pairs = [exact_pairs(columns.sha256, columns.sha256_valid)] if settings.exact else []
        if settings.perceptual:
            have = np.flatnonzero(have_phash)

            def exact_hashes(rows: np.ndarray) -> list[int | None]:
                """Full-decode hashes of rows near the threshold; they also replace the draft ones."""
                where = have[rows]
                found = self._exact_hashes(ctx, list(zip([shards[i] for i in columns.shard_of[where]],
                                                         gather(keys, where).to_pylist())))
                for row, value in zip(where, found):
                    if value is not None:
                        phash[row] = value
                return found

            found = refined_pairs(phash[have], settings.threshold, exact_hashes)
            pairs.append(have[found] if len(found) else found)
        labels = connected_components(n, np.concatenate(pairs) if pairs else np.zeros((0, 2)))
        rank = keep_order(columns.pixels, columns.similarity, ranks(keys), self._fidelity_rank(ctx, columns, labels))
        keep, dup_index = choose_kept(labels, -rank)
        dropped = np.flatnonzero(~keep)
        winners = dup_index[dropped]
        dup_keys = gather(keys, winners)
        same_digest = chunked(columns.sha256_valid[dropped] & columns.sha256_valid[winners]
                              & np.all(columns.sha256[dropped] == columns.sha256[winners], axis=1))
        both_hashed = chunked(have_phash[dropped] & have_phash[winners])
        distance = pc.cast(chunked(_popcount(phash[dropped] ^ phash[winners]).astype(np.int64)), pa.string())
        detail = pc.if_else(same_digest, pc.binary_join_element_wise("same sha256 as ", dup_keys, ""),
                            pc.if_else(both_hashed,
                                       pc.binary_join_element_wise(f"{settings.algorithm} distance ", distance,
                                                                   " to ", dup_keys, ""),
                                       pc.binary_join_element_wise("in the duplicate group of ", dup_keys, "")))
        reason = pc.if_else(same_digest, "exact_dup", "near_dup")
        return decision_table(keys, at_rows(n, dropped, reason), at_rows(n, dropped, detail),
                              at_rows(n, dropped, dup_keys), phash=uint64_to_hex(phash, have_phash, width))


@dataclass
class _Columns:
    """What dedup's decision needs of every row, read one shard at a time into fixed-width arrays: the keys
    (Arrow), each SHA-256 as four 64-bit words, the draft perceptual hash, pixels, similarity and the shard."""

    shards: list[str]
    keys: pa.ChunkedArray
    sha256: np.ndarray          # (n, 4) uint64
    sha256_valid: np.ndarray
    phash: np.ndarray           # uint64, 0 where not valid
    phash_valid: np.ndarray
    pixels: np.ndarray
    similarity: np.ndarray
    shard_of: np.ndarray        # index into shards

    @classmethod
    def read(cls, source: StageDir, measures: StageDir | None, shards: list[str]) -> "_Columns":
        keys, words, digest_valid, hashes, hash_valid, pixels, similarity, sizes = ([] for _ in range(8))
        for shard in shards:
            part = source.read(shard, columns=["key", "sha256", "width", "height", "similarity"])
            keys.append(part.column("key").combine_chunks().cast(pa.string()))
            digests = part.column("sha256").to_pylist()
            shard_words = [hex_to_uint64(digests, 16 * k) for k in range(4)]
            words.append(np.stack([w for w, _ in shard_words], axis=1))
            digest_valid.append(shard_words[0][1])
            if measures is not None:
                measured = measures.read(shard)
                if not measured.column("key").equals(part.column("key")):
                    raise RuntimeError(f"dedup's hashes of shard {shard} are not in its rows' order; "
                                       f"remove {measures.path} and run the build again")
                value, valid = hex_to_uint64(measured.column("phash").to_pylist())
            else:
                value, valid = np.zeros(part.num_rows, np.uint64), np.zeros(part.num_rows, bool)
            hashes.append(value), hash_valid.append(valid)
            pixels.append(pc.multiply(part.column("width"), part.column("height")).to_numpy(zero_copy_only=False)
                          .astype(np.float64))
            similarity.append(part.column("similarity").to_numpy(zero_copy_only=False).astype(np.float64))
            sizes.append(part.num_rows)
        return cls(shards, pa.chunked_array(keys, pa.string()), concatenate(words, np.uint64, (4,)),
                   concatenate(digest_valid, bool), concatenate(hashes, np.uint64), concatenate(hash_valid, bool),
                   concatenate(pixels, np.float64), concatenate(similarity, np.float64),
                   np.repeat(np.arange(len(shards), dtype=np.int32), sizes))
