"""The caption stage's speed paths give the results of the plain ones: worker processes preparing the next
chunks (decoding, rapidocr and the CPU experts) against everything in one process, and the open-set
detector's one pass per image against the zero-shot-object-detection pipeline's pass per (image, tag)."""

import pyarrow as pa
import pytest

from densefusion_hf.fusion.experts import cpu_experts
from densefusion_hf.images import load_rgb
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.stages.caption import Captioner
from densefusion_hf.stages.shards import StageDir
from tests.test_caption import ROWS, captioned_rows, write_caption_recipe
from tests.test_caption_models import full_caption, tiny_models, vocabulary  # noqa: F401 - fixtures

PHOTOS = ["text/grand-opening.jpg", "img/chelsea.jpg", "img/coffee.jpg", "img/astronaut.jpg", "bad/truncated.jpg"]


def test_worker_processes_give_the_rows_of_the_sequential_path(tmp_path, tiny_models, vocabulary, photo_files):
    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", full_caption(tiny_models, vocabulary)))
    assert cpu_experts(recipe.caption) == ["tagger", "detector", "open_set", "ocr"]  # no GPU: all of them
    rows = pa.table({"key": [f"k{i}" for i in range(len(PHOTOS))], "url": [f"u/{p}" for p in PHOTOS],
                     "text": ["a sign", "a cat", None, "an astronaut", "broken"],
                     "image": [photo_files[p] for p in PHOTOS]})
    parts = [rows.slice(0, 2), rows.slice(2, 2), rows.slice(4, 1)]

    sequential = Captioner(recipe, tmp_path / "work", workers=0)
    expected = list(sequential.caption_chunks(parts))
    sequential.close()
    overlapped = Captioner(recipe, tmp_path / "work", workers=2)
    try:
        assert overlapped.pool is not None and overlapped.experts == []  # every expert runs in the workers
        got = list(overlapped.caption_chunks(parts))
    finally:
        overlapped.close()

    assert len(got) == len(expected) == 3
    for (rows_a, drops_a, stats_a), (rows_b, drops_b, stats_b) in zip(expected, got):
        assert rows_b.equals(rows_a), (rows_a.to_pylist(), rows_b.to_pylist())
        assert drops_b == drops_a and stats_b["expert_failures"] == stats_a["expert_failures"]
        assert "wait_for_workers" in stats_b["seconds_by_step"] and "ocr" in stats_b["seconds_by_step"]
    captioned = pa.concat_tables([r for r, _, _ in got])
    assert captioned.num_rows + sum(len(d) for _, d, _ in got) == len(PHOTOS)
    assert [d["reason"] for _, drops, _ in got for d in drops if d["key"] == "k4"] == ["undecodable"]
    ocr = {r["key"]: [line["text"] for line in r["priors"]["ocr"]] for r in captioned.to_pylist()}
    if "k0" in ocr:  # the sign was read in a worker
        assert "GRAND OPENING" in ocr["k0"]


def test_the_stage_with_workers_builds_end_to_end(tmp_path, image_server):
    caption = {"engine": "template", "experts": {"ocr": {"engine": "rapidocr"}}, "rows_per_chunk": 1, "workers": 1}
    build(load_recipe(write_caption_recipe(tmp_path, image_server, caption)), tmp_path / "work", show_progress=False)
    rows = captioned_rows(tmp_path / "work")
    assert set(rows) == {path for path, _ in ROWS}
    assert "GRAND OPENING" in [line["text"] for line in rows["text/grand-opening.jpg"]["priors"]["ocr"]]
    stats = StageDir(tmp_path / "work", "caption").all_stats()
    assert "wait_for_workers" in stats[0]["seconds_by_step"]


def test_open_set_one_pass_gives_the_pipeline_boxes_and_scores(tmp_path, tiny_models, vocabulary, photo_files):
    from transformers import pipeline

    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", full_caption(tiny_models, vocabulary)))
    detector = next(e for e in Captioner(recipe, tmp_path / "work", generate=False, workers=0).experts
                    if e.name == "open_set")
    images = [load_rgb(photo_files[p]) for p in ("img/chelsea.jpg", "text/grand-opening.jpg", "img/coffee.jpg")]
    queries = [["cat", "sign", "person"], ["sign"], ["cup", "street"]]  # a different number of queries each
    ours = detector.detect(images, queries)
    pipe = pipeline("zero-shot-object-detection", model=tiny_models["owlvit"], device="cpu")
    expected = pipe([{"image": image, "candidate_labels": q} for image, q in zip(images, queries)], threshold=0.0)
    for mine, theirs in zip(ours, expected):
        assert len(mine) == len(theirs) > 0
        def ordered(detections):
            return sorted((d["label"], tuple(d["box"].values()), d["score"]) for d in detections)

        for (label, box, score), (label_p, box_p, score_p) in zip(ordered(mine), ordered(theirs)):
            assert (label, box) == (label_p, box_p) and score == pytest.approx(score_p, abs=1e-4)
        assert [d["score"] for d in mine] == sorted((d["score"] for d in mine), reverse=True)
