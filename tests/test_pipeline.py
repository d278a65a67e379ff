"""The stage contract: resume, change detection, --fresh, --only, locking, and every row accounted for."""

import fcntl

import pyarrow.parquet as pq
import pytest

from densefusion_hf.errors import UserError
from densefusion_hf.runners.manifest import Manifest
from densefusion_hf.runners.local import build
from densefusion_hf.recipe import load_recipe
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_metadata, write_recipe

PHOTOS = ["img/astronaut.jpg", "img/chelsea.jpg", "img/coffee.jpg", "img/rocket.jpg", "gone/x.jpg"]


@pytest.fixture
def small(tmp_path, image_server):
    """(recipe writer, workdir): a 5-row recipe over the loopback server, 2 rows per shard."""
    write_metadata(tmp_path / "meta.parquet", [{"URL": f"{image_server}/{p}"} for p in PHOTOS])

    def recipe(**changes):
        body = {"name": "small", "source": {"metadata": ["meta.parquet"], "rows_per_shard": 2},
                "fetch": {"timeout": 5, "threads": 2}, "publish": {"min_shards": 2}}
        for section, values in changes.items():
            body[section] = {**body.get(section, {}), **values} if isinstance(values, dict) else values
        return load_recipe(write_recipe(tmp_path / "recipe.yaml", body))

    return recipe, tmp_path / "work"


def _mtimes(workdir, stage):
    pattern = "train-*.parquet" if stage.startswith("dataset") else "shard-?????.parquet"
    return {p.name: p.stat().st_mtime_ns for p in (workdir / stage).glob(pattern)}


def test_rerun_skips_finished_shards_and_changes_nothing(small):
    recipe, workdir = small
    build(recipe(), workdir, show_progress=False)
    stages = ("ingest", "fetch", "dedup", "select", "dataset/small")
    before = {s: _mtimes(workdir, s) for s in stages}
    before["decision"] = (workdir / "dedup" / "decision.parquet").stat().st_mtime_ns
    assert len(before["fetch"]) == 3 and len(before["dataset/small"]) == 2
    build(recipe(), workdir, show_progress=False)
    after = {s: _mtimes(workdir, s) for s in stages}
    after["decision"] = (workdir / "dedup" / "decision.parquet").stat().st_mtime_ns
    assert after == before


def test_output_affecting_change_is_refused_until_fresh(small):
    recipe, workdir = small
    build(recipe(), workdir, show_progress=False)
    with pytest.raises(UserError) as info:
        build(recipe(fetch={"resize": {"max_side": 256}}), workdir, show_progress=False)
    message = str(info.value)
    assert "stage 'fetch'" in message and "resize_max_side: None -> 256" in message and "--fresh" in message
    rows = build(recipe(fetch={"resize": {"max_side": 256}}), workdir, fresh=True, show_progress=False)
    assert set(rows) == {"ingest", "fetch", "dedup", "select", "publish"}
    fetched = [r for s in StageDir(workdir, "fetch").done_shards() for r in StageDir(workdir, "fetch").read(s).to_pylist()]
    assert fetched and all(max(r["width"], r["height"]) <= 256 for r in fetched)


def test_upstream_change_makes_downstream_stale(small):
    recipe, workdir = small
    build(recipe(), workdir, show_progress=False)
    with pytest.raises(UserError, match="stage 'ingest'.*rows_per_shard: 2 -> 3"):
        build(recipe(source={"rows_per_shard": 3}), workdir, show_progress=False)
    # Only publish settings changed: ingest and fetch are still valid, publish is refused.
    with pytest.raises(UserError, match="stage 'publish'.*min_shards: 2 -> 1"):
        build(recipe(publish={"min_shards": 1}), workdir, show_progress=False)
    build(recipe(publish={"min_shards": 1}), workdir, only="publish", fresh=True, show_progress=False)
    files = sorted((workdir / "dataset" / "small").glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00001.parquet"]
    assert pq.read_metadata(files[0]).num_rows == 4


def test_settings_that_do_not_change_output_do_not_block_resume(small):
    recipe, workdir = small
    build(recipe(), workdir, show_progress=False)
    before = {s: _mtimes(workdir, s) for s in ("ingest", "fetch", "dedup", "select")}
    build(recipe(fetch={"threads": 7, "timeout": 9.0, "retries": 2}, dedup={"processes": 1}), workdir,
          show_progress=False)
    assert {s: _mtimes(workdir, s) for s in ("ingest", "fetch", "dedup", "select")} == before


def test_a_decision_made_with_other_settings_is_not_reused(small):
    recipe, workdir = small
    build(recipe(), workdir, only="ingest,fetch,dedup", show_progress=False)
    for marker in (workdir / "dedup").glob("shard-*.done"):  # killed after deciding, before any shard
        marker.unlink()
    assert (workdir / "dedup" / "decision.parquet").exists()
    with pytest.raises(UserError, match="stage 'dedup'.*threshold: 8 -> 4"):
        build(recipe(dedup={"threshold": 4}), workdir, show_progress=False)
    assert Manifest(workdir).data["stages"]["dedup"]["params"]["threshold"] == 8  # the refusal changed nothing


def test_publish_will_not_replace_a_folder_it_did_not_write(small, tmp_path):
    recipe, workdir = small
    target = tmp_path / "my-clone"
    target.mkdir()
    (target / ".git").mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds files publish did not write.*notes.txt"):
        build(recipe(publish={"output": str(target)}), workdir, show_progress=False)
    assert (target / "notes.txt").read_text() == "keep me"


def test_only_needs_complete_upstream(small):
    recipe, workdir = small
    with pytest.raises(UserError, match="reads the output of 'select'.*--only select,publish"):
        build(recipe(), workdir, only="publish", show_progress=False)
    with pytest.raises(UserError, match="unknown stage caption"):
        build(recipe(), workdir, only="caption", show_progress=False)
    build(recipe(), workdir, only="ingest", show_progress=False)
    assert Manifest(workdir).stage("ingest")["complete"] and Manifest(workdir).stage("fetch") is None
    with pytest.raises(UserError, match="'dedup' reads the output of 'fetch'"):
        build(recipe(), workdir, only="dedup", show_progress=False)
    build(recipe(), workdir, only="fetch,dedup,select,publish", show_progress=False)
    assert (workdir / "dataset" / "README.md").exists()


def test_every_source_row_is_kept_or_dropped_with_a_reason(small):
    recipe, workdir = small
    build(recipe(filters={"min_similarity": 0.5}), workdir, show_progress=False)
    ingest = StageDir(workdir, "ingest")
    assert sum(s["rows_in"] for s in ingest.all_stats()) == len(PHOTOS)
    assert {r["reason"] for r in ingest.read_dropped().to_pylist()} == {"low_similarity"}
    assert sum(s["rows_out"] for s in ingest.all_stats()) == 0


def test_a_second_build_in_the_same_workdir_is_refused(small):
    recipe, workdir = small
    workdir.mkdir(parents=True)
    with open(workdir / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="Another build is running"):
            build(recipe(), workdir, show_progress=False)


def test_foreign_folder_is_not_used_as_workdir(small, tmp_path):
    recipe, _ = small
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not a densefusion-hf work directory"):
        build(recipe(), foreign, show_progress=False)


def test_missing_metadata_column_names_the_recipe_field(tmp_path):
    write_metadata(tmp_path / "meta.parquet", [{"URL": "http://127.0.0.1:9/x.jpg"}])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {
        "name": "cols", "source": {"metadata": ["meta.parquet"], "columns": {"text": "caption"}}}))
    with pytest.raises(UserError, match=r"no column 'caption'.*source.columns.text.*Its columns are: .*URL.*to the right name\.$"):
        build(recipe, tmp_path / "work", show_progress=False)


def test_glob_matching_nothing_is_explained(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {"name": "g", "source": {"metadata": ["none/*.parquet"]}}))
    with pytest.raises(UserError, match="matches no file"):
        build(recipe, tmp_path / "work", show_progress=False)


def test_repeated_urls_are_found_the_same_over_many_key_ranges(tmp_path, monkeypatch, capsys):
    # At scale the keys are split into ranges deduplicated in turn (bounded memory); here 60 keys in ranges
    # of 5 must keep exactly the rows one range keeps: the first row of each URL, in the metadata's order.
    import random

    from densefusion_hf.stages import ingest

    rng = random.Random(7)
    urls = [f"https://images.example/{rng.randrange(25)}.jpg" for _ in range(60)]
    write_metadata(tmp_path / "meta.parquet", [{"URL": u, "TEXT": f"row {i}"} for i, u in enumerate(urls)])
    body = {"name": "ranges", "source": {"metadata": ["meta.parquet"], "rows_per_shard": 7}}
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", body))

    def ingested(workdir):
        out = StageDir(workdir, "ingest")
        kept = [(r["url"], r["text"]) for s in out.done_shards() for r in out.read(s).to_pylist()]
        dropped = sorted((r["url"], r["reason"]) for r in out.read_dropped().to_pylist())
        return kept, dropped

    build(recipe, tmp_path / "one", only="ingest", show_progress=False)
    monkeypatch.setattr(ingest, "KEYS_PER_PARTITION", 5)
    build(recipe, tmp_path / "many", only="ingest", show_progress=True)
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(b.startswith("ingest: repeated URLs: 100%") and "| 12/12 " in b for b in bars)  # 12 ranges
    assert ingested(tmp_path / "many") == ingested(tmp_path / "one")
    first = {}
    for i, url in enumerate(urls):
        first.setdefault(url, i)
    kept, dropped = ingested(tmp_path / "many")
    assert kept == [(u, f"row {i}") for i, u in enumerate(urls) if first[u] == i]
    assert dropped == sorted((u, "duplicate_url") for i, u in enumerate(urls) if first[u] != i)
