"""The dataset card (README.md): YAML metadata the Hub and ``datasets`` read, and a body for people.

Rendered through huggingface_hub's ``DatasetCard.from_template`` from ``cards/dataset_card.md``.  The YAML
``configs`` and ``dataset_info`` are computed from the Parquet files and features actually written.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from huggingface_hub import DatasetCard, DatasetCardData

from densefusion_hf import __version__
from densefusion_hf.card_templates import template_path

# What each column means, for the card's field table.
FIELD_MEANINGS = {
    "image": "the image, bytes embedded (decodes to a PIL image)",
    "key": "stable row id: BLAKE2b-96 of the URL, the same in every build",
    "url": "where the image was downloaded from",
    "text": "the alt text from the source metadata",
    "width": "width of the stored image in pixels",
    "height": "height of the stored image in pixels",
    "original_width": "width before any resize",
    "original_height": "height before any resize",
    "image_format": "format of the stored bytes (JPEG, PNG, ...)",
    "sha256": "SHA-256 of the stored image bytes",
    "similarity": "CLIP image-text similarity from the source metadata",
    "punsafe": "probability of unsafe content, from the source metadata",
    "pwatermark": "probability of a watermark, from the source metadata",
    "phash": "perceptual hash of the image (hex), used for near-duplicate removal",
    "cluster": "k-means cluster of the image embedding",
    "centroid_similarity": "cosine similarity of the image embedding to its cluster centroid",
    "category": "best-matching category from the recipe's prompts ('other' below the threshold)",
    "category_score": "cosine similarity to that category's prompts",
    "cluster_rank": "rank of the image inside its cluster (0 = best)",
    "caption": "the dense caption (Perceptual Fusion); with caption_model 'template', the priors written out",
    "priors": "what the vision experts found: tags with scores, boxes (label, score, expert, x1 y1 x2 y2 in 0-1), "
              "OCR lines with scores, the cleaned alt text, and the experts that failed on the image",
    "caption_model": "the model that wrote the caption ('template': no model, the priors as text)",
    "prompt_version": "version of the prompt (or of the template engine's format) the caption came from",
    "caption_words": "words in the caption",
}

_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                    (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                    (1_000_000_000, "100M<n<1B")]


def size_category(rows: int) -> str:
    for bound, name in _SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T" if rows >= 10 ** 12 else "1B<n<10B"


def dataset_info_yaml(features: datasets.Features, num_examples: int, num_bytes: int,
                      download_size: int) -> dict:
    info = datasets.DatasetInfo(features=features, download_size=download_size, dataset_size=num_bytes)
    info.splits = datasets.SplitDict()
    info.splits.add(datasets.SplitInfo(name="train", num_bytes=num_bytes, num_examples=num_examples))
    return info._to_yaml_dict()


def _dtype_words(feature) -> str:
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    return type(feature).__name__


def render_card(folder: Path, *, recipe, features: datasets.Features, num_examples: int, num_bytes: int,
                stage_summaries: list[dict], load_path: str | None = None,
                selection: dict | None = None) -> DatasetCard:
    """Write ``folder/README.md`` and return the card."""
    download_size = sum(p.stat().st_size for p in (folder / "data").glob("*.parquet"))
    card_data = DatasetCardData(
        license=recipe.license,
        pretty_name=recipe.pretty_name or recipe.name,
        task_categories=["image-to-text", "text-to-image"],
        size_categories=[size_category(num_examples)],
        tags=["densefusion", "image-captioning", "laion"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        dataset_info=dataset_info_yaml(features, num_examples, num_bytes, download_size),
    )
    fields = [{"name": name, "dtype": _dtype_words(feature), "meaning": FIELD_MEANINGS.get(name, "")}
              for name, feature in features.items()]
    card = DatasetCard.from_template(
        card_data, template_path=str(template_path()),
        description=recipe.description.strip(), recipe_name=recipe.name, version=recipe.version,
        package_version=__version__, load_path=load_path or f"path/to/{recipe.name}",
        fields=fields, stages=stage_summaries, selection=selection,
    )
    card.save(str(folder / "README.md"))
    return card
