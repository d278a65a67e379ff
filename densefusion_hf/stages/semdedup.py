"""semdedup: SemDeDup over the image embeddings (k-means with faiss, near duplicates inside clusters).

Pairs in the same cluster with cosine similarity above 1 - eps are duplicates; groups are their
connected components, and each group keeps the member least similar to its centroid (SemDeDup's rule,
which keeps more diversity), ties to the earlier row.  Every row gets its ``cluster`` and
``centroid_similarity``, which select ranks by.  Dropped rows are ``semantic_dup`` with ``dup_of``.

The work is cut so that it spreads over a cluster and no step holds every embedding:

    semdedup/centroids.npy                 k-means trained on a seeded sample (memory-mapped reads)
    semdedup/measure/shard-N.parquet       each shard's rows assigned to their nearest centroid
    semdedup/groups/group-G.parquet        duplicates within the clusters c with c % groups == G,
                                           each reading only its clusters' embeddings

Pairs never cross clusters, so the groups found cluster by cluster are the global ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from densefusion_hf.console import counted
from densefusion_hf.dedup.semantic import assign_to_centroids, choose_kept, duplicate_groups, train_centroids
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.base import BuildContext, GlobalStage, decision_table
from densefusion_hf.stages.columnar import at_rows, gather
from densefusion_hf.stages.embed import ShardedEmbeddings, embedding_paths
from densefusion_hf.stages.shards import StageDir, temporary_name

TRAIN_POINTS_PER_CLUSTER = 64
#: Rows per cluster group: a group task holds about this many embeddings (512-d float32: 256 MiB).
ROWS_PER_GROUP = 131_072

ASSIGN_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int64()), ("centroid_similarity", pa.float32())])
GROUP_SCHEMA = pa.schema([("shard", pa.string()), ("row", pa.int64()), ("dup_shard", pa.string()),
                          ("dup_row", pa.int64()), ("cosine", pa.float32())])


class SemDedup(GlobalStage):
    name = "semdedup"

    def params(self, recipe: Recipe) -> dict:
        return asdict(recipe.semdedup)

    def _paths(self, ctx: BuildContext):
        base = ctx.stage_dir(self.name).path
        return base / "centroids.npy", ctx.stage_dir(f"{self.name}/measure"), base / "groups"

    def measure(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> None:
        settings = ctx.recipe.semdedup
        centroids_path, assigned, groups_dir = self._paths(ctx)
        assigned.prepare()
        if not centroids_path.exists():
            # 64 points per cluster keeps training linear in K: faiss's own default (256) costs 4x more time
            # for little gain in recall (benchmarks/semdedup.py).
            pool = ShardedEmbeddings(ctx.workdir, shards)
            centroids = train_centroids(pool, settings.clusters, seed=settings.seed, niter=settings.iterations,
                                        max_train_points=settings.train_points
                                        or TRAIN_POINTS_PER_CLUSTER * settings.clusters) if len(pool) else \
                np.zeros((0, 0), np.float32)
            tmp = temporary_name(centroids_path)
            with open(tmp, "wb") as handle:
                np.save(handle, centroids)
            os.replace(tmp, centroids_path)
        todo = [s for s in shards if not assigned.is_done(s)]
        for _ in counted(ctx.executor.map(ctx, self, "assign_shard", todo), len(shards), "semdedup: assign",
                         "shard", ctx.show_progress, initial=len(shards) - len(todo)):
            pass
        sizes = np.zeros(len(np.load(centroids_path, mmap_mode="r")), np.int64)
        for shard in shards:
            counts = pc.value_counts(assigned.read(shard, columns=["cluster"]).column("cluster")).to_pylist()
            for entry in counts:
                sizes[entry["values"]] += entry["counts"]
        n_groups = max(1, math.ceil(int(sizes.sum()) / ROWS_PER_GROUP))
        groups_dir.mkdir(parents=True, exist_ok=True)
        todo = [g for g in range(n_groups) if not (groups_dir / f"group-{g:05d}.parquet").exists()]
        for _ in counted(ctx.executor.map(ctx, self, "group_clusters", todo, (shards, n_groups)), n_groups,
                         "semdedup: search", "cluster group", ctx.show_progress, initial=n_groups - len(todo)):
            pass

    def assign_shard(self, ctx: BuildContext, shard: str) -> dict:
        """Each row of one shard to its nearest centroid."""
        centroids_path, assigned, _ = self._paths(ctx)
        emb_path, meta_path = embedding_paths(ctx.workdir, shard)
        keys = pq.read_table(meta_path, columns=["key"]).column("key")
        embeddings = np.load(emb_path, mmap_mode="r")
        if len(embeddings):
            cluster, similarity = assign_to_centroids(embeddings, np.load(centroids_path))
        else:
            cluster, similarity = np.zeros(0, np.int64), np.zeros(0, np.float32)
        table = pa.table({"key": keys, "cluster": cluster, "centroid_similarity": similarity}, schema=ASSIGN_SCHEMA)
        with assigned.writer(shard, ASSIGN_SCHEMA) as writer:
            writer.write(table)
        return assigned.finish(shard, [], {"rows_in": len(keys), "rows_out": len(keys)})

    def group_clusters(self, ctx: BuildContext, group: int, shards: list[str], n_groups: int) -> int:
        """Duplicates inside the clusters of one group, reading only their rows' embeddings."""
        _, assigned, groups_dir = self._paths(ctx)
        member_shard, member_row, cluster, similarity, blocks = [], [], [], [], []
        for shard in shards:
            rows = assigned.read(shard, columns=["cluster", "centroid_similarity"])
            mine = np.flatnonzero(rows.column("cluster").to_numpy() % n_groups == group)
            if not len(mine):
                continue
            member_shard += [shard] * len(mine)
            member_row.append(mine)
            cluster.append(rows.column("cluster").to_numpy()[mine])
            similarity.append(rows.column("centroid_similarity").to_numpy()[mine])
            blocks.append(np.load(embedding_paths(ctx.workdir, shard)[0], mmap_mode="r")[mine])
        found = []
        if blocks:
            rows, embeddings = np.concatenate(member_row), np.concatenate(blocks)
            groups, _ = duplicate_groups(embeddings, np.concatenate(cluster), ctx.recipe.semdedup.eps)
            # Members are in shard-then-row order, so "ties to the earlier row" is the same as over the pool.
            keep, dup_of = choose_kept(groups, -np.concatenate(similarity))
            for i in np.flatnonzero(~keep):
                w = dup_of[i]
                cosine = float(embeddings[i].astype(np.float32) @ embeddings[w].astype(np.float32))
                found.append((member_shard[i], int(rows[i]), member_shard[w], int(rows[w]), cosine))
        table = pa.Table.from_pylist([dict(zip(GROUP_SCHEMA.names, f)) for f in found], schema=GROUP_SCHEMA)
        path = groups_dir / f"group-{group:05d}.parquet"
        tmp = temporary_name(path)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return len(found)

    def decide(self, ctx: BuildContext, source: StageDir, shards: list[str]) -> pa.Table:
        _, assigned, groups_dir = self._paths(ctx)
        parts = []
        for shard in shards:  # one shard's keys at a time: the rows and their assignments must be in step
            part = assigned.read(shard)
            if not part.column("key").equals(source.read(shard, columns=["key"]).column("key")):
                raise RuntimeError(f"the embeddings of shard {shard} and its rows are out of step; "
                                   f"rebuild embed with --fresh")
            parts.append(part)
        table = pa.concat_tables(parts) if parts else ASSIGN_SCHEMA.empty_table()
        keys, n = table.column("key"), table.num_rows
        start = dict(zip(shards, np.cumsum([0] + [p.num_rows for p in parts]).tolist()))

        def position(found: pa.Table, shard: str, row: str) -> np.ndarray:
            """Rows of the decision named as (shard, row in the shard)."""
            return (np.array([start[s] for s in found.column(shard).to_pylist()], np.int64)
                    + found.column(row).to_numpy().astype(np.int64))

        rows, details, winners = [np.zeros(0, np.int64)], [pa.array([], pa.string())], [np.zeros(0, np.int64)]
        for path in sorted(groups_dir.glob("group-*.parquet")):  # the duplicates found, one group at a time
            found = pq.read_table(path)
            index, winner = position(found, "shard", "row"), position(found, "dup_shard", "dup_row")
            cosine = pa.array([f"cosine {c:.3f}" for c in found.column("cosine").to_pylist()], pa.string())
            # one group's duplicates at a time: bounded, so plain arrays
            details.append(pc.binary_join_element_wise(
                cosine, " to ", gather(keys, winner).combine_chunks(), " in cluster ",
                pc.cast(table.column("cluster").take(pa.array(index)), pa.string()).combine_chunks(), ""))
            rows.append(index), winners.append(winner)
        rows, winners = np.concatenate(rows), np.concatenate(winners)
        reasons = gather(pa.array(["semantic_dup"]), np.zeros(len(rows), np.int64))
        return decision_table(keys, at_rows(n, rows, reasons), at_rows(n, rows, pa.chunked_array(details, pa.string())),
                              at_rows(n, rows, gather(keys, winners)),
                              cluster=table.column("cluster"), centroid_similarity=table.column("centroid_similarity"))

    def has_outputs(self, ctx: BuildContext) -> bool:
        # Centroids trained with other settings must not be reused either.
        return super().has_outputs(ctx) or self._paths(ctx)[0].exists()
