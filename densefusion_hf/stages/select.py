"""select: filters on the downloaded images, categories, cluster selection, and a seeded random subset.

Filters use the real decoded size (``width``/``height`` from fetch) and the LAION scores.  Categories
compare each image embedding with the mean embedding of each category's prompts (the usual zero-shot
prompt ensemble): the best category wins when its cosine similarity reaches the threshold, else
``other``.  Then ``densefusion_hf.stages.selection`` applies top-N per cluster, quotas and the target size.
``select/summary.json`` holds the numbers for the card: drops per reason, rows per category, and the
cluster-size histogram.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from densefusion_hf.models import ImageTextEmbedder
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.selection import cluster_size_histogram, random_subset, select
from densefusion_hf.stages.shards import StageDir, atomic_write_json, temporary_name
from densefusion_hf.stages.base import BuildContext, GlobalStage, decision_table
from densefusion_hf.stages.columnar import at_rows, concatenate, gather, ranks
from densefusion_hf.stages.embed import embedding_paths, load_embeddings
from densefusion_hf.stages.ingest import filter_reason


def category_prototypes(ctx: BuildContext) -> tuple[list[str], np.ndarray]:
    """(category names, the unit mean embedding of each category's prompts), also saved beside the selection
    so the category vectors can be inspected or reused."""
    settings = ctx.recipe.select
    embedder = ImageTextEmbedder(ctx.recipe.embed.model, ctx.workdir, ctx.recipe.embed.device,
                                 ctx.recipe.embed.dtype)
    names, prototypes = [], []
    for category in settings.categories:
        vectors = embedder.embed_texts(category.prompts)
        mean = vectors.mean(axis=0)
        prototypes.append(mean / max(np.linalg.norm(mean), 1e-12))
        names.append(category.name)
    prototypes = np.stack(prototypes)
    out = ctx.stage_dir("select").path
    tmp = temporary_name(out / "category_emb.npy")
    with open(tmp, "wb") as handle:
        np.save(handle, prototypes.astype(np.float32))
    os.replace(tmp, out / "category_emb.npy")
    atomic_write_json(out / "categories.json", {"names": names, "model": ctx.recipe.embed.model,
                                                "prompts": {c.name: c.prompts for c in settings.categories}})
    return names, prototypes


def shard_embeddings(ctx: BuildContext, shard: str, keys: list[str]) -> np.ndarray:
    """The embeddings of ``keys`` (rows of ``shard``), from embed's file for the same shard; rows it lacks are
    looked up in every embed shard (slow, and only for work directories whose shards were renamed)."""
    emb_path, meta_path = embedding_paths(ctx.workdir, shard)
    found: dict[str, int] = {}
    block = np.zeros((0, 0), np.float32)
    if emb_path.exists() and meta_path.exists():
        block = np.load(emb_path, mmap_mode="r")
        found = {k: i for i, k in enumerate(pq.read_table(meta_path, columns=["key"]).column("key").to_pylist())}
    if all(k in found for k in keys):
        return np.asarray(block[[found[k] for k in keys]], dtype=np.float32)
    all_keys, everything = load_embeddings(ctx.workdir, ctx.stage_dir("embed").done_shards())
    position = {k: i for i, k in enumerate(all_keys)}
    return everything[[position[k] for k in keys]]


def _scores(part: pa.Table, rank_by: str) -> np.ndarray:
    """Higher is better; unknown is NaN.  Without clusters, 'centroid' falls back to the similarity score."""
    def floats(column):
        return part.column(column).to_numpy(zero_copy_only=False).astype(np.float64)

    if rank_by == "resolution":
        return floats("width") * floats("height")
    similarity = floats("similarity")
    if rank_by == "centroid" and "centroid_similarity" in part.column_names:
        centroid = part.column("centroid_similarity")
        return np.where(centroid.is_null().to_numpy(zero_copy_only=False), similarity, floats("centroid_similarity"))
    return similarity


class Select(GlobalStage):
    name = "select"

    def params(self, recipe: Recipe) -> dict:
        params = asdict(recipe.select)
        if recipe.select.categories:
            params["embed_model"] = recipe.embed.model
        return params

    def decide(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> pa.Table:
        """Read one shard at a time into columns (filters and categories are decided there, so only their
        results are held), then select over the columns of every row."""
        settings = ctx.recipe.select
        columns = ["key", "width", "height", "similarity", "punsafe", "pwatermark"]
        schema_names = set(pq.read_schema(source.shard_path(shards[0])).names) if shards else set()
        columns += [c for c in ("cluster", "centroid_similarity") if c in schema_names]
        names = [c.name for c in settings.categories]
        prototypes = None  # the categories' embeddings, made when a shard first has rows to score
        other = len(names)  # the category code of "other"
        keys, score, cluster, category, category_score, filtered, candidates, filter_reasons, filter_details = \
            ([] for _ in range(9))
        offset = 0
        for shard in shards:
            part = source.read(shard, columns=columns)
            rejected = [(i, r) for i, r in enumerate(filter_reason(row, settings, size_source="decoded")
                                                     for row in part.to_pylist()) if r]
            filtered.append(np.array([i for i, _ in rejected], np.int64) + offset)
            filter_reasons.append(pa.array([r[0] for _, r in rejected], pa.string()))
            filter_details.append(pa.array([r[1] for _, r in rejected], pa.string()))
            keys.append(part.column("key").combine_chunks().cast(pa.string()))
            score.append(_scores(part, settings.rank_by))
            if "cluster" in schema_names:
                cluster.append(part.column("cluster").to_numpy(zero_copy_only=False).astype(np.int64))
            codes = np.full(part.num_rows, other, np.int16)
            best_score = np.full(part.num_rows, np.nan, np.float32)
            scored = np.setdiff1d(np.arange(part.num_rows), filtered[-1] - offset)  # this shard's candidates
            if settings.categories and len(scored):
                if prototypes is None:
                    names, prototypes = category_prototypes(ctx)
                similarity = shard_embeddings(ctx, shard, part.column("key").take(pa.array(scored)).to_pylist()) \
                    @ prototypes.T
                best = similarity.argmax(axis=1)
                best_score[scored] = similarity[np.arange(len(scored)), best]
                codes[scored] = np.where(best_score[scored] >= settings.category_threshold, best, other)
            category.append(codes), category_score.append(best_score), candidates.append(scored + offset)
            offset += part.num_rows

        keys = pa.chunked_array(keys, pa.string())
        n = len(keys)
        category_names = pa.array(names + ["other"], pa.string())
        category, category_score = concatenate(category, np.int16), concatenate(category_score, np.float32)
        filtered, candidates = concatenate(filtered, np.int64), concatenate(candidates, np.int64)
        clusters = concatenate(cluster, np.int64) if "cluster" in schema_names else None
        result = select(ranks(keys)[candidates], concatenate(score, np.float64)[candidates],
                        clusters[candidates] if clusters is not None else None,
                        category[candidates], category_names=names + ["other"],
                        top_per_cluster=settings.top_per_cluster, target_size=settings.target_size,
                        min_share={c.name: c.min_share for c in settings.categories if c.min_share},
                        max_share={c.name: c.max_share for c in settings.categories if c.max_share is not None})
        left_out = np.flatnonzero(~result.selected)
        rows = np.concatenate([filtered, candidates[left_out]])
        reasons = pa.chunked_array(filter_reasons + gather(result.reasons, left_out).chunks, pa.string())
        details = pa.chunked_array(filter_details + gather(result.details, left_out).chunks, pa.string())
        chosen = candidates[result.selected]
        if settings.subset is not None:
            outside = chosen[~random_subset(gather(keys, chosen), settings.subset.size, settings.subset.seed)]
            rows = np.concatenate([rows, outside])
            same = np.zeros(len(outside), np.int64)
            reasons = pa.chunked_array(reasons.chunks + gather(pa.array(["not_in_subset"]), same).chunks)
            details = pa.chunked_array(details.chunks + gather(pa.array(
                [f"outside the random subset of {settings.subset.size} (seed {settings.subset.seed})"]), same).chunks)
            chosen = np.setdiff1d(chosen, outside)
        cluster_rank = np.zeros(n, np.int64)
        cluster_rank[candidates] = result.cluster_rank
        is_candidate = np.zeros(n, dtype=bool)
        is_candidate[candidates] = True
        atomic_write_json(ctx.stage_dir(self.name).path / "summary.json", {
            "rows_in": n, "rows_selected": len(chosen),
            "dropped": _counts(reasons),
            "categories": _counts(gather(category_names, category[chosen])),
            "cluster_sizes": cluster_size_histogram(clusters[candidates]) if clusters is not None else [],
            "unmet_minimums": result.unmet_minimums,
        })
        return decision_table(keys, at_rows(n, rows, reasons), at_rows(n, rows, details),
                              category=gather(category_names, category),
                              category_score=pa.array(category_score, pa.float32(), mask=~is_candidate)
                              if prototypes is not None else pa.nulls(n, pa.float32()),
                              cluster_rank=pa.array(cluster_rank, pa.int64(), mask=~is_candidate))


def _counts(values: pa.Array) -> dict[str, int]:
    """Occurrences of each value, most frequent first (ties by value)."""
    counts = pc.value_counts(values).to_pylist() if len(values) else []
    return dict(sorted(((c["values"], c["counts"]) for c in counts), key=lambda item: (-item[1], item[0])))
