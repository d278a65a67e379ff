"""The offline demo end to end through the command line: a loadable dataset, honest counts, crash resume."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from densefusion_hf.publish.cards import check_card
from densefusion_hf.stages.shards import StageDir
from tests.conftest import DEMO_RECIPE, REPO, run_cli


def _dataset_rows(workdir):
    files = sorted((workdir / "dataset" / "densefusion-demo").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_load_dataset_reads_the_published_folder(demo_build):
    folder = demo_build / "dataset"
    ds = datasets.load_dataset(str(folder), split="train")
    selected = sum(s["rows_out"] for s in StageDir(demo_build, "select").all_stats())
    assert ds.num_rows == selected == 18  # the demo recipe's target size
    assert isinstance(ds.features["image"], datasets.Image)
    for row in ds:
        image = row["image"]
        image.load()
        assert image.size == (row["width"], row["height"])
        assert max(image.size) <= 1024  # the demo recipe caps the longer side
    retina = [r for r in ds if r["url"].endswith("retina.jpg")][0]
    assert (retina["original_width"], retina["original_height"]) == (1411, 1411)
    assert len(set(ds["key"])) == ds.num_rows


def test_card_yaml_matches_the_files(demo_build):
    folder = demo_build / "dataset"
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    (config,) = meta["configs"]
    pattern = config["data_files"][0]["path"]
    files = sorted(folder.glob(pattern))
    assert files and all(f.suffix == ".parquet" for f in files)
    n = len(files)
    assert [f.name for f in files] == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    (info,) = meta["dataset_info"]
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    assert info["splits"][0]["num_examples"] == rows
    assert info["download_size"] == sum(f.stat().st_size for f in files)
    declared = datasets.Features._from_yaml_list(info["features"])
    assert declared == datasets.load_dataset(str(folder), split="train").features
    assert meta["size_categories"] == ["n<1K"]
    assert "failed_to_download" in text and "too_small" in text  # the drop table
    # the caption statistics (paper Table 1's measures), the models, the charts, and a clean check
    assert "| words |" in text and "| sentences |" in text and "captioner (template engine)" in text
    assert (folder / "assets" / "densefusion-demo" / "categories.png").exists()
    assert check_card(folder) == []


def test_demo_shows_every_kind_of_drop(demo_build):
    result = run_cli("status", str(demo_build), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    reasons = {(s["name"], r) for s in report["stages"] for r in s["dropped"]}
    assert {("ingest", "duplicate_url"), ("ingest", "too_small"), ("ingest", "unsafe"),
            ("ingest", "low_similarity"), ("ingest", "aspect_ratio"), ("fetch", "failed_to_download"),
            ("fetch", "failed_to_resize"), ("dedup", "exact_dup"), ("dedup", "near_dup"),
            ("select", "too_small"), ("select", "target_size")} <= reasons
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["ingest", "fetch", "dedup", "embed", "semdedup", "select", "caption",
                                             "publish"]
    # Every source row ends up kept or recorded as dropped, and each stage reads what the one before kept.
    for before, after in zip(stages, stages[1:]):
        assert before["rows_out"] == after["rows_in"], (before, after)
    assert stages[0]["rows_in"] == stages[-1]["rows_out"] + sum(s["rows_dropped"] for s in stages)
    by_name = {s["name"]: s for s in stages}
    for stage in ("ingest", "fetch", "dedup", "select"):
        recorded = StageDir(demo_build, stage).read_dropped().to_pylist()
        assert len(recorded) == by_name[stage]["rows_dropped"]
        assert all(r["reason"] and r["detail"] and r["key"] for r in recorded)

    table = run_cli("status", str(demo_build)).stdout
    assert "ingest" in table and "3/3 done" in table and "failed_to_download" in table


def _kill_when(workdir, path, timeout=180):
    """Start a demo build, SIGKILL it (and its workers) as soon as ``path`` exists."""
    command = [sys.executable, "-m", "densefusion_hf", "build", str(DEMO_RECIPE), "--workdir", str(workdir),
               "--no-progress"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert path.exists()


def test_killed_build_resumes_to_exactly_the_uninterrupted_rows(demo_build, tmp_path):
    workdir = tmp_path / "work"
    _kill_when(workdir, workdir / "fetch" / "shard-00000.done")  # mid-fetch
    assert not (workdir / "fetch" / "shard-00002.done").exists(), "the kill came too late to test anything"
    assert not (workdir / "dataset").exists()

    result = run_cli("build", str(DEMO_RECIPE), "--workdir", str(workdir), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert _dataset_rows(workdir) == _dataset_rows(demo_build)
    assert not list((workdir / "fetch").glob(".*tmp*"))


def test_build_killed_after_a_global_decision_resumes_to_the_same_rows(demo_build, tmp_path):
    workdir = tmp_path / "work"
    _kill_when(workdir, workdir / "dedup" / "decision.parquet")
    assert not (workdir / "dataset").exists()
    result = run_cli("build", str(DEMO_RECIPE), "--workdir", str(workdir), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert _dataset_rows(workdir) == _dataset_rows(demo_build)


def test_published_signs_keep_their_rendered_text(demo_build):
    rows = _dataset_rows(demo_build)
    signs = [r for r in rows if "/signs/" in r["url"]]
    assert signs
    for sign in signs:
        with Image.open(io.BytesIO(sign["image"]["bytes"])) as image:
            assert image.mode == "RGB" and image.size == (800, 450)
            grey = np.asarray(image.convert("L"), dtype=np.int16)
            background = np.median(grey)
            # Letters: a few percent of the pixels, far from the plain background colour.
            assert 0.01 < (np.abs(grey - background) > 60).mean() < 0.5


def test_demo_captions_are_the_template_engine_over_real_ocr(demo_build):
    rows = {r["url"].rsplit("/", 1)[1]: r for r in _dataset_rows(demo_build)}
    assert all(r["caption_model"] == "template" and r["caption"] for r in rows.values())
    sign = rows["grand-opening.jpg"]
    assert [line["text"] for line in sign["priors"]["ocr"]] == ["GRAND OPENING", "SALE"]
    assert "\u201cGRAND OPENING\u201d; \u201cSALE\u201d" in sign["caption"]
    assert "Grand opening sale banner in front of a new shop" in sign["caption"]  # the alt text, marked unverified
