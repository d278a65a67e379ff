"""The memory a global stage's decision takes per row, measured at two sizes: it must stay within what the
README states (the driver holds small columns of every row, so this is what limits a build's size)."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from densefusion_hf.stages.semdedup import ASSIGN_SCHEMA
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_recipe

# Bounds on the bytes per row on the driver: the README's measured figures with room for the allocator's noise.
STATED = {"dedup": 320, "semdedup": 100, "select": 500}
ROWS_PER_SHARD = 5000

MEASURE = r"""
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa
from densefusion_hf.recipe import load_recipe
from densefusion_hf.stages.base import BuildContext
from densefusion_hf.stages.dedup import Dedup
from densefusion_hf.stages.semdedup import SemDedup
from densefusion_hf.stages.select import Select

stage = {"dedup": Dedup, "semdedup": SemDedup, "select": Select}[sys.argv[1]]()
ctx = BuildContext(load_recipe(sys.argv[2]), Path(sys.argv[3]), show_progress=False)
source = ctx.stage_dir(sys.argv[4])
ctx.stage_dir(stage.name).prepare()
tracemalloc.start()
decision = stage.decide(ctx, source, source.done_shards())
python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rows": decision.num_rows, "bytes": python_peak + pa.default_memory_pool().max_memory()}))
"""


def _write(workdir, stage, table):
    out = StageDir(workdir, stage)
    out.prepare()
    for i, start in enumerate(range(0, table.num_rows, ROWS_PER_SHARD)):
        shard = f"{i:05d}"
        part = table.slice(start, ROWS_PER_SHARD)
        with out.writer(shard, part.schema) as writer:
            writer.write(part)
        out.finish(shard, [], {"rows_in": part.num_rows, "rows_out": part.num_rows})


def _inputs(workdir, n):
    rng = np.random.default_rng(n)
    keys = pa.array([f"{k:024x}" for k in rng.integers(0, 2**62, n)])
    rows = pa.table({
        "key": keys, "url": pa.array([f"http://images.example/{i}/photo.jpg" for i in range(n)]),
        "text": pa.array(["an alt text of a few words"] * n),
        "sha256": pa.array([f"{a:032x}{b:032x}" for a, b in rng.integers(0, 2**62, (n, 2))]),
        "width": pa.array(rng.integers(300, 2000, n)), "height": pa.array(rng.integers(300, 2000, n)),
        "similarity": pa.array(rng.uniform(0.2, 0.4, n)), "punsafe": pa.array(rng.uniform(0, 0.5, n)),
        "pwatermark": pa.array(rng.uniform(0, 0.5, n)),
    })
    _write(workdir, "fetch", rows)
    _write(workdir, "dedup/measure", pa.table({"key": keys, "phash": [f"{h:016x}" for h in
                                                                      rng.integers(0, 2**63, n)]}))
    _write(workdir, "dedup", rows)
    assigned = pa.table({"key": keys, "cluster": pa.array(rng.integers(0, 50, n)),
                         "centroid_similarity": pa.array(rng.uniform(0.5, 1, n), pa.float32())}, schema=ASSIGN_SCHEMA)
    _write(workdir, "semdedup/measure", assigned)
    (workdir / "semdedup" / "groups").mkdir(parents=True)
    _write(workdir, "semdedup", pa.Table.from_arrays(rows.columns + assigned.columns[1:],
                                                     rows.column_names + ["cluster", "centroid_similarity"]))


def _measure(tmp_path, stage, upstream, n):
    workdir = tmp_path / f"n{n}"
    if not workdir.exists():
        _inputs(workdir, n)
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "memory", "source": {"metadata": ["m.parquet"]}, "embed": {"model": "sample:tiny-clip"},
        "stages": ["ingest", "fetch", "dedup", "embed", "semdedup", "select"],
        "dedup": {"threshold": 4}, "semdedup": {"clusters": 50}, "select": {"top_per_cluster": 100}})
    done = subprocess.run([sys.executable, "-c", MEASURE, stage, str(recipe), str(workdir), upstream],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["rows"] == n
    return found["bytes"]


@pytest.mark.parametrize("stage,upstream", [("dedup", "fetch"), ("semdedup", "dedup"), ("select", "semdedup")])
def test_a_decision_takes_no_more_memory_per_row_than_stated(tmp_path, stage, upstream):
    small, large = 10_000, 40_000
    per_row = (_measure(tmp_path, stage, upstream, large) - _measure(tmp_path, stage, upstream, small)) / (large - small)
    print(f"{stage}: {per_row:.0f} B per row")
    assert 0 < per_row <= STATED[stage], f"{stage} takes {per_row:.0f} B per row, stated {STATED[stage]}"
