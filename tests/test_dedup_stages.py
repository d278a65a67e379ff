"""dedup, embed, semdedup and select as stages of a real build over a loopback server."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densefusion_hf.runners.local import build
from densefusion_hf.recipe import load_recipe
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.stages.embed import embedding_paths, load_embeddings
from tests.conftest import write_metadata, write_recipe

PATHS = ["img/astronaut.jpg", "img/chelsea.jpg", "img/coffee.jpg", "img/rocket.jpg", "img/camera.jpg",
         "img/logo.png", "dup/astronaut-copy.jpg", "dup/astronaut-small.jpg", "dup/coffee-crop.jpg",
         "other/astronaut-mirror.jpg", "bad/truncated.jpg"]


@pytest.fixture
def dedup_build(tmp_path, image_server):
    widths = {p: 512.0 for p in PATHS}
    write_metadata(tmp_path / "meta.parquet",
                   [{"URL": f"{image_server}/{p}", "WIDTH": widths[p], "similarity": 0.3 + i / 100}
                    for i, p in enumerate(PATHS)])

    def run(show_progress=False, **sections):
        body = {"name": "dedup-test", "source": {"metadata": ["meta.parquet"], "rows_per_shard": 4},
                "fetch": {"timeout": 5, "threads": 4}, "dedup": {"processes": 1}, **sections}
        recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", body))
        build(recipe, tmp_path / "work", show_progress=show_progress)
        return tmp_path / "work"

    return run


def _drops(workdir, stage):
    return {r["url"].split("/", 3)[3]: r for r in StageDir(workdir, stage).read_dropped().to_pylist()}


def _kept(workdir, stage):
    out = StageDir(workdir, stage)
    return [r for s in out.done_shards() for r in out.read(s).to_pylist()]


def test_exact_and_perceptual_duplicates_are_dropped_with_dup_of(dedup_build):
    workdir = dedup_build(stages=["ingest", "fetch", "dedup"])
    drops = _drops(workdir, "dedup")
    kept = {r["url"].split("/", 3)[3]: r for r in _kept(workdir, "dedup")}
    # astronaut, its byte-identical copy and its 256-px copy form one group. The keep rule (most pixels,
    # then highest similarity, then key) keeps the copy: 512 px like the original, similarity 0.36 > 0.30.
    assert set(drops) == {"img/astronaut.jpg", "dup/astronaut-small.jpg", "dup/coffee-crop.jpg"}
    winner = kept["dup/astronaut-copy.jpg"]["key"]
    assert drops["img/astronaut.jpg"]["reason"] == "exact_dup" and drops["img/astronaut.jpg"]["dup_of"] == winner
    assert drops["dup/astronaut-small.jpg"]["reason"] == "near_dup"
    assert drops["dup/astronaut-small.jpg"]["dup_of"] == winner
    assert drops["dup/coffee-crop.jpg"]["reason"] == "near_dup"
    assert drops["dup/coffee-crop.jpg"]["dup_of"] == kept["img/coffee.jpg"]["key"]  # the larger image
    assert "other/astronaut-mirror.jpg" in kept  # a mirrored image is a different image
    assert all(len(r["phash"]) == 16 for r in kept.values())


def test_dedup_rule_prefers_resolution_then_similarity(dedup_build):
    workdir = dedup_build(stages=["ingest", "fetch", "dedup"], dedup={"processes": 1, "perceptual": False})
    drops = _drops(workdir, "dedup")
    # Only exact duplicates without perceptual hashing: same pixels, so the higher similarity wins
    # (the copy is listed later with similarity 0.36 > 0.30).
    assert set(drops) == {"img/astronaut.jpg"}
    assert drops["img/astronaut.jpg"]["reason"] == "exact_dup"


def test_embed_writes_clip_retrieval_layout_and_select_runs(dedup_build):
    workdir = dedup_build(
        embed={"model": "sample:tiny-clip", "batch_size": 3},
        semdedup={"clusters": 3, "eps": 0.0005},
        select={"min_short_side": 400, "top_per_cluster": 2, "target_size": 4,
                "categories": [{"name": "animal", "prompts": ["a photo of a cat"]},
                               {"name": "text", "prompts": ["a sign with text"], "max_share": 0.5}],
                "category_threshold": -1.0},
    )
    embed = StageDir(workdir, "embed")
    for shard in embed.done_shards():
        emb_path, meta_path = embedding_paths(workdir, shard)
        vectors = np.load(emb_path)
        meta = pq.read_table(meta_path)
        assert vectors.dtype == np.float16 and vectors.shape == (meta.num_rows, 32)
        assert meta.column_names == ["key", "url", "caption"]
        assert np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=1e-2)
        assert meta.column("key").to_pylist() == embed.read(shard).column("key").to_pylist()
    keys, vectors = load_embeddings(workdir, embed.done_shards())
    assert len(keys) == len(set(keys)) == vectors.shape[0]

    chosen = _kept(workdir, "select")
    assert 0 < len(chosen) <= 4
    assert all(r["category"] in ("animal", "text") and r["cluster_rank"] < 2 for r in chosen)
    assert sum(r["category"] == "text" for r in chosen) <= 2
    summary = json.loads((workdir / "select" / "summary.json").read_text())
    assert summary["rows_selected"] == len(chosen)
    assert sum(count for _, count in summary["cluster_sizes"]) <= 3
    select_drops = _drops(workdir, "select")
    assert select_drops["img/chelsea.jpg"]["reason"] == "too_small"  # 451x300 < 400 on the short side
    assert "decoded 451x300" in select_drops["img/chelsea.jpg"]["detail"]
    assert {r["reason"] for r in select_drops.values()} <= {"too_small", "cluster_rank", "target_size",
                                                            "category_quota"}
    assert (workdir / "dataset" / "README.md").exists()


def test_every_pass_over_the_shards_has_a_progress_bar(dedup_build, capsys):
    # The passes before a global decision (reading the metadata, hashing, assigning to centroids, the
    # within-cluster search) are most of their stage's time: each counts its shards as they finish.
    dedup_build(show_progress=True, stages=["ingest", "fetch", "dedup", "embed", "semdedup"],
                embed={"model": "sample:tiny-clip"}, semdedup={"clusters": 3, "eps": 0.0005})
    err = capsys.readouterr().err
    for bar, done in (("ingest: read", "3/3"), ("ingest: repeated URLs", "1/1"), ("ingest", "3/3"),
                      ("fetch", "3/3"), ("dedup: hash", "3/3"), ("dedup", "3/3"), ("semdedup: assign", "3/3"),
                      ("semdedup: search", "1/1"), ("semdedup", "3/3")):
        assert any(line.startswith(f"{bar}: 100%") and f"| {done} " in line
                   for line in err.replace("\r", "\n").splitlines()), (bar, err[-2000:])


def test_seeded_rerun_selects_the_same_keys(dedup_build, tmp_path):
    sections = dict(embed={"model": "sample:tiny-clip"}, semdedup={"clusters": 3, "eps": 0.0005, "seed": 3},
                    select={"top_per_cluster": 2, "subset": {"size": 3, "seed": 7}})
    first = sorted(r["key"] for r in _kept(dedup_build(**sections), "select"))
    build(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "work", fresh=True, show_progress=False)
    second = sorted(r["key"] for r in _kept(tmp_path / "work", "select"))
    assert first == second and len(first) == 3


def test_an_unreadable_image_is_recorded_not_fatal(dedup_build, tmp_path):
    workdir = dedup_build(stages=["ingest", "fetch"])
    fetch = StageDir(workdir, "fetch")
    table = fetch.read("00000", memory_map=False)
    images = table.column("image").to_pylist()
    images[0] = images[0][:40]  # damaged on disk after the download
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, fetch.shard_path("00000"))
    # Committed again as it now is (the done marker records the files' checksums): an image that passed fetch's
    # checks but that a later stage cannot decode, not a damaged shard, which would be fetched again.
    fetch.finish("00000", pq.read_table(fetch.dropped_path("00000")).to_pylist(), fetch.stats("00000"))
    damaged = table.column("url").to_pylist()[0]

    dedup_build(embed={"model": "sample:tiny-clip"}, semdedup={"clusters": 2, "eps": 0.0005},
                dedup={"processes": 1, "exact": False})
    embed_drops = StageDir(workdir, "embed").read_dropped().to_pylist()
    assert [(d["url"], d["reason"]) for d in embed_drops] == [(damaged, "undecodable")]
    hashes = {r["url"]: r["phash"] for r in _kept(workdir, "dedup")}
    assert hashes[damaged] is None and all(h for u, h in hashes.items() if u != damaged)
    assert damaged not in {r["url"] for r in _kept(workdir, "select")}


def test_a_shard_emptied_by_dedup_flows_through_every_later_stage(tmp_path, image_server):
    # Shard 1 holds only copies of shard 0's astronaut (same bytes under other URLs): dedup empties it.
    rows = [{"URL": f"{image_server}/img/astronaut.jpg", "similarity": 0.9},
            {"URL": f"{image_server}/img/coffee.jpg"},
            {"URL": f"{image_server}/img/astronaut.jpg?copy=1", "similarity": 0.1},
            {"URL": f"{image_server}/img/astronaut.jpg?copy=2", "similarity": 0.1},
            {"URL": f"{image_server}/img/rocket.jpg"}]
    write_metadata(tmp_path / "meta.parquet", rows)
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "name": "empty-shard", "source": {"metadata": ["meta.parquet"], "rows_per_shard": 2},
        "fetch": {"timeout": 5}, "dedup": {"processes": 1}, "embed": {"model": "sample:tiny-clip"},
        "semdedup": {"clusters": 2, "eps": 0.0005},
        "select": {"top_per_cluster": 5, "categories": [{"name": "any", "prompts": ["a photo"]}],
                   "category_threshold": -1.0}}))
    workdir = tmp_path / "work"
    build(recipe, workdir, show_progress=False)
    assert StageDir(workdir, "dedup").stats("00001")["rows_out"] == 0
    assert np.load(embedding_paths(workdir, "00001")[0]).shape[0] == 0
    published = [r for f in sorted((workdir / "dataset" / "empty-shard").glob("*.parquet"))
                 for r in pq.read_table(f).to_pylist()]
    assert sorted(r["url"].rsplit("/", 1)[1] for r in published) == ["astronaut.jpg", "coffee.jpg", "rocket.jpg"]
    # Only fetch keeps image bytes; the stages after it carry the small columns.
    for stage in ("dedup", "embed", "semdedup", "select"):
        out = StageDir(workdir, stage)
        assert all("image" not in pq.read_schema(out.shard_path(s)).names for s in out.done_shards()), stage
