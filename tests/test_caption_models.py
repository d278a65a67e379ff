"""The caption stage through the real transformers pipelines, with tiny random models built in fixtures:
CLIP (tagger), DETR (object-detection), OWL-ViT (zero-shot-object-detection), Llava (image-text-to-text)."""

import numpy as np
import pyarrow as pa
import pytest

from densefusion_hf.fusion.experts import read_vocabulary
from densefusion_hf.images import load_rgb
from densefusion_hf.runners.local import build
from densefusion_hf.recipe import load_recipe
from densefusion_hf.sample.tiny_models import (build_tiny_clip, build_tiny_detr, build_tiny_llava,
                                               build_tiny_owlvit)
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.stages.caption import Captioner
from tests.conftest import load_published
from tests.test_caption import ROWS, captioned_rows, write_caption_recipe


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"clip": str(build_tiny_clip(root / "clip")), "detr": str(build_tiny_detr(root / "detr")),
            "owlvit": str(build_tiny_owlvit(root / "owlvit")), "llava": str(build_tiny_llava(root / "llava"))}


@pytest.fixture
def vocabulary(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_text("# a small vocabulary\nsign\ncat\ncup\nperson\nrocket\nstreet\n")
    return path


def full_caption(models, vocabulary, **changes):
    caption = {
        "engine": "transformers", "model": models["llava"], "batch_size": 2, "rows_per_chunk": 2,
        "generation": {"max_new_tokens": 8},
        "experts": {
            "tagger": {"model": models["clip"], "vocabulary": str(vocabulary), "threshold": 0.0, "top_k": 3},
            "detector": {"model": models["detr"], "threshold": 0.0, "batch_size": 2},
            "open_set": {"model": models["owlvit"], "threshold": 0.0, "max_queries": 2, "batch_size": 2},
            "ocr": {"engine": "rapidocr"},
            "boxes": {"max_boxes": 6, "max_per_label": 3},
        },
    }
    for section, value in changes.items():
        caption["experts"][section] = value
    return caption


def test_tagger_scores_are_the_zero_shot_pipeline_scores(tmp_path, tiny_models, vocabulary, photo_files):
    from transformers import pipeline

    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", full_caption(tiny_models, vocabulary)))
    tagger = Captioner(recipe, tmp_path / "work", generate=False).experts[0]
    images = [load_rgb(photo_files[p]) for p in ("img/chelsea.jpg", "text/grand-opening.jpg")]
    pipe = pipeline("zero-shot-image-classification", model=tiny_models["clip"], device="cpu")
    expected = pipe(images, candidate_labels=read_vocabulary(vocabulary), hypothesis_template="a photo of {}.")
    ours = tagger.scores(images)
    for row, result in zip(ours, expected):
        for item in result:
            assert row[tagger.vocabulary.index(item["label"])] == pytest.approx(item["score"], abs=1e-5)
    assert np.allclose(ours.sum(axis=1), 1.0, atol=1e-5)  # softmax over the vocabulary, as CLIP's pipeline


def test_caption_stage_runs_every_expert_and_the_mllm(tmp_path, image_server, tiny_models, vocabulary):
    path = write_caption_recipe(tmp_path, image_server, full_caption(tiny_models, vocabulary))
    build(load_recipe(path), tmp_path / "work", show_progress=False)
    rows = captioned_rows(tmp_path / "work")
    dropped = StageDir(tmp_path / "work", "caption").read_dropped().to_pylist()
    assert len(rows) + len(dropped) == len(ROWS)
    assert all(d["reason"] == "empty_caption" for d in dropped)  # random weights may say nothing at all
    assert rows, "the tiny Llava generated no text for any image"
    tags = {"sign", "cat", "cup", "person", "rocket", "street"}
    for row in rows.values():
        priors = row["priors"]
        assert row["caption"].strip() and row["caption_words"] == len(row["caption"].split())
        assert row["caption_model"] == "llava"  # a local folder is named by its name, not the builder's path
        assert row["prompt_version"] == "perceptual-fusion-v1"
        assert 1 <= len(priors["tags"]) <= 3 and {t["label"] for t in priors["tags"]} <= tags
        assert priors["failures"] == []
        assert 1 <= len(priors["boxes"]) <= 6
        experts = {b["expert"] for b in priors["boxes"]}
        assert experts <= {"detector", "open_set"} and "detector" in experts
        for box in priors["boxes"]:
            x1, y1, x2, y2 = box["box"]
            assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1
            assert all(round(v, 3) == v for v in box["box"])
            if box["expert"] == "open_set":  # queried with this image's own best tags
                assert box["label"] in [t["label"] for t in priors["tags"]][:2]
    if "text/grand-opening.jpg" in rows:
        assert "GRAND OPENING" in [line["text"] for line in rows["text/grand-opening.jpg"]["priors"]["ocr"]]
    published = load_published(tmp_path / "work" / "dataset")
    assert sorted(published["caption"]) == sorted(r["caption"] for r in rows.values())


def test_no_box_over_the_threshold_gives_a_prompt_without_boxes(tmp_path, tiny_models, vocabulary, photo_files):
    caption = full_caption(tiny_models, vocabulary, detector={"model": tiny_models["detr"], "threshold": 1.0},
                           open_set={"model": None})
    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", caption))
    captioner = Captioner(recipe, tmp_path / "work", generate=False)
    rows = pa.table({"key": ["k"], "url": ["u"], "text": ["a cat"], "image": [photo_files["img/chelsea.jpg"]]})
    images, priors, decoded, drops, _ = captioner.priors_for(rows)
    assert decoded == [True] and priors[0].boxes == [] and priors[0].failures == []
    assert "[Detection Box]:\nNone\n" in captioner.prompts_for(priors)[0]


def test_an_expert_failing_on_an_image_is_recorded_and_captioning_goes_on(tmp_path, tiny_models, photo_files):
    # A tag longer than OWL-ViT's text positions makes the open-set detector fail, for real, on that image.
    vocabulary = tmp_path / "long.txt"
    vocabulary.write_text(" ".join(["very long tag"] * 20) + "\n")
    caption = full_caption(tiny_models, vocabulary)
    caption["experts"]["tagger"]["threshold"] = 0.0
    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", caption))
    captioner = Captioner(recipe, tmp_path / "work")
    rows = pa.table({"key": ["a", "b"], "url": ["u/a", "u/b"], "text": ["a cat", "a sign"],
                     "image": [photo_files["img/chelsea.jpg"], photo_files["text/grand-opening.jpg"]]})
    captioned, drops, _ = captioner.caption_rows(rows)
    assert captioned.num_rows + len(drops) == 2
    for priors in captioned.column("priors").to_pylist():
        (failure,) = priors["failures"]
        assert failure["expert"] == "open_set" and failure["reason"]
        assert {b["expert"] for b in priors["boxes"]} == {"detector"}  # the other detector's boxes are kept


def test_a_transformers_ocr_model_reads_through_image_text_to_text(tmp_path, tiny_models, vocabulary, photo_files):
    caption = full_caption(tiny_models, vocabulary, ocr={"engine": "transformers", "model": tiny_models["llava"],
                                                        "max_new_tokens": 6, "batch_size": 2})
    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", caption))
    captioner = Captioner(recipe, tmp_path / "work", generate=False)
    assert [e.name for e in captioner.experts] == ["tagger", "detector", "open_set", "ocr"]
    rows = pa.table({"key": ["a", "b"], "url": ["u/a", "u/b"], "text": ["x", "y"],
                     "image": [photo_files["text/grand-opening.jpg"], photo_files["img/coffee.jpg"]]})
    _, priors, _, _, _ = captioner.priors_for(rows)
    for prior in priors:
        assert prior.failures == []
        assert all(line.text.strip() == line.text and line.text and line.score is None for line in prior.ocr)
