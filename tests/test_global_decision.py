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


def test_each_shard_reads_only_its_rows_of_the_decision(tmp_path):
    source, shards, keys = _source(tmp_path, [300, 0, 120, 7])
    shuffled = keys[:]
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


def test_a_decision_saved_whole_still_applies(tmp_path):
    source, shards, keys = _source(tmp_path, [4, 4])
    stage, ctx = Toy(), BuildContext(recipe=None, workdir=tmp_path, show_progress=False)
    path = stage.decision_path(ctx)
    path.parent.mkdir(parents=True)
    pq.write_table(decision_table(keys, [None] * 8, [None] * 8), path)  # as older work directories have it
    table, position = stage._decided(ctx, "00001")
    assert set(keys[4:]) <= set(position) and table.num_rows == 8
