"""semdedup: SemDeDup over the image embeddings (k-means with faiss, near duplicates inside clusters).

Pairs in the same cluster with cosine similarity above 1 - eps are duplicates; groups are their
connected components, and each group keeps the member least similar to its centroid (SemDeDup's rule,
which keeps more diversity), ties to the earlier row.  Every row gets its ``cluster`` and
``centroid_similarity``, which select ranks by.  Dropped rows are ``semantic_dup`` with ``dup_of``.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow as pa

from densefusion_hf.dedup.semantic import semdedup
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.stages.base import BuildContext, GlobalStage, decision_table
from densefusion_hf.stages.embed import load_embeddings


TRAIN_POINTS_PER_CLUSTER = 64


class SemDedup(GlobalStage):
    name = "semdedup"

    def params(self, recipe: Recipe) -> dict:
        return asdict(recipe.semdedup)

    def decide(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> pa.Table:
        settings = ctx.recipe.semdedup
        keys, embeddings = load_embeddings(ctx.workdir, shards)
        upstream_keys = [k for s in shards for k in source.read(s, columns=["key"]).column("key").to_pylist()]
        assert keys == upstream_keys, "embeddings and rows are out of step; rebuild embed with --fresh"
        if not keys:
            return decision_table([], [], [], cluster=pa.array([], pa.int64()),
                                  centroid_similarity=pa.array([], pa.float32()))
        # 64 points per cluster keeps training linear in K: faiss's own default (256) costs 4x more time
        # for little gain in recall (benchmarks/semdedup.py).
        result = semdedup(embeddings, settings.clusters, settings.eps, seed=settings.seed,
                          niter=settings.iterations,
                          max_train_points=settings.train_points or TRAIN_POINTS_PER_CLUSTER * settings.clusters)
        reasons, details, dup_of = [], [], []
        for index, winner in enumerate(result.dup_of):
            if winner < 0:
                reasons.append(None), details.append(None), dup_of.append(None)
                continue
            cosine = float(embeddings[index] @ embeddings[winner])
            reasons.append("semantic_dup")
            details.append(f"cosine {cosine:.3f} to {keys[winner]} in cluster {int(result.assignment[index])}")
            dup_of.append(keys[winner])
        return decision_table(keys, reasons, details, dup_of,
                              cluster=pa.array(result.assignment.astype(np.int64)),
                              centroid_similarity=pa.array(result.centroid_similarity.astype(np.float32)))
