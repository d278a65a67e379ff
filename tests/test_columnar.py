"""The column helpers of the global decisions give what plain Arrow would, in bounded chunks: string columns
past 2 GiB cannot be one Arrow array, so results come ``SLICE`` rows per chunk (made small here)."""

import numpy as np
import pyarrow as pa
import pytest

from densefusion_hf.stages import columnar


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(columnar, "SLICE", 4)


def test_gather_equals_take_across_source_chunks_and_nulls(small_slices):
    rng = np.random.default_rng(3)
    words = [f"w{i}" * (i % 4) or None for i in range(40)]
    values = pa.chunked_array([pa.array(words[a:b], pa.string()) for a, b in ((0, 7), (7, 7), (7, 25), (25, 40))])
    index = rng.integers(-1, 40, 23)
    found = columnar.gather(values, index)
    assert found.to_pylist() == [words[i] if i >= 0 else None for i in index]
    assert max(len(c) for c in found.chunks) <= 4 and found.type == pa.string()
    assert columnar.gather(values, np.zeros(0, np.int64)).to_pylist() == []


def test_at_rows_and_hex_columns_come_in_slices(small_slices):
    placed = columnar.at_rows(10, np.array([7, 2, 9]), pa.array(["a", "b", "c"]))
    assert placed.to_pylist() == [None, None, "b", None, None, None, None, "a", None, "c"]
    assert max(len(c) for c in placed.chunks) <= 4
    numbers = np.array([0, 1, 0xABC, 2**64 - 1, 5, 6], dtype=np.uint64)
    valid = np.array([True, True, True, True, False, True])
    hexes = columnar.uint64_to_hex(numbers, valid, 16)
    assert hexes.to_pylist() == [format(int(v), "016x") if ok else None for v, ok in zip(numbers, valid)]
    assert columnar.uint64_to_hex(np.array([0xABC], np.uint64), np.array([True]), 3).to_pylist() == ["abc"]
    assert [len(c) for c in hexes.chunks] == [4, 2]
    for chunk in hexes.chunks:
        chunk.validate(full=True)


def test_decisions_are_the_same_whatever_the_slice(tmp_path, monkeypatch):
    """dedup, semdedup and select decided with 3-row slices equal the same decisions in one slice."""
    from tests.test_global_memory import _inputs
    from tests.conftest import write_recipe
    from densefusion_hf.recipe import load_recipe
    from densefusion_hf.stages.base import BuildContext
    from densefusion_hf.stages.dedup import Dedup
    from densefusion_hf.stages.select import Select
    from densefusion_hf.stages.semdedup import SemDedup

    _inputs(tmp_path / "w", 60)
    # plant exact copies (a few digests) and near copies (hashes a bit or two apart) among the 60 rows
    from densefusion_hf.stages.shards import StageDir
    fetch, measure = StageDir(tmp_path / "w", "fetch"), StageDir(tmp_path / "w", "dedup/measure")
    shard = fetch.done_shards()[0]
    rows = fetch.read(shard)
    digests = rows.column("sha256").to_pylist()
    rows = rows.set_column(rows.column_names.index("sha256"), "sha256",
                           pa.array([digests[i % 50] for i in range(60)]))
    rows = rows.append_column("image", pa.array([b"not an image %d" % i for i in range(60)], pa.binary()))
    with fetch.writer(shard, rows.schema) as writer:
        writer.write(rows)
    fetch.finish(shard, [], {"rows_in": 60, "rows_out": 60})
    hashes = measure.read(shard)
    near = [format(0xF0F0F0F0F0F0F0F0 ^ (1 << (i % 7)) ^ (3 << (i % 5)), "016x") if i % 3 == 0
            else hashes.column("phash")[i].as_py() for i in range(60)]
    with measure.writer(shard, hashes.schema) as writer:
        writer.write(hashes.set_column(1, "phash", pa.array(near)))
    measure.finish(shard, [], {"rows_in": 60, "rows_out": 60})
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "slices", "source": {"metadata": ["m.parquet"]}, "embed": {"model": "sample:tiny-clip"},
        "stages": ["ingest", "fetch", "dedup", "embed", "semdedup", "select"],
        "dedup": {"threshold": 4}, "semdedup": {"clusters": 5},
        "select": {"top_per_cluster": 3, "min_short_side": 500, "subset": {"size": 5, "seed": 1}}})
    ctx = BuildContext(load_recipe(recipe), tmp_path / "w", show_progress=False)

    def decisions():
        out = []
        for stage, upstream in ((Dedup(), "fetch"), (SemDedup(), "dedup"), (Select(), "semdedup")):
            ctx.stage_dir(stage.name).prepare()
            source = ctx.stage_dir(upstream)
            out.append(stage.decide(ctx, source, source.done_shards()).combine_chunks())
        return out

    whole = decisions()
    monkeypatch.setattr(columnar, "SLICE", 3)
    sliced = decisions()
    for one, other in zip(whole, sliced):
        assert one.equals(other)
    assert {"exact_dup", "near_dup"} <= set(whole[0].column("reason").to_pylist())
    assert set(whole[2].column("reason").to_pylist()) >= {"too_small", "cluster_rank"}
