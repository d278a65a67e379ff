"""The dataset card (README.md): YAML metadata the Hub and ``datasets`` read, and a body for people.

Rendered through huggingface_hub's ``DatasetCard.from_template`` from ``cards/dataset_card.md``, from
each config's ``assets/CONFIG/build.json`` (written by publish), so a card can be rendered again, or for
a Hub repo holding several configs, without the work directories.  ``check_card`` reads a folder back
and lists everything the card says that the files contradict.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData

from densefusion_hf.publish.build_info import BUILD_INFO, assets_dir, file_sha256, version_key
from densefusion_hf.card_templates import template_path
from densefusion_hf.publish.charts import bar_chart_png
from densefusion_hf.errors import UserError

CARD = "README.md"
CHARTS = {"resolutions": "Images per short side (pixels)", "categories": "Images per category"}
TAGS = ["densefusion", "image-captioning", "dense-captions", "laion"]

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
    # Columns of a build imported from a release (source.release).
    "image_id": "the release's row id (text; the release rehashed LAION's ids, so join to LAION by url)",
    "image_path": "where the release keeps the image: <config>/<zip shard>/<member>",
    "image_source": "where the image bytes came from: 'release' (its zip) or 'url' (downloaded again because "
                    "the release lost or damaged it)",
    "fusion_caption": "our Perceptual Fusion caption, beside the release's own in caption",
    "fusion_caption_model": "the model that wrote fusion_caption",
    "fusion_prompt_version": "version of the prompt fusion_caption came from",
}
RELEASE_FIELD_MEANINGS = {
    "caption": "the release's dense caption, as released",
    "caption_model": "where the caption came from (the release and its caption engine)",
    "prompt_version": "null: the release does not say which prompt its captions came from",
    "text": "null: the release has no alt text",
}

_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                    (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                    (10 ** 9, "100M<n<1B"), (10 ** 10, "1B<n<10B"), (10 ** 11, "10B<n<100B"),
                    (10 ** 12, "100B<n<1T")]


def size_category(rows: int) -> str:
    """The Hub's size_categories value for a row count."""
    for bound, name in _SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def data_pattern(config: str) -> str:
    """Where a config's files are, as ``push_to_hub`` names them."""
    return f"{config}/train-*"


def dataset_info_yaml(info: dict) -> dict:
    features = datasets.Features.from_dict(info["features"])
    rows = sum(f["rows"] for f in info["files"])
    meta = datasets.DatasetInfo(features=features, dataset_size=info["num_bytes"],
                                download_size=sum(f["bytes"] for f in info["files"]))
    meta.splits = datasets.SplitDict()
    meta.splits.add(datasets.SplitInfo(name="train", num_bytes=info["num_bytes"], num_examples=rows))
    # DatasetInfo writes its YAML block only through this private method; the Hub's own tools use it too.
    return {"config_name": info["config"], **meta._to_yaml_dict()}


def _dtype_words(feature) -> str:
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, dict):
        return "struct"
    return type(feature).__name__.lower()


def dropped_for(info: dict, reason: str) -> int:
    """Rows every stage of the build dropped for ``reason``."""
    return sum(stage["dropped"].get(reason, 0) for stage in info["stages"])


def _changelog(info: dict, removed: int) -> list[dict]:
    """The recipe's changelog, newest first; this version's entry says how many rows removal requests took
    out (an entry is added for it when the recipe has none)."""
    entries = dict(info["recipe"]["changelog"])
    version = info["recipe"]["version"]
    if removed:
        entries.setdefault(version, "")
    return [{"version": v, "text": text, "removed": removed if v == version and removed else None}
            for v, text in sorted(entries.items(), key=lambda kv: version_key(kv[0]), reverse=True)]


def _config_view(info: dict) -> dict:
    """One config's numbers, shaped for the template."""
    features = datasets.Features.from_dict(info["features"])
    removed = dropped_for(info, "removal_request")  # stages.removal.REASON
    return dict(info, rows=sum(f["rows"] for f in info["files"]),
                changelog=_changelog(info, removed), removed=removed,
                header_refused=dropped_for(info, "disallowed_by_header"),  # fetch's X-Robots-Tag refusals
                header_directives=info.get("header_directives"),  # None in builds made before it was saved
                fields=[{"name": name, "dtype": _dtype_words(feature),
                         "meaning": (RELEASE_FIELD_MEANINGS if info.get("release") else {}).get(
                             name, FIELD_MEANINGS.get(name, ""))}
                        for name, feature in features.items()],
                charts={name: f"assets/{info['config']}/{name}.png" for name in CHARTS
                        if info["stats"].get(name)})


def card_for(infos: list[dict], *, load_path: str, version: str | None = None,
             on_hub: bool = False) -> DatasetCard:
    """The card of a folder or repo holding these configs; the first one is the one described first."""
    if not infos:
        raise UserError("A dataset card needs at least one config (no assets/*/build.json found).")
    main = infos[0]["recipe"]
    rows = sum(f["rows"] for info in infos for f in info["files"])
    card_data = DatasetCardData(
        license=main["license"],
        pretty_name=main["pretty_name"],
        task_categories=["image-to-text", "text-to-image"],
        size_categories=[size_category(rows)],
        tags=TAGS,
        configs=[{"config_name": info["config"],
                  "data_files": [{"split": "train", "path": data_pattern(info["config"])}]} for info in infos],
        dataset_info=[dataset_info_yaml(info) for info in infos],
    )
    return DatasetCard.from_template(
        card_data, template_path=str(template_path()), pretty_name=main["pretty_name"],
        description=main["description"], version=version or main["version"], load_path=load_path,
        on_hub=on_hub, license=main["license"],
        package_version=infos[0]["package_version"], configs=[_config_view(info) for info in infos],
    )


def config_infos(folder: Path) -> list[dict]:
    """Every config's build.json in a dataset folder, in name order."""
    paths = sorted(Path(folder).glob(f"assets/*/{BUILD_INFO}"))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def render_card(folder: Path, infos: list[dict] | None = None, *, load_path: str | None = None,
                version: str | None = None) -> DatasetCard:
    """Write ``folder/README.md`` from the configs' build.json (or the ``infos`` given) and return it."""
    folder = Path(folder)
    card = card_for(infos if infos is not None else config_infos(folder), load_path=load_path or str(folder),
                    version=version)
    card.save(str(folder / CARD))
    return card


def write_charts(folder: Path, stats: dict) -> None:
    """The card's charts as PNG files in ``folder`` (assets/CONFIG)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, title in CHARTS.items():
        if stats.get(name):
            (folder / f"{name}.png").write_bytes(bar_chart_png(title, stats[name]))


def _parquet_features(path: Path) -> datasets.Features:
    return datasets.Features.from_arrow_schema(pq.read_schema(path))


def check_card(folder: Path) -> list[str]:
    """What the card in ``folder`` says that the files there contradict; empty when all is well."""
    folder = Path(folder)
    try:
        card = DatasetCard.load(folder / CARD)
    except FileNotFoundError:
        return [f"{folder / CARD}: no dataset card; render it with `df-hf card render {folder}`."]
    except Exception as exc:  # the YAML header does not parse: nothing else can be checked
        return [f"{folder / CARD}: the YAML header does not parse: {exc}"]
    data = card.data.to_dict()
    problems = []
    configs = data.get("configs") or []
    if not configs:
        problems.append("the YAML has no `configs`: the Hub and datasets would guess the files.")
    infos = {entry.get("config_name"): entry for entry in _as_list(data.get("dataset_info"))}
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet"))
    total = 0
    for config in configs:
        name = config.get("config_name")
        matched = [f for entry in _as_list(config.get("data_files")) for f in files
                   if fnmatch.fnmatch(f, entry.get("path", "") if isinstance(entry, dict) else str(entry))]
        if not matched:
            problems.append(f"config {name!r}: its data_files match no Parquet file in {folder}.")
            continue
        rows = sum(pq.ParquetFile(folder / f).metadata.num_rows for f in matched)
        total += rows
        problems += _check_config(folder, name, matched, rows, infos.get(name))
    expected = size_category(total)
    if configs and data.get("size_categories") != [expected]:
        problems.append(f"size_categories is {data.get('size_categories')} but the configs hold {total} rows "
                        f"({expected}).")
    for chart in sorted(set(_linked_assets(card.text)) - set(p.relative_to(folder).as_posix()
                                                              for p in folder.rglob("*.png"))):
        problems.append(f"the card shows {chart}, which is not in {folder}.")
    return problems


def _check_config(folder: Path, name: str, files: list[str], rows: int, info: dict | None) -> list[str]:
    problems = []
    features = _parquet_features(folder / files[0])
    for other in files[1:]:
        if _parquet_features(folder / other) != features:
            problems.append(f"config {name!r}: {other} has other columns than {files[0]}.")
    if info is None:
        return problems + [f"config {name!r}: no dataset_info entry in the YAML."]
    if datasets.Features._from_yaml_list(info.get("features", [])) != features:
        problems.append(f"config {name!r}: dataset_info features differ from the columns of its files.")
    counted = {split.get("name"): split.get("num_examples") for split in info.get("splits", [])}
    if counted.get("train") != rows:
        problems.append(f"config {name!r}: dataset_info says {counted.get('train')} train rows, the files hold "
                        f"{rows}.")
    build = assets_dir(folder, name) / BUILD_INFO
    if build.exists():
        listed = {f["path"]: f["sha256"] for f in json.loads(build.read_text(encoding="utf-8"))["files"]}
        for path in files:
            if listed.get(path) != file_sha256(folder / path):
                problems.append(f"config {name!r}: {path} is not the file the card lists (SHA-256 differs); "
                                f"render the card again.")
    return problems


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _linked_assets(text: str) -> list[str]:
    return re.findall(r"\]\((assets/[^)\s]+\.png)\)", text)
