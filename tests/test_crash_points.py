"""Crashes at any instant: a real demo build killed with SIGKILL at seeded instants in every stage, each killed
build rerun to completion and compared with an uninterrupted build's published files; the same with the Ray
runner, its driver and its workers killed.  ``DF_HF_CRASH_KILLS`` (default 20) and ``DF_HF_CRASH_SEED``
(default 0) set the count and the seed for a longer local run; the harness is
``densefusion_hf.testing.crash_points``."""

from __future__ import annotations

import os

import pytest

from densefusion_hf.recipe import STAGE_ORDER
from densefusion_hf.testing.crash_points import (WORKER_TITLES, Comparison, compare, describe, published_files,
                                                 run_crash_points)
from tests.conftest import DEMO_RECIPE, write_recipe

KILLS = int(os.environ.get("DF_HF_CRASH_KILLS", "20"))
SEED = int(os.environ.get("DF_HF_CRASH_SEED", "0"))


@pytest.fixture(scope="module")
def crash_root(tmp_path_factory):
    """The harness's folder, shared by the tests here: the reference build and the per-stage prefix states
    are made once."""
    root = tmp_path_factory.mktemp("crash")
    # The demo, cheaper per rerun: two shards a stage instead of three, and no OCR model to load (captions
    # from the alt text); every stage still runs, caption in several chunks a shard.
    recipe = write_recipe(root / "recipe.yaml", {
        "extends": str(DEMO_RECIPE),
        "source": {"rows_per_shard": 17},
        "caption": {"experts": {"ocr": {"engine": None}}, "rows_per_chunk": 4},
    })
    return recipe, root / "run"


def _check(kills, expected_kills):
    assert len(kills) >= expected_kills
    failures = [f"{k.workdir}: {describe(k)} (log {k.log})" for k in kills if not k.ok]
    assert not failures, "\n".join(failures)
    assert all(k.comparison.rows == 18 for k in kills)  # the demo's target size, every row published once


def test_sigkill_in_every_stage_then_a_rerun_publishes_the_uninterrupted_rows(crash_root):
    recipe, root = crash_root
    kills = run_crash_points(recipe, root, kills=KILLS, seed=SEED)
    _check(kills, KILLS)
    landed = {k.landed for k in kills}
    assert set(STAGE_ORDER) <= landed, f"no kill came while these stages ran: {set(STAGE_ORDER) - landed}"


def test_ray_driver_and_workers_killed_then_the_rerun_publishes_the_uninterrupted_rows(crash_root):
    pytest.importorskip("ray")
    recipe, root = crash_root
    kills = run_crash_points(recipe, root, kills=2, seed=SEED, runner="ray", worker_kills=1)
    _check(kills, 3)
    workers = [k for k in kills if k.kind == "worker"]
    assert len(workers) == 1 and workers[0].killed.split(" ", 1)[1].startswith(WORKER_TITLES), workers


def test_the_comparison_names_lost_duplicated_and_changed_rows(crash_root, tmp_path):
    """The check itself: a published folder with a row removed, one repeated and one altered is told apart
    from the reference, row by row and file by file."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    recipe, root = crash_root
    run_crash_points(recipe, root, kills=0)  # the reference and prefix states only (made once)
    reference = root / "reference"
    damaged = tmp_path / "work"
    shutil.copytree(reference / "dataset", damaged / "dataset")
    card = damaged / "dataset" / "README.md"  # it names the folder it was built in, as a rebuild's would
    card.write_text(card.read_text().replace(str(reference), str(damaged)))
    assert compare(reference, damaged) == Comparison(rows=18)
    first = sorted((damaged / "dataset").glob("*/*.parquet"))[0]
    rows = pq.read_table(first).to_pylist()
    lost, repeated, altered = rows[0]["key"], rows[1]["key"], rows[2]["key"]
    rows[2]["caption"] += " (edited)"
    rows = rows[1:] + [rows[1]]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(first)), first)
    result = compare(reference, damaged)
    assert not result.identical
    assert (result.lost, result.duplicated, result.changed, result.extra) == ([lost], [repeated], [altered], [])
    assert result.files == [first.relative_to(damaged / "dataset").as_posix()]
    assert set(published_files(damaged)) == set(published_files(reference))
