"""The caption stage on real images from a loopback server: real OCR, the template engine, the dry run,
chunked resume after SIGKILL, and broken images."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from densefusion_hf.runners.local import build
from densefusion_hf.recipe import load_recipe
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.fusion.workers import needs_pixels
from densefusion_hf.stages.caption import Captioner
from tests.conftest import REPO, load_published, run_cli, write_metadata, write_recipe

ROWS = [
    ("text/grand-opening.jpg", "Grand opening &amp;amp; sale <b>today</b> at https://shop.example.com/new"),
    ("img/chelsea.jpg", "Tabby cat   looking at the camera"),
    ("img/coffee.jpg", "Coffee cup, stock photo"),
]


def write_caption_recipe(tmp_path, server, caption: dict, rows=ROWS, **extra) -> Path:
    write_metadata(tmp_path / "meta.parquet",
                   [{"URL": f"{server}/{path}", "TEXT": text} for path, text in rows])
    body = {"name": "caption-test", "source": {"metadata": ["meta.parquet"], "rows_per_shard": 2},
            "fetch": {"timeout": 5, "threads": 4}, "stages": ["ingest", "fetch", "caption", "publish"],
            "caption": caption, **extra}
    return write_recipe(tmp_path / "recipe.yaml", body)


def captioned_rows(workdir):
    out = StageDir(workdir, "caption")
    rows = [r for s in out.done_shards() for r in out.read(s).to_pylist()]
    return {r["url"].split("/", 3)[3]: r for r in rows}


TEMPLATE = {"engine": "template", "experts": {"ocr": {"engine": "rapidocr"}}, "rows_per_chunk": 1}


def test_template_engine_captions_with_real_ocr_and_the_cleaned_alt_text(tmp_path, image_server):
    recipe = load_recipe(write_caption_recipe(tmp_path, image_server, TEMPLATE))
    build(recipe, tmp_path / "work", show_progress=False)
    rows = captioned_rows(tmp_path / "work")
    assert set(rows) == {path for path, _ in ROWS}

    sign = rows["text/grand-opening.jpg"]
    lines = [line["text"] for line in sign["priors"]["ocr"]]
    assert "GRAND OPENING" in lines and "SALE" in lines
    assert all(line["score"] >= 0.8 for line in sign["priors"]["ocr"])
    assert sign["priors"]["alt_text"] == "Grand opening & sale today at"
    assert "\u201cGRAND OPENING\u201d" in sign["caption"] and "unverified" in sign["caption"]

    cat = rows["img/chelsea.jpg"]  # a photograph with no text in it
    assert not any("GRAND" in line["text"] for line in cat["priors"]["ocr"])
    assert "Tabby cat looking at the camera" in cat["caption"]
    for row in rows.values():
        assert row["caption_model"] == "template" and row["prompt_version"] == "structured-v1"
        assert row["caption_words"] == len(row["caption"].split())
        assert row["priors"]["tags"] == [] and row["priors"]["boxes"] == [] and row["priors"]["failures"] == []

    stats = StageDir(tmp_path / "work", "caption").all_stats()
    assert sum(s["rows_out"] for s in stats) == 3
    assert {"decode", "ocr", "prompt", "generate"} <= set(stats[0]["seconds_by_step"])
    assert not (tmp_path / "work" / "caption" / "chunks" / "00000").exists()  # joined, then removed

    published = load_published(tmp_path / "work" / "dataset")
    assert {"caption", "priors", "caption_model", "prompt_version", "caption_words"} <= set(published.column_names)
    assert published.features["priors"]["ocr"].feature["text"] == datasets.Value("string")
    assert published[0]["priors"]["ocr"] == rows[published[0]["url"].split("/", 3)[3]]["priors"]["ocr"]


def test_dry_run_writes_prompts_without_captioning(tmp_path, image_server):
    path = write_caption_recipe(tmp_path, image_server, TEMPLATE)
    workdir = tmp_path / "work"
    build(load_recipe(path), workdir, only="ingest,fetch", show_progress=False)
    result = run_cli("caption", str(path), "--workdir", str(workdir), "--dry-run", "--limit", "2")
    assert result.returncode == 0, result.stderr
    output = workdir / "caption-dry-run" / "prompts.jsonl"
    assert str(output) in result.stdout and "nothing was generated" in result.stdout
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 2
    sign = [line for line in lines if line["url"].endswith("grand-opening.jpg")][0]
    assert sign["prompt_version"] == "perceptual-fusion-v1"
    assert "- GRAND OPENING\n- SALE\n[IMAGE]:" in sign["prompt"]
    assert "[World Knowledge]: Grand opening & sale today at\n" in sign["prompt"]
    assert "[Detection Box]:\nNone\n" in sign["prompt"]  # no detector in this recipe
    assert not StageDir(workdir, "caption").done_shards()


def test_dry_run_needs_the_stages_before_caption(tmp_path, image_server):
    path = write_caption_recipe(tmp_path, image_server, TEMPLATE)
    result = run_cli("caption", str(path), "--workdir", str(tmp_path / "empty"), "--dry-run")
    assert result.returncode == 1
    assert "'fetch', which is not complete" in result.stderr and "--only ingest,fetch" in result.stderr


def test_broken_image_is_dropped_with_its_reason_and_the_rest_captioned(tmp_path, photo_files):
    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", TEMPLATE))
    captioner = Captioner(recipe, tmp_path / "work")
    rows = pa.table({"key": ["a", "b"], "url": ["u/a", "u/b"], "text": ["a sign", None],
                     "image": [photo_files["text/grand-opening.jpg"], photo_files["bad/truncated.jpg"]]})
    captioned, drops, _ = captioner.caption_rows(rows)
    assert captioned.column("key").to_pylist() == ["a"] and "image" not in captioned.column_names
    assert [(d["key"], d["reason"]) for d in drops] == [("b", "undecodable")]
    assert "OSError" in drops[0]["detail"] or "truncated" in drops[0]["detail"].lower()
    assert "\u201cGRAND OPENING\u201d" in captioned.column("caption")[0].as_py()


def test_the_template_engine_with_no_expert_decodes_no_image(tmp_path, photo_files):
    # Nothing looks at the pixels, so none are decoded (fetch decoded every image to the last byte already):
    # bytes that do not decode here go through, captioned from their alt text.
    no_expert = {"engine": "template", "experts": {"ocr": {"engine": None}}, "rows_per_chunk": 1}
    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", no_expert))
    assert not needs_pixels(recipe.caption)
    assert needs_pixels(load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", TEMPLATE)).caption)
    captioner = Captioner(recipe, tmp_path / "work")
    rows = pa.table({"key": ["a", "b"], "url": ["u/a", "u/b"], "text": ["a shop sign", "a lighthouse at dusk"],
                     "image": [photo_files["text/grand-opening.jpg"], photo_files["bad/truncated.jpg"]]})
    captioned, drops, _ = captioner.caption_rows(rows)
    assert drops == [] and captioned.column("key").to_pylist() == ["a", "b"]
    assert "lighthouse at dusk" in captioned.column("caption")[1].as_py()
    assert all(not prior["ocr"] for prior in captioned.column("priors").to_pylist())


def test_an_image_without_text_has_no_ocr_lines(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", TEMPLATE))
    captioner = Captioner(recipe, tmp_path / "work", generate=False)
    gradient = np.tile(np.linspace(40, 220, 640, dtype=np.uint8), (360, 1))
    buf = io.BytesIO()
    Image.fromarray(np.stack([gradient, gradient[::-1], gradient], axis=-1)).save(buf, format="JPEG")
    rows = pa.table({"key": ["k"], "url": ["u"], "text": [None], "image": [buf.getvalue()]})
    _, priors, decoded, drops, _ = captioner.priors_for(rows)
    assert decoded == [True] and priors[0].ocr == [] and priors[0].failures == []
    assert priors[0].alt_text == ""


def test_killed_caption_resumes_from_its_last_chunk(tmp_path, image_server):
    path = write_caption_recipe(tmp_path, image_server, TEMPLATE)
    workdir = tmp_path / "work"
    build(load_recipe(path), workdir, only="ingest,fetch", show_progress=False)
    child = subprocess.Popen([sys.executable, "-m", "densefusion_hf", "build", str(path), "--workdir", str(workdir),
                              "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first_chunk = workdir / "caption" / "chunks" / "00000" / "shard-00000.done"
    deadline = time.monotonic() + 300
    while not first_chunk.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_chunk.exists(), child.stderr.read().decode() if child.poll() is not None else "timed out"
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = StageDir(workdir, "caption/chunks/00000").read("00000").to_pylist()
    assert len(saved) == 1

    # Saved chunks made with other settings are refused, as finished shards are.
    changed = dict(TEMPLATE, experts={"ocr": {"engine": "rapidocr", "min_score": 0.9}})
    write_caption_recipe(tmp_path, image_server, changed)
    refused = run_cli("build", str(path), "--workdir", str(workdir), "--no-progress")
    assert refused.returncode == 1 and "min_score" in refused.stderr and "--fresh" in refused.stderr

    # rows_per_chunk only changes how often work is saved: the resume keeps the saved chunk's layout.
    write_caption_recipe(tmp_path, image_server, dict(TEMPLATE, rows_per_chunk=2))
    result = run_cli("build", str(path), "--workdir", str(workdir), "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = captioned_rows(workdir)
    assert set(rows) == {p for p, _ in ROWS}                       # nothing lost, nothing twice
    assert rows[saved[0]["url"].split("/", 3)[3]] == saved[0]      # the saved chunk was kept, not redone
    published = load_published(workdir / "dataset")
    assert sorted(published["key"]) == sorted(r["key"] for r in rows.values())


def test_recipe_checks_for_the_caption_section(tmp_path):
    def error(caption, **extra):
        path = write_recipe(tmp_path / "r.yaml", {"name": "x", "source": {"metadata": ["m.parquet"]},
                                                  "caption": caption, **extra})
        with pytest.raises(Exception) as info:
            load_recipe(path)
        return str(info.value)

    assert "caption.model: engine 'transformers' needs a model" in error({})
    assert "open_set" in error({"engine": "template", "experts": {"open_set": {"model": "owl"}}})
    assert "ocr.model is needed" in error({"engine": "template", "experts": {"ocr": {"engine": "transformers"}}})
    assert "caption.rows_per_chunk: must be >= 1" in error({"engine": "template", "rows_per_chunk": 0})
    ok = load_recipe(write_recipe(tmp_path / "ok.yaml", {"name": "x", "source": {"metadata": ["m.parquet"]},
                                                           "caption": {"engine": "template"}}))
    assert ok.stages[-2:] == ["caption", "publish"]
    none = load_recipe(write_recipe(tmp_path / "none.yaml", {"name": "x", "source": {"metadata": ["m.parquet"]}}))
    assert "caption" not in none.stages
