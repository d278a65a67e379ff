"""Perceptual Fusion's model-free parts: boxes, priors, alt text, prompt (golden), template captions, OCR order."""

from pathlib import Path

import numpy as np
import pytest

from densefusion_hf.errors import UserError
from densefusion_hf.fusion.boxes import Box, balanced_sample, iou, merge_duplicates, normalise
from densefusion_hf.fusion.describe import describe, position
from densefusion_hf.fusion.experts import (DEFAULT_VOCABULARY, Expert, apply, located_reading_order, read_vocabulary,
                                          reading_order)
from densefusion_hf.fusion.priors import PRIORS_TYPE, Failure, OcrLine, Priors, Tag, clean_alt_text
from densefusion_hf.fusion.prompt import PromptTemplate

GOLDEN = Path(__file__).parent / "golden"


def fixed_priors() -> Priors:
    return Priors(
        alt_text=clean_alt_text("Grand Opening &amp;amp; Sale at <b>Main St.</b> https://shop.example.com/x?y=1  today"),
        tags=[Tag("sign", 0.41), Tag("storefront", 0.22), Tag("person", 0.1)],
        boxes=[Box("sign", 0.93, "detector", (0.1, 0.05, 0.9, 0.5)),
               Box("person", 0.81, "open_set", (0.62, 0.4, 0.75, 0.98)),
               Box("cup", 0.55, "detector", (0.031, 0.802, 0.07, 0.9))],
        ocr=[OcrLine("GRAND OPENING", 0.99), OcrLine("SALE 50% OFF", 0.97)],
    )


def test_prompt_for_fixed_priors_matches_the_golden_file():
    prompt = PromptTemplate.load().render(fixed_priors())
    assert prompt == (GOLDEN / "prompt-perceptual-fusion-v1.txt").read_text().rstrip("\n")
    # The paper's shape: the sections in order, boxes with three decimals, OCR as a list.
    order = [prompt.index(s) for s in ("[External Information]:", "[World Knowledge]:", "[Detection Box]:",
                                       "[OCR]:", "[IMAGE]:")]
    assert order == sorted(order) and prompt.endswith("[IMAGE]:")
    assert "- person: [0.620, 0.400, 0.750, 0.980]" in prompt and "- GRAND OPENING" in prompt


def test_prompt_says_none_for_missing_priors():
    prompt = PromptTemplate.load().render(Priors())
    assert "[World Knowledge]: None" in prompt
    assert "[Detection Box]:\nNone\n[OCR]:\nNone\n[IMAGE]:" in prompt


def test_own_template_needs_a_version_and_valid_jinja(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Describe {{ world_knowledge }}")
    with pytest.raises(UserError, match="prompt_version"):
        PromptTemplate.load(bad)
    broken = tmp_path / "broken.txt"
    broken.write_text("---\nprompt_version: mine-1\n---\nline\n{% for x in ocr %}\n")
    with pytest.raises(UserError, match="line 5.*syntax"):
        PromptTemplate.load(broken)
    typo = tmp_path / "typo.txt"
    typo.write_text("---\nprompt_version: mine-1\n---\nKnown: {{ world_knowlege }}\n")
    with pytest.raises(UserError, match="world_knowlege.*variables are"):
        PromptTemplate.load(typo).render(Priors())
    good = tmp_path / "good.txt"
    good.write_text("---\nprompt_version: mine-1\n---\nTags: {{ tags_text }}\n")
    template = PromptTemplate.load(good)
    assert template.prompt_version == "mine-1"
    assert template.render(fixed_priors()) == "Tags: sign | storefront | person"


def test_alt_text_cleaning():
    assert clean_alt_text("Fish &amp;amp; chips  \n at https://x.example/a.jpg <i>now</i>") == "Fish & chips at now"
    assert clean_alt_text(None) == "" and clean_alt_text("   ") == ""
    long = "word " * 200
    cut = clean_alt_text(long, max_chars=23)
    assert cut == "word word word word" and len(cut) <= 23
    assert clean_alt_text("x" * 50, max_chars=10) == "x" * 10


def test_normalise_clamps_orders_and_rounds():
    assert normalise(-5, 10, 105, 50.5, width=100, height=200) == (0.0, 0.05, 1.0, 0.253)
    assert normalise(80, 90, 20, 10, width=100, height=100) == (0.2, 0.1, 0.8, 0.9)


def test_merge_keeps_the_surer_box_of_one_object_seen_twice():
    a = Box("dog", 0.9, "detector", (0.1, 0.1, 0.5, 0.5))
    b = Box("Dog", 0.7, "open_set", (0.11, 0.1, 0.5, 0.52))       # the same dog
    c = Box("dog", 0.8, "open_set", (0.6, 0.6, 0.9, 0.9))         # another dog
    d = Box("cat", 0.6, "open_set", (0.1, 0.1, 0.5, 0.5))         # another label, same place: kept
    assert iou(a.box, b.box) > 0.9
    assert merge_duplicates([b, c, a, d], merge_iou=0.7) == [a, c, d]
    # The two detectors name one object differently; a near-identical box is still one object.
    woman = Box("woman", 0.5, "open_set", (0.1, 0.1, 0.5, 0.51))
    assert merge_duplicates([a, woman], merge_iou=0.7, any_label_iou=0.9) == [a]
    assert merge_duplicates([a, woman], merge_iou=0.7) == [a, woman]
    same_expert = Box("cat", 0.5, "detector", (0.1, 0.1, 0.5, 0.5))   # one detector's two labels: both kept
    assert merge_duplicates([a, same_expert], merge_iou=0.7, any_label_iou=0.9) == [a, same_expert]


def test_balanced_sample_keeps_small_objects_and_caps_labels():
    large = [Box("person", 0.99 - i / 100, "detector", (0.0, 0.0, 0.6, 0.6)) for i in range(8)]
    small = [Box("coin", 0.3, "open_set", (0.5, 0.5, 0.52, 0.52)), Box("ring", 0.2, "open_set", (0.7, 0.7, 0.71, 0.71))]
    taken = balanced_sample(large + small, max_boxes=4, max_per_label=5, small_area=0.02, large_area=0.2)
    labels = [b.label for b in taken]
    # A top-4 by confidence would be four people; the rule gives small objects their turns.
    assert sorted(labels) == ["coin", "person", "person", "ring"]
    assert [b.score for b in taken] == sorted((b.score for b in taken), reverse=True)
    capped = balanced_sample(large, max_boxes=10, max_per_label=3, small_area=0.02, large_area=0.2)
    assert len(capped) == 3 and [b.score for b in capped] == [0.99, 0.98, 0.97]
    assert balanced_sample(large, max_boxes=0, max_per_label=3, small_area=0.02, large_area=0.2) == []


def test_priors_round_trip_through_arrow():
    import pyarrow as pa

    priors = fixed_priors()
    priors.failures.append(Failure("detector", "RuntimeError: out of memory"))
    array = pa.array([priors.to_row()], PRIORS_TYPE)
    assert Priors.from_row(array.to_pylist()[0]) == priors


def test_template_caption_says_what_was_found_and_where():
    text = describe(fixed_priors())
    assert "Image tags: sign, storefront, person." in text
    assert "sign (large, top)" in text and "person (medium, bottom right)" in text and "cup (small, bottom left)" in text
    assert "\u201cGRAND OPENING\u201d; \u201cSALE 50% OFF\u201d" in text
    assert "unverified" in text and "Main St." in text
    assert describe(Priors()) == "No tags, objects or text were found in this image, and no alt text was given."
    two = Priors(boxes=[Box("cup", 0.9, "detector", (0.0, 0.0, 0.1, 0.1)),
                        Box("cup", 0.8, "detector", (0.8, 0.8, 0.9, 0.9))])
    assert "2 x cup (small, top left; small, bottom right)" in describe(two)


def test_position_grid():
    assert position(Box("x", 1, "d", (0.4, 0.4, 0.6, 0.6))) == "centre"
    assert position(Box("x", 1, "d", (0.0, 0.0, 0.2, 0.2))) == "top left"
    assert position(Box("x", 1, "d", (0.9, 0.4, 1.0, 0.6))) == "right"
    assert position(Box("x", 1, "d", (0.4, 0.9, 0.6, 1.0))) == "bottom"


def test_reading_order_rows_then_left_to_right():
    def quad(x1, y1, x2, y2):
        return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])

    lines = [("SALE", 0.9, quad(300, 120, 400, 160)), ("OFF", 0.9, quad(420, 118, 480, 162)),
             ("GRAND", 0.9, quad(10, 10, 200, 60)), ("50%", 0.8, quad(200, 122, 280, 158))]
    assert [t for t, _ in reading_order(lines)] == ["GRAND", "50%", "SALE", "OFF"]
    located = located_reading_order(lines)
    assert [(t, corners) for t, _, corners in located][:2] == [("GRAND", (10, 10, 200, 60)), ("50%", (200, 122, 280, 158))]


def test_ocr_lines_keep_their_boxes_through_arrow():
    import pyarrow as pa

    priors = Priors(ocr=[OcrLine("SALE", 0.99, (0.1, 0.2, 0.5, 0.3)), OcrLine("no box", None)])
    row = pa.array([priors.to_row()], PRIORS_TYPE).to_pylist()[0]
    assert row["ocr"] == [{"text": "SALE", "score": 0.99, "box": [0.1, 0.2, 0.5, 0.3]},
                          {"text": "no box", "score": None, "box": None}]
    assert Priors.from_row(row) == priors


def test_shipped_vocabulary_is_large_and_clean(tmp_path):
    tags = read_vocabulary(DEFAULT_VOCABULARY)
    assert len(tags) >= 1000 and len(set(tags)) == len(tags)
    assert all(t == t.lower().strip() and "#" not in t for t in tags)
    for expected in ("cat", "sign", "poster", "bicycle", "pizza", "beach", "running"):
        assert expected in tags
    own = tmp_path / "tags.txt"
    own.write_text("# mine\ncat\n\ndog  # pets\ncat\n")
    assert read_vocabulary(own) == ["cat", "dog"]
    own.write_text("# nothing\n")
    with pytest.raises(UserError, match="empty"):
        read_vocabulary(own)


class _Flaky(Expert):
    name = "flaky"

    def run(self, images, priors):
        if "bad" in images:
            raise RuntimeError("cannot read " + ",".join(images))
        found = [[OcrLine(image, 1.0)] for image in images]
        for prior, lines in zip(priors, found):
            prior.ocr = lines


def test_a_failing_image_records_its_reason_and_the_others_keep_their_priors():
    priors = [Priors(), Priors(), Priors()]
    apply(_Flaky(), ["a", "bad", "c"], priors)
    assert [p.ocr for p in priors] == [[OcrLine("a", 1.0)], [], [OcrLine("c", 1.0)]]
    assert priors[1].failures == [Failure("flaky", "RuntimeError: cannot read bad")]
    assert not priors[0].failures and not priors[2].failures
