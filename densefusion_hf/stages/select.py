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
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.models import ImageTextEmbedder
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.selection import cluster_size_histogram, random_subset, select
from densefusion_hf.stages.shards import StageDir, atomic_write_json, temporary_name
from densefusion_hf.stages.base import BuildContext, GlobalStage, decision_table
from densefusion_hf.stages.embed import load_embeddings
from densefusion_hf.stages.ingest import filter_reason


def category_scores(ctx: BuildContext, keys: list[str]) -> tuple[list[str], np.ndarray]:
    """(best category per row, its cosine similarity) from the recipe's category prompts."""
    settings = ctx.recipe.select
    embed_dir = ctx.stage_dir("embed")
    all_keys, embeddings = load_embeddings(ctx.workdir, embed_dir.done_shards())
    position = {k: i for i, k in enumerate(all_keys)}
    images = embeddings[[position[k] for k in keys]]
    embedder = ImageTextEmbedder(ctx.recipe.embed.model, ctx.workdir, ctx.recipe.embed.device,
                                 ctx.recipe.embed.dtype)
    names, prototypes = [], []
    for category in settings.categories:
        vectors = embedder.embed_texts(category.prompts)
        mean = vectors.mean(axis=0)
        prototypes.append(mean / max(np.linalg.norm(mean), 1e-12))
        names.append(category.name)
    prototypes = np.stack(prototypes)
    # Kept beside the selection so the category vectors can be inspected or reused.
    out = ctx.stage_dir("select").path
    tmp = temporary_name(out / "category_emb.npy")
    with open(tmp, "wb") as handle:
        np.save(handle, prototypes.astype(np.float32))
    os.replace(tmp, out / "category_emb.npy")
    atomic_write_json(out / "categories.json", {"names": names, "model": ctx.recipe.embed.model,
                                                "prompts": {c.name: c.prompts for c in settings.categories}})
    similarity = images @ prototypes.T
    best = similarity.argmax(axis=1)
    score = similarity[np.arange(len(keys)), best]
    labels = [names[b] if s >= settings.category_threshold else "other" for b, s in zip(best, score)]
    return labels, score.astype(np.float32)


class Select(GlobalStage):
    name = "select"

    def params(self, recipe: Recipe) -> dict:
        params = asdict(recipe.select)
        if recipe.select.categories:
            params["embed_model"] = recipe.embed.model
        return params

    @staticmethod
    def _score(row: dict, rank_by: str) -> float:
        """Higher is better. Without clusters, 'centroid' falls back to the similarity score."""
        if rank_by == "resolution":
            return float(row["width"] * row["height"])
        if rank_by == "centroid" and row.get("centroid_similarity") is not None:
            return row["centroid_similarity"]
        return row["similarity"] if row.get("similarity") is not None else float("nan")

    def decide(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> pa.Table:
        settings = ctx.recipe.select
        columns = ["key", "width", "height", "similarity", "punsafe", "pwatermark"]
        schema_names = set(pq.read_schema(source.shard_path(shards[0])).names) if shards else set()
        columns += [c for c in ("cluster", "centroid_similarity") if c in schema_names]
        table = pa.concat_tables([source.read(s, columns=columns) for s in shards]) if shards else None
        rows = table.to_pylist() if table is not None else []
        keys = [r["key"] for r in rows]

        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            rejected = filter_reason(row, settings, size_source="decoded")
            if rejected:
                reasons[i], details[i] = rejected
        candidates = [i for i in range(len(rows)) if reasons[i] is None]

        categories = ["other"] * len(rows)
        category_score = [None] * len(rows)
        if settings.categories and candidates:
            labels, scores = category_scores(ctx, [keys[i] for i in candidates])
            for i, label, score in zip(candidates, labels, scores):
                categories[i], category_score[i] = label, float(score)

        score = np.array([self._score(rows[i], settings.rank_by) for i in candidates], dtype=np.float64)
        clusters = (np.array([rows[i]["cluster"] for i in candidates], np.int64)
                    if "cluster" in schema_names else None)
        result = select([keys[i] for i in candidates], score, clusters, [categories[i] for i in candidates],
                        top_per_cluster=settings.top_per_cluster, target_size=settings.target_size,
                        min_share={c.name: c.min_share for c in settings.categories if c.min_share},
                        max_share={c.name: c.max_share for c in settings.categories if c.max_share is not None})
        cluster_rank = [None] * len(rows)
        for j, i in enumerate(candidates):
            reasons[i], details[i], cluster_rank[i] = result.reasons[j], result.details[j], int(result.cluster_rank[j])

        if settings.subset is not None:
            chosen = [i for i in range(len(rows)) if reasons[i] is None]
            in_subset = random_subset([keys[i] for i in chosen], settings.subset.size, settings.subset.seed)
            for i, inside in zip(chosen, in_subset):
                if not inside:
                    reasons[i] = "not_in_subset"
                    details[i] = f"outside the random subset of {settings.subset.size} (seed {settings.subset.seed})"

        kept = [i for i in range(len(rows)) if reasons[i] is None]
        atomic_write_json(ctx.stage_dir(self.name).path / "summary.json", {
            "rows_in": len(rows), "rows_selected": len(kept),
            "dropped": dict(Counter(r for r in reasons if r).most_common()),
            "categories": dict(Counter(categories[i] for i in kept).most_common()),
            "cluster_sizes": cluster_size_histogram(clusters) if clusters is not None else [],
            "unmet_minimums": result.unmet_minimums,
        })
        return decision_table(keys, reasons, details,
                              category=pa.array(categories, pa.string()),
                              category_score=pa.array(category_score, pa.float32()),
                              cluster_rank=pa.array(cluster_rank, pa.int64()))
