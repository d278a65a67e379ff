"""Small pieces: keys, image checks, metadata filters, sharding of the source, the sample server."""

import urllib.request

import pytest

from densefusion_hf.images import UnreadableImage, inspect_image
from densefusion_hf.keys import url_key
from densefusion_hf.runners.local import build
from densefusion_hf.recipe import MetadataFilters, load_recipe
from densefusion_hf.sample.make import write_sample
from densefusion_hf.sample.server import SAMPLE_HOST, SampleServer, proxied_through
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.stages.ingest import filter_reason
from tests.conftest import write_metadata, write_recipe


def test_url_key_is_stable_and_ignores_surrounding_whitespace():
    assert url_key("http://a/b.jpg") == url_key("  http://a/b.jpg\n")
    assert url_key("http://a/b.jpg") != url_key("http://a/c.jpg")
    # Fixed value: keys must never change between releases, or old work directories break.
    assert url_key("http://example.com/cat.jpg") == "d5cf11b6b81ae762933d508c"


def test_inspect_image_reads_size_and_rejects_broken_bytes(photo_files):
    info = inspect_image(photo_files["img/astronaut.jpg"])
    assert (info.width, info.height, info.format) == (512, 512, "JPEG")
    assert inspect_image(photo_files["img/logo.png"]).format == "PNG"
    with pytest.raises(UnreadableImage, match="empty file"):
        inspect_image(b"")
    with pytest.raises(UnreadableImage, match="truncated"):
        inspect_image(photo_files["bad/truncated.jpg"])
    with pytest.raises(UnreadableImage, match="HTML page"):
        inspect_image(photo_files["bad/page.jpg"])
    with pytest.raises(UnreadableImage):
        inspect_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


@pytest.mark.parametrize("row, reason", [
    ({"width": 100, "height": 800}, "too_small"),
    ({"width": 2000, "height": 400}, "aspect_ratio"),
    ({"width": 800, "height": 800, "punsafe": 0.6}, "unsafe"),
    ({"width": 800, "height": 800, "pwatermark": 0.9}, "watermark"),
    ({"width": 800, "height": 800, "similarity": 0.1}, "low_similarity"),
    ({"width": 800, "height": 600, "similarity": 0.3, "punsafe": 0.1}, None),
    ({"width": None, "height": None, "similarity": None}, None),  # unknown values pass
    ({"width": float("nan"), "height": 300}, None),
])
def test_metadata_filters(row, reason):
    filters = MetadataFilters(min_short_side=256, max_aspect_ratio=3.0, max_punsafe=0.5, max_pwatermark=0.8,
                              min_similarity=0.28)
    got = filter_reason(row, filters)
    assert (got[0] if got else None) == reason
    if got:
        assert got[1]  # the detail names the value that decided it


def test_source_is_sharded_in_order_across_files_with_a_limit(tmp_path):
    for part in range(3):
        write_metadata(tmp_path / "meta" / f"part-{part}.parquet",
                       [{"URL": f"http://h/{part}-{i}.jpg"} for i in range(5)])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {
        "name": "s", "stages": ["ingest"],
        "source": {"metadata": ["meta/part-*.parquet"], "rows_per_shard": 4, "limit": 13}}))
    build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "ingest")
    assert out.done_shards() == ["00000", "00001", "00002", "00003"]
    urls = [u for s in out.done_shards() for u in out.read(s).column("url").to_pylist()]
    expected = [f"http://h/{p}-{i}.jpg" for p in range(3) for i in range(5)][:13]
    assert urls == expected
    assert [out.stats(s)["rows_in"] for s in out.done_shards()] == [4, 4, 4, 1]


def test_keep_columns_are_carried(tmp_path):
    write_metadata(tmp_path / "m.parquet", [{"URL": "http://h/a.jpg", "LICENSE": "cc-by"}])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {
        "name": "k", "stages": ["ingest"], "source": {"metadata": ["m.parquet"], "keep_columns": ["LICENSE"]}}))
    build(recipe, tmp_path / "work", show_progress=False)
    (row,) = StageDir(tmp_path / "work", "ingest").read("00000").to_pylist()
    assert row["LICENSE"] == "cc-by" and row["key"] == url_key("http://h/a.jpg")


def test_sample_is_deterministic_and_served_through_the_proxy(tmp_path):
    first = write_sample(tmp_path / "a").read_bytes()
    assert write_sample(tmp_path / "b").read_bytes() == first
    # urlopen caches its first opener with the proxy settings of that moment: prime it without a proxy.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=2)
    with SampleServer(tmp_path / "a" / "files") as server, proxied_through(server):
        body = urllib.request.urlopen(f"http://{SAMPLE_HOST}/photos/astronaut.jpg", timeout=5).read()
        assert body == (tmp_path / "a" / "files" / "photos" / "astronaut.jpg").read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://{SAMPLE_HOST}/../../etc/passwd", timeout=5)


def test_every_subpackage_is_listed_for_installation():
    import configparser

    from tests.conftest import REPO

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "densefusion_hf").rglob("__init__.py")}
    assert found <= listed, f"add to setup.cfg [options] packages: {sorted(found - listed)}"
