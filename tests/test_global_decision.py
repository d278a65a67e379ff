"""A global stage's decision is saved one row group per input shard, so applying it holds one shard's rows."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densefusion_hf.stages.base import BuildContext, GlobalStage, decision_table, write_by_shard
from densefusion_hf.stages.shards import StageDir


class Toy(GlobalStage):
    name = "toy"


def _source(workdir, sizes):
    source = StageDir(workdir, "up")
    source.prepare()
    shards, n = [], 0
    for i, size in enumerate(sizes):
        shard = f"{i:05d}"
        keys = [f"key{n + j:06d}" for j in range(size)]
        schema = pa.schema([("key", pa.string()), ("url", pa.string())])
        with source.writer(shard, schema) as writer:
            writer.write(pa.table({"key": keys, "url": [f"http://h/{k}" for k in keys]}, schema=schema))
        source.finish(shard, [], {"rows_in": size, "rows_out": size})
        shards.append(shard)
        n += size
    return source, shards, [f"key{i:06d}" for i in range(n)]


@pytest.mark.parametrize("order", ["shuffled", "in shard order"])
def test_each_shard_reads_only_its_rows_of_the_decision(tmp_path, order):
    source, shards, keys = _source(tmp_path, [300, 0, 120, 7])
    shuffled = keys[:]
    if order == "shuffled":
        random.Random(1).shuffle(shuffled)  # decide may return its rows in any order
    reasons = ["near_dup" if int(k[3:]) % 3 == 0 else None for k in shuffled]
    decision = decision_table(shuffled, reasons, [r and "x" for r in reasons], score=pa.array(range(len(keys))))
    stage, ctx = Toy(), BuildContext(recipe=None, workdir=tmp_path, show_progress=False)
    path = stage.decision_path(ctx)
    path.parent.mkdir(parents=True)
    write_by_shard(decision, source, shards, path)

    assert pq.ParquetFile(path).num_row_groups == 3  # the empty shard has none
    expected = dict(zip(shuffled, zip(reasons, range(len(keys)))))
    for shard in shards:
        own = source.read(shard, columns=["key"]).column("key").to_pylist()
        table, position = stage._decided(ctx, shard)
        assert table.column("key").to_pylist() == own
        assert [(table["reason"][position[k]].as_py(), table["score"][position[k]].as_py()) for k in own] == \
            [expected[k] for k in own]


def test_a_decision_that_misses_rows_is_refused(tmp_path):
    source, shards, keys = _source(tmp_path, [5, 5])
    with pytest.raises(RuntimeError, match="does not cover exactly the rows"):
        write_by_shard(decision_table(keys[:-1], [None] * 9, [None] * 9), source, shards, tmp_path / "d.parquet")
    with pytest.raises(RuntimeError, match="does not cover exactly the rows"):  # in order, one key too many
        write_by_shard(decision_table(keys + ["extra"], [None] * 11, [None] * 11), source, shards,
                       tmp_path / "d.parquet")


def test_a_decision_saved_whole_still_applies(tmp_path):
    source, shards, keys = _source(tmp_path, [4, 4])
    stage, ctx = Toy(), BuildContext(recipe=None, workdir=tmp_path, show_progress=False)
    path = stage.decision_path(ctx)
    path.parent.mkdir(parents=True)
    pq.write_table(decision_table(keys, [None] * 8, [None] * 8), path)  # as older work directories have it
    table, position = stage._decided(ctx, "00001")
    assert set(keys[4:]) <= set(position) and table.num_rows == 8


def test_semdedup_decides_from_the_duplicates_its_groups_found(tmp_path):
    """The duplicates found per group of clusters (shard, row -> shard, row) become drops naming the kept key."""
    import numpy as np

    from densefusion_hf.stages.semdedup import ASSIGN_SCHEMA, GROUP_SCHEMA, SemDedup

    source, shards, keys = _source(tmp_path, [4, 0, 3])
    stage, ctx = SemDedup(), BuildContext(recipe=None, workdir=tmp_path, show_progress=False)
    _, assigned, groups = stage._paths(ctx)
    assigned.prepare()
    clusters = {"00000": [0, 1, 0, 2], "00001": [], "00002": [1, 0, 2]}
    for shard, start in (("00000", 0), ("00001", 4), ("00002", 4)):
        own = clusters[shard]
        table = pa.table({"key": keys[start:start + len(own)], "cluster": own,
                          "centroid_similarity": np.linspace(0.5, 0.9, len(own)).astype(np.float32)},
                         schema=ASSIGN_SCHEMA)
        with assigned.writer(shard, ASSIGN_SCHEMA) as writer:
            writer.write(table)
        assigned.finish(shard, [], {"rows_in": len(own), "rows_out": len(own)})
    groups.mkdir(parents=True)
    pq.write_table(pa.table({"shard": ["00002", "00000"], "row": [1, 2], "dup_shard": ["00000", "00000"],
                             "dup_row": [0, 0], "cosine": [0.9991, 0.99949]}, schema=GROUP_SCHEMA),
                   groups / "group-00000.parquet")
    pq.write_table(pa.table({"shard": ["00000"], "row": [1], "dup_shard": ["00002"], "dup_row": [0],
                             "cosine": [0.98]}, schema=GROUP_SCHEMA), groups / "group-00001.parquet")
    decision = stage.decide(ctx, source, shards)
    assert decision.column("key").to_pylist() == keys
    assert decision.column("reason").to_pylist() == [None, "semantic_dup", "semantic_dup", None, None,
                                                     "semantic_dup", None]
    assert decision.column("dup_of").to_pylist() == [None, keys[4], keys[0], None, None, keys[0], None]
    assert decision.column("detail").to_pylist()[1:3] == [f"cosine 0.980 to {keys[4]} in cluster 1",
                                                          f"cosine 0.999 to {keys[0]} in cluster 0"]
    assert decision.column("detail").to_pylist()[5] == f"cosine 0.999 to {keys[0]} in cluster 0"
    assert decision.column("cluster").to_pylist() == [0, 1, 0, 2, 1, 0, 2]


def test_semdedup_refuses_assignments_out_of_step_with_the_rows(tmp_path):
    from densefusion_hf.stages.semdedup import ASSIGN_SCHEMA, SemDedup

    source, shards, keys = _source(tmp_path, [3])
    stage, ctx = SemDedup(), BuildContext(recipe=None, workdir=tmp_path, show_progress=False)
    _, assigned, groups = stage._paths(ctx)
    assigned.prepare()
    with assigned.writer("00000", ASSIGN_SCHEMA) as writer:
        writer.write(pa.table({"key": keys[::-1], "cluster": [0, 0, 0], "centroid_similarity": [1.0] * 3},
                              schema=ASSIGN_SCHEMA))
    assigned.finish("00000", [], {"rows_in": 3, "rows_out": 3})
    with pytest.raises(RuntimeError, match="out of step"):
        stage.decide(ctx, source, shards)
