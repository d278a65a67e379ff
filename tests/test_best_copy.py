"""The best copy of a duplicate is the one kept: most pixels, then least compressed, then similarity, then key."""

import io

import numpy as np
import pytest
from PIL import Image

from densefusion_hf.dedup.fidelity import fidelity
from densefusion_hf.dedup.semantic import choose_kept
from densefusion_hf.keys import url_key
from densefusion_hf.netguard.addresses import ALLOW_ENV
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.sample.server import SampleServer
from densefusion_hf.stages.dedup import fidelity_ranks, keep_order
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_metadata, write_recipe


@pytest.fixture(scope="module")
def photo():
    from skimage import data
    return Image.fromarray(data.chelsea())  # 451 x 300


def encode(image, side=None, fmt="JPEG", **options):
    if side:
        image = image.resize((side, side * image.height // image.width))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("quality", [20, 30, 50, 75, 90, 95])
def test_jpeg_quality_is_estimated_from_the_quantisation_tables(photo, quality):
    assert fidelity(encode(photo, quality=quality))[1] == pytest.approx(quality, abs=1.5)


def test_lossless_beats_any_jpeg_and_bytes_per_pixel_orders_within_a_format(photo):
    png = fidelity(encode(photo, fmt="PNG", compress_level=1))
    assert png > fidelity(encode(photo, quality=98))
    assert png > fidelity(encode(photo.quantize(16).convert("RGB"), fmt="PNG", compress_level=1))
    assert fidelity(b"") == fidelity(b"not an image") == (0, 0.0, 0.0)


def _keep(copies):
    """Index kept among ``copies`` = [(bytes, similarity, key)], all one group."""
    pixels, quality = [], []
    for data, _, _ in copies:
        with Image.open(io.BytesIO(data)) as image:
            pixels.append(image.width * image.height)
        quality.append(fidelity(data))
    rank = keep_order(np.array(pixels), np.array([c[1] for c in copies]), [c[2] for c in copies],
                      fidelity_ranks(np.array(quality)))
    keep, _ = choose_kept(np.zeros(len(copies), dtype=np.int64), -rank)
    return int(np.flatnonzero(keep)[0])


def test_keep_rule_over_copies_at_several_sizes_and_qualities(photo):
    q30, q60, q90 = (encode(photo, quality=q) for q in (30, 60, 90))
    small_q95 = encode(photo, side=300, quality=95)
    # same pixels: the least compressed wins over a higher similarity and a smaller key
    assert _keep([(q30, 0.9, "a"), (q60, 0.5, "b"), (q90, 0.4, "c"), (small_q95, 0.99, "d")]) == 2
    # more pixels wins over quality
    big_q40 = encode(photo, side=600, quality=40)
    assert _keep([(q90, 0.9, "a"), (big_q40, 0.1, "b")]) == 1
    # a lossless copy wins over the best JPEG of the same size
    assert _keep([(q90, 0.9, "a"), (encode(photo, fmt="PNG"), 0.1, "b")]) == 1
    # equal copies: similarity, then key
    assert _keep([(q60, 0.3, "b"), (q60, 0.5, "c")]) == 1
    assert _keep([(q60, 0.5, "c"), (q60, 0.5, "b")]) == 1


def test_dedup_stage_keeps_the_quality_90_original_over_its_quality_30_copy(tmp_path, photo, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    copies = {"q30.jpg": (encode(photo, quality=30), 0.9), "q90.jpg": (encode(photo, quality=90), 0.3),
              "q60.jpg": (encode(photo, quality=60), 0.5), "small.jpg": (encode(photo, side=300, quality=95), 0.95)}
    for name, (body, _) in copies.items():
        (served / name).write_bytes(body)
    with SampleServer(served) as server:
        monkeypatch.setenv(ALLOW_ENV, server.address.split("//", 1)[1])
        write_metadata(tmp_path / "meta.parquet", [{"URL": f"{server.address}/{name}", "similarity": sim}
                                                   for name, (_, sim) in copies.items()])
        recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
            "name": "best-copy", "stages": ["ingest", "fetch", "dedup"],
            "source": {"metadata": ["meta.parquet"], "rows_per_shard": 2},
            "fetch": {"timeout": 5, "threads": 2}, "dedup": {"processes": 1}}))
        build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "dedup")
    kept = [r["url"].rsplit("/", 1)[1] for s in out.done_shards() for r in out.read(s, columns=["url"]).to_pylist()]
    assert kept == ["q90.jpg"]
    drops = {r["url"].rsplit("/", 1)[1]: r for r in out.read_dropped().to_pylist()}
    assert set(drops) == {"q30.jpg", "q60.jpg", "small.jpg"}
    assert {d["dup_of"] for d in drops.values()} == {url_key(f"{server.address}/q90.jpg")}
