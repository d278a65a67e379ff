"""fetch through real img2dataset from a loopback server: successes, and every failure with its reason."""

import io

from PIL import Image

from densefusion_hf.keys import url_key
from densefusion_hf.runners.local import build
from densefusion_hf.recipe import load_recipe
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_metadata, write_recipe

FAILURES = {
    "gone/missing.jpg": ("failed_to_download", "404"),
    "bad/empty.jpg": (None, None),        # reason depends on the resize policy, checked below
    "bad/truncated.jpg": (None, None),
    "bad/page.jpg": (None, None),
}
GOOD = ["img/astronaut.jpg", "img/chelsea.jpg", "img/coffee.jpg", "img/rocket.jpg", "img/logo.png"]


def _build(tmp_path, server, fetch: dict, rows_per_shard: int = 4):
    urls = [f"{server}/{path}" for path in GOOD + list(FAILURES)]
    write_metadata(tmp_path / "meta" / "part-0.parquet", [{"URL": u, "TEXT": f"alt {i}"} for i, u in enumerate(urls)])
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "name": "fetch-test", "stages": ["ingest", "fetch"],
        "source": {"metadata": ["meta/*.parquet"], "rows_per_shard": rows_per_shard},
        "fetch": {"timeout": 5, "threads": 4, **fetch},
    }))
    workdir = tmp_path / "work"
    build(recipe, workdir, show_progress=False)
    return workdir, urls


def _rows(workdir):
    out = StageDir(workdir, "fetch")
    return [row for shard in out.done_shards() for row in out.read(shard).to_pylist()]


def _drops(workdir):
    return {row["url"].split("/", 3)[3]: row for row in StageDir(workdir, "fetch").read_dropped().to_pylist()}


def test_keep_original_bytes_records_every_failure(tmp_path, image_server, photo_files):
    workdir, urls = _build(tmp_path, image_server, {})
    rows = _rows(workdir)
    assert sorted(r["url"] for r in rows) == sorted(urls[: len(GOOD)])
    for row in rows:
        path = row["url"].split("/", 3)[3]
        assert row["image"] == photo_files[path]  # the original bytes, untouched
        assert row["key"] == url_key(row["url"])
        with Image.open(io.BytesIO(row["image"])) as image:
            assert (row["width"], row["height"]) == image.size
    assert {r["image_format"] for r in rows} == {"JPEG", "PNG"}

    drops = _drops(workdir)
    assert set(drops) == set(FAILURES)
    assert drops["gone/missing.jpg"]["reason"] == "failed_to_download"
    assert "404" in drops["gone/missing.jpg"]["detail"]
    assert drops["bad/empty.jpg"] == dict(drops["bad/empty.jpg"], reason="undecodable", detail="empty file (0 bytes)")
    assert drops["bad/truncated.jpg"]["reason"] == "undecodable"
    assert "truncated" in drops["bad/truncated.jpg"]["detail"]
    assert drops["bad/page.jpg"]["reason"] == "undecodable"
    assert "HTML" in drops["bad/page.jpg"]["detail"]


def test_resize_policy_caps_the_longer_side_and_records_decode_failures(tmp_path, image_server):
    workdir, urls = _build(tmp_path, image_server, {"resize": {"max_side": 300}, "encode_quality": 80})
    rows = _rows(workdir)
    assert len(rows) == len(GOOD)
    for row in rows:
        assert max(row["width"], row["height"]) <= 300
        assert max(row["original_width"], row["original_height"]) > 300  # every test photo was larger
        with Image.open(io.BytesIO(row["image"])) as image:
            assert image.size == (row["width"], row["height"])
    drops = _drops(workdir)
    assert drops["gone/missing.jpg"]["reason"] == "failed_to_download"
    for path in ("bad/empty.jpg", "bad/truncated.jpg", "bad/page.jpg"):
        assert drops[path]["reason"] in ("failed_to_resize", "undecodable"), drops[path]
        assert drops[path]["detail"]


def test_stats_carry_img2dataset_counts(tmp_path, image_server):
    workdir, urls = _build(tmp_path, image_server, {}, rows_per_shard=100)
    stats = StageDir(workdir, "fetch").all_stats()
    assert len(stats) == 1
    (s,) = stats
    assert s["rows_in"] == len(urls)
    assert s["rows_out"] + s["rows_dropped"] == s["rows_in"]
    assert s["img2dataset"]["count"] == len(urls)
    assert s["img2dataset"]["failed_to_download"] == 1
    assert s["dropped"] == {"failed_to_download": 1, "undecodable": 3}


def test_rows_keep_input_order_across_shards_and_download_processes(tmp_path, image_server):
    # Two processes: img2dataset splits each of our shards in two parts, which fetch merges in input order.
    workdir, urls = _build(tmp_path, image_server, {"processes": 2}, rows_per_shard=5)
    kept = [r["url"] for r in _rows(workdir)]
    assert kept == [u for u in urls if u in kept]
