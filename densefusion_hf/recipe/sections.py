"""Recipes: one YAML file per dataset (builders/*.yaml), validated when loaded.

Each stage has its own section, so a new stage (caption) adds a section and a name in ``STAGE_ORDER``
without touching the others.  Relative paths resolve against the recipe's
folder.  ``describe_fields(Recipe)`` lists every field with its help text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from densefusion_hf.errors import RecipeError
from densefusion_hf.recipe.schema import SchemaProblem, describe_fields, option, parse

# Stages in the order a build runs them.  Each name is a module in densefusion_hf.stages.
STAGE_ORDER = ("ingest", "fetch", "dedup", "embed", "semdedup", "select", "caption", "publish")


@dataclass
class SourceColumns:
    """Names of the metadata columns (LAION's names by default)."""

    url: str = option("URL", help="image URL")
    text: str = option("TEXT", help="alt text")
    width: Optional[str] = option("WIDTH", help="width in pixels as listed in the metadata (null: not present)")
    height: Optional[str] = option("HEIGHT", help="height in pixels as listed in the metadata (null: not present)")
    similarity: Optional[str] = option("similarity", help="CLIP image-text similarity (null: not present)")
    punsafe: Optional[str] = option("punsafe", help="probability of unsafe content (null: not present)")
    pwatermark: Optional[str] = option("pwatermark", help="probability of a watermark (null: not present)")


RELEASE_CAPTION_MODEL = ("DenseFusion-1M release (Perceptual Fusion caption engine: LLaVA-NeXT-7B fine-tuned on "
                         "DenseFusion-4V-100K's GPT-4V captions, arXiv 2407.08303)")


@dataclass
class ReleaseLayout:
    """Where a released dataset keeps its rows and images, and which fields hold what."""

    jsonl: str = option(help="path of the JSON Lines file inside the repo (one row a line)")
    images: str = option("images/{folder}/{shard}.zip",
                         help="path of a zip shard inside the repo; {folder} and {shard} are the parts of a row's "
                              "image path <folder>/<shard>/<member>")
    url: str = option("url", help="field holding the image URL")
    caption: str = option("caption", help="field holding the caption")
    image_path: str = option("image_path", help="field holding the image's path (<folder>/<shard>/<member>)")
    image_id: str = option("image_id", help="field holding the release's row id (read as text)")


@dataclass
class Release:
    """A released dataset (JSON Lines + zip shards of images) on the Hub or in a local folder of the same
    layout, imported as the rows of a build."""

    repo: str = option(help="Hub dataset repo ORG/NAME, or a local folder (starting with ./, ../, / or ~)")
    config: str = option(help="the release's config, e.g. DenseFusion-1M")
    layout: ReleaseLayout = option(help="where the JSON Lines and zips are, and the fields")
    revision: Optional[str] = option(None, help="commit, tag or branch of the repo (pin a commit for a build "
                                                "that can be repeated); null: main")
    caption_model: str = option(RELEASE_CAPTION_MODEL, help="what the caption column's caption_model says "
                                                              "about where the release's captions came from")

    @property
    def is_local(self) -> bool:
        return self.repo.startswith(("./", "../", "/", "~"))


@dataclass
class Source:
    """Where the rows come from: LAION-style metadata, the offline sample, or a released dataset."""

    metadata: list[Path] = option(factory=list, help="Parquet files or glob patterns with the metadata")
    exclude: list[Path] = option(factory=list, help="removal requests: text files (one URL, key or image SHA-256 "
                                                    "a line) or Parquet files (a url, key or sha256 column); "
                                                    "matching rows are dropped as removal_request")
    sample: bool = option(False, help="build the embedded offline sample (served from 127.0.0.1) instead")
    release: Optional[Release] = option(None, help="import a released dataset (JSON Lines + zips of images) "
                                                   "instead; images missing or damaged in it are fetched again "
                                                   "from their URLs")
    columns: SourceColumns = option(factory=SourceColumns, help="column names in the metadata")
    keep_columns: list[str] = option(factory=list, help="other metadata columns carried into the dataset")
    rows_per_shard: int = option(10_000, ge=1, help="rows per work shard; a crash loses at most one shard")
    limit: Optional[int] = option(None, ge=1, help="read only the first N metadata rows (a trial run)")

    def __post_init__(self):
        if [bool(self.metadata), self.sample, self.release is not None].count(True) != 1:
            raise SchemaProblem("source", "give either 'metadata' (a list of Parquet files or globs), "
                                          "'sample: true' or 'release' (a released dataset), exactly one of them")
        if self.release is not None and self.keep_columns:
            raise SchemaProblem("source.keep_columns", "a release keeps all its fields; remove keep_columns")


@dataclass
class MetadataFilters:
    """Size and score filters; null disables one. In ``filters`` they judge the metadata's listed sizes,
    before anything is downloaded; in ``select`` the decoded images."""

    min_short_side: Optional[int] = option(None, ge=1, help="drop images whose short side is smaller")
    max_aspect_ratio: Optional[float] = option(None, ge=1, help="drop images whose long/short side ratio is larger")
    max_punsafe: Optional[float] = option(None, ge=0, le=1, help="drop rows whose punsafe is larger")
    max_pwatermark: Optional[float] = option(None, ge=0, le=1, help="drop rows whose pwatermark is larger")
    min_similarity: Optional[float] = option(None, ge=-1, le=1, help="drop rows whose similarity is smaller")


@dataclass
class Resize:
    max_side: Optional[int] = option(None, ge=16, help="cap the longer side at this many pixels; "
                                                       "null keeps the original bytes untouched")


# Defaults admit every real photograph (a 150-megapixel camera file) and refuse decompression bombs;
# the pixel limit is Pillow's own refusal threshold, so Pillow never refuses an image fetch let through.
DEFAULT_MAX_BYTES = 128 * 2**20
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # img2dataset's own
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass
class Fetch:
    """Downloading with img2dataset."""

    resize: Resize = option(factory=Resize, help="resize policy")
    encode_format: Literal["jpg", "png", "webp"] = option("jpg", help="format of resized images")
    encode_quality: int = option(95, ge=1, le=100, help="quality of resized jpg/webp images (png: compression 0-9)")
    timeout: float = option(10.0, ge=0.1, help="seconds before a download is abandoned")
    retries: int = option(0, ge=0, help="extra attempts for a failed download")
    processes: int = option(1, ge=1, help="img2dataset download processes (does not change the output)")
    threads: int = option(16, ge=1, help="download threads per process (does not change the output)")
    user_agent_token: Optional[str] = option(None, help="token added to the User-Agent header")
    allow_private_addresses: bool = option(False, help="also fetch from loopback, private, link-local and other "
                                                       "non-public addresses (off: such URLs are dropped as "
                                                       "blocked_address)")
    allow_networks: list[str] = option(factory=list, help="non-public networks (10.0.0.0/8) or endpoints "
                                                          "(10.1.2.3:8080) that may be fetched from")
    max_bytes: Optional[int] = option(DEFAULT_MAX_BYTES, ge=1, help="largest download in bytes; larger ones are "
                                                                    "dropped as too_large (null: no limit)")
    max_pixels: Optional[int] = option(DEFAULT_MAX_PIXELS, ge=1, help="largest image in pixels (width x height), "
                                                                      "read from its header before decoding; "
                                                                      "larger ones are dropped as too_large")

    disallowed_header_directives: list[str] = option(
        factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES),
        help="X-Robots-Tag directives that refuse an image (dropped as disallowed_by_header); [] honours none")

    def __post_init__(self):
        from densefusion_hf.netguard.addresses import parse_allowed

        for i, entry in enumerate(self.allow_networks):
            try:
                parse_allowed(entry)
            except ValueError as exc:
                raise SchemaProblem(f"fetch.allow_networks[{i}]", str(exc)) from None


@dataclass
class Dedup:
    """Exact (sha256) and perceptual (image hash) duplicates. In each group the image with the most pixels
    is kept, then the least compressed copy, then the one with the highest similarity, then the smallest key; the others are dropped
    with ``dup_of``."""

    exact: bool = option(True, help="drop byte-identical images (same sha256)")
    perceptual: bool = option(True, help="drop near-identical images (image hashes within the threshold)")
    algorithm: Literal["phash", "dhash", "ahash", "whash"] = option("phash", help="imagehash algorithm")
    hash_size: int = option(8, ge=2, le=8, help="hash side; the hash has hash_size**2 bits (at most 64)")
    threshold: int = option(8, ge=0, le=16, help="largest Hamming distance between near duplicates "
                                                 "(above ~16 the search degrades towards all pairs)")
    processes: Optional[int] = option(None, ge=1, help="hashing processes (default: all cores; "
                                                       "does not change the output)")

    def __post_init__(self):
        if self.algorithm == "whash" and self.hash_size & (self.hash_size - 1):
            raise SchemaProblem("dedup.hash_size", f"whash needs a power of 2 (2, 4 or 8); found {self.hash_size}")


@dataclass
class Embed:
    """Image embeddings, written in clip-retrieval's layout (img_emb/ + metadata/)."""

    model: Optional[str] = option(None, help="CLIP or SigLIP model: a Hub id or a local folder "
                                             "(sample:tiny-clip is a random model for the offline demo)")
    batch_size: int = option(32, ge=1, help="images per forward pass (does not change the output)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", help="auto: cuda when present, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "auto", help="auto: float16 on cuda, float32 on cpu")


@dataclass
class SemDedup:
    """SemDeDup: k-means over the embeddings, then near duplicates inside each cluster."""

    clusters: int = option(50_000, ge=1, help="k-means clusters (the paper: 50,000)")
    eps: float = option(0.4, gt=0, le=2, help="pairs in a cluster with cosine distance < eps are duplicates")
    seed: int = option(0, help="seed of k-means (the same seed selects the same rows)")
    train_points: Optional[int] = option(None, ge=1, help="k-means trains on a seeded sample of this many "
                                                          "points (default: 64 per cluster)")
    iterations: int = option(8, ge=1, help="k-means iterations")


@dataclass
class Category:
    name: str = option(pattern=r"[a-z0-9][a-z0-9_-]*", help="category name (lower case)")
    prompts: list[str] = option(help="texts describing the category, embedded with the embed model")
    min_share: Optional[float] = option(None, ge=0, le=1, help="at least this share of the target size")
    max_share: Optional[float] = option(None, ge=0, le=1, help="at most this share of the target size")

    def __post_init__(self):
        if self.min_share is not None and self.max_share is not None and self.min_share > self.max_share:
            raise SchemaProblem("select.categories", f"{self.name}: min_share {self.min_share} is larger than "
                                                     f"max_share {self.max_share}")


@dataclass
class Subset:
    size: int = option(ge=1, help="rows in the random subset")
    seed: int = option(0, help="seed; the same seed gives the same subset")


@dataclass
class Select(MetadataFilters):
    """The same filters on the downloaded images, then categories and cluster-based selection."""

    categories: list[Category] = option(factory=list, help="categories, each with prompts and optional quotas")
    category_threshold: float = option(0.2, ge=-1, le=1, help="an image takes its best category when the "
                                                              "cosine similarity reaches this, else 'other'")
    top_per_cluster: Optional[int] = option(None, ge=1, help="keep the best N images of each cluster")
    rank_by: Literal["centroid", "similarity", "resolution"] = option(
        "centroid", help="cluster ranking: closest to the centroid, highest similarity, or most pixels")
    target_size: Optional[int] = option(None, ge=1, help="stop at this many rows (best ranks first)")
    subset: Optional[Subset] = option(None, help="a seeded random subset of the selection (a derived config)")

    def __post_init__(self):
        names = [c.name for c in self.categories]
        if len(set(names)) != len(names) or "other" in names:
            raise SchemaProblem("select.categories", f"category names must be unique and not 'other'; found {names}")
        if sum(c.min_share or 0 for c in self.categories) > 1:
            raise SchemaProblem("select.categories", "the min_share values add up to more than 1")


Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass
class Tagger:
    """Image tagging: zero-shot classification (CLIP / SigLIP) over a tag vocabulary."""

    model: Optional[str] = option(None, help="CLIP or SigLIP model (Hub id or local folder); null disables tagging")
    vocabulary: Optional[Path] = option(None, help="tag file, one tag per line, '#' comments "
                                                    "(default: the package's everyday-image vocabulary)")
    hypothesis_template: str = option("a photo of {}.", help="text each tag is put into before embedding")
    threshold: float = option(0.01, ge=0, le=1, help="keep tags whose score (softmax over the vocabulary "
                                                       "for CLIP, sigmoid for SigLIP) reaches this")
    top_k: int = option(10, ge=1, help="keep at most this many tags, best first")
    batch_size: int = option(32, ge=1, help="images per forward pass (does not change the output)")
    device: Device = option("auto", help="auto: cuda when present, else cpu")
    dtype: Dtype = option("auto", help="auto: float16 on cuda, float32 on cpu")


@dataclass
class Detector:
    """Closed-set object detection through the object-detection pipeline (DETR / RT-DETR family)."""

    model: Optional[str] = option(None, help="detection model (Hub id or local folder); null disables it")
    threshold: float = option(0.5, ge=0, le=1, help="keep boxes whose confidence reaches this")
    batch_size: int = option(8, ge=1, help="images per forward pass (does not change the output)")
    device: Device = option("auto", help="auto: cuda when present, else cpu")
    dtype: Dtype = option("auto", help="auto: float16 on cuda, float32 on cpu")


@dataclass
class OpenSetDetector:
    """Open-set detection through the zero-shot-object-detection pipeline (OWLv2 / OWL-ViT), queried with
    the tagger's tags as the paper does."""

    model: Optional[str] = option(None, help="OWLv2 / OWL-ViT model (Hub id or local folder); null disables it")
    threshold: float = option(0.2, ge=0, le=1, help="keep boxes whose confidence reaches this")
    max_queries: int = option(16, ge=1, help="query with at most this many tags (the best ones)")
    batch_size: int = option(4, ge=1, help="images per forward pass, each with all its queries (does not "
                                            "change the output)")
    device: Device = option("auto", help="auto: cuda when present, else cpu")
    dtype: Dtype = option("auto", help="auto: float16 on cuda, float32 on cpu")


@dataclass
class Ocr:
    """Text in the image: rapidocr (PaddleOCR's models, shipped in its wheel) or a transformers model."""

    engine: Optional[Literal["rapidocr", "transformers"]] = option(
        "rapidocr", help="rapidocr, transformers (an image-text-to-text OCR model), or null to disable OCR")
    model: Optional[str] = option(None, help="the transformers OCR model (engine: transformers only)")
    prompt: str = option("Read all the text in the image, one line per line of text.",
                         help="instruction given to a transformers OCR model")
    min_score: float = option(0.8, ge=0, le=1, help="rapidocr: keep lines whose recognition score reaches this")
    max_lines: int = option(20, ge=1, help="keep at most this many lines, in reading order")
    max_new_tokens: int = option(256, ge=1, help="transformers OCR: longest text read, in tokens")
    batch_size: int = option(4, ge=1, help="transformers OCR: images per generation batch")
    device: Device = option("auto", help="transformers OCR: auto uses cuda when present; rapidocr: cuda runs "
                                         "onnxruntime's CUDA provider, auto does when onnxruntime-gpu sees a GPU")
    dtype: Dtype = option("auto", help="transformers OCR: auto is bfloat16 on cuda, float32 on cpu")

    def __post_init__(self):
        if (self.engine == "transformers") != bool(self.model):
            raise SchemaProblem("caption.experts.ocr", "ocr.model is needed with engine: transformers, "
                                                       "and only then")


@dataclass
class AltText:
    """World knowledge: the web alt text, cleaned, marked in the prompt as possibly wrong."""

    enabled: bool = option(True, help="give the cleaned alt text to the captioner")
    max_chars: int = option(500, ge=1, help="cut longer alt texts at a word boundary")


@dataclass
class Boxes:
    """Post-processing of both detectors' boxes before they become priors."""

    merge_iou: float = option(0.7, ge=0, le=1, help="boxes of the same label from the two detectors with at "
                                                     "least this IoU are one object (the surer one is kept)")
    merge_any_label_iou: float = option(0.9, ge=0, le=1, help="boxes of the two detectors with at least this IoU "
                                                               "are one object whatever their labels")
    max_boxes: int = option(20, ge=0, help="at most this many boxes per image")
    max_per_label: int = option(5, ge=1, help="at most this many boxes with the same label")
    small_area: float = option(0.02, gt=0, le=1, help="a box covering less than this share of the image is small")
    large_area: float = option(0.2, gt=0, le=1, help="a box covering at least this share is large")

    def __post_init__(self):
        if self.small_area >= self.large_area:
            raise SchemaProblem("caption.experts.boxes", f"small_area ({self.small_area}) must be smaller than "
                                                         f"large_area ({self.large_area})")


@dataclass
class Experts:
    """The vision experts whose outputs become the caption's priors."""

    tagger: Tagger = option(factory=Tagger, help="image tagging")
    detector: Detector = option(factory=Detector, help="closed-set object detection")
    open_set: OpenSetDetector = option(factory=OpenSetDetector, help="open-set detection queried with the tags")
    ocr: Ocr = option(factory=Ocr, help="text recognition")
    alt_text: AltText = option(factory=AltText, help="the alt text as world knowledge")
    boxes: Boxes = option(factory=Boxes, help="box merging and balanced sampling")

    def __post_init__(self):
        if self.open_set.model and not self.tagger.model:
            raise SchemaProblem("caption.experts.open_set", "the open-set detector is queried with the tagger's "
                                                            "tags; set caption.experts.tagger.model too, or set "
                                                            "open_set.model to null")


@dataclass
class Generation:
    """Generation settings of the multimodal LLM."""

    max_new_tokens: int = option(512, ge=1, help="longest caption in tokens")
    do_sample: bool = option(False, help="false: greedy decoding (the same inputs give the same caption)")
    temperature: float = option(1.0, gt=0, help="sampling temperature (do_sample only)")
    top_p: float = option(1.0, gt=0, le=1, help="nucleus sampling (do_sample only)")
    repetition_penalty: float = option(1.05, ge=1, help="> 1 discourages repeated text")
    seed: int = option(0, help="seed for sampling")


@dataclass
class ServerImage:
    """How the image travels to an OpenAI-compatible server: a base64 data URL."""

    max_side: Optional[int] = option(None, ge=16, help="re-encode with the longer side capped at this many pixels "
                                                       "(null: the stored bytes when JPEG/PNG/WebP, else PNG)")
    format: Optional[Literal["jpeg", "png", "webp"]] = option(
        None, help="re-encode in this format (null: the stored bytes when JPEG/PNG/WebP and max_side is null)")
    quality: int = option(95, ge=1, le=100, help="quality of re-encoded jpeg/webp images")


@dataclass
class Server:
    """An OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, TGI, transformers serve), engine openai."""

    base_url: str = option("http://127.0.0.1:8000/v1", pattern=r"https?://\S+",
                           help="the server's API root, ending in /v1; {node_ip} stands for the address of "
                                "the node each caption worker runs on (one server per GPU node)")
    api_key_env: Optional[str] = option(None, pattern=r"[A-Za-z_][A-Za-z0-9_]*",
                                        help="name of the environment variable holding the API key (the key "
                                             "itself never goes in the recipe); null: no key")
    generation_fields: Literal["openai", "transformers"] = option(
        "openai", help="openai: max_tokens, temperature, top_p, seed and repetition_penalty as request fields "
                       "(vLLM, SGLang); transformers: one generation_config JSON field (transformers serve)")
    image: ServerImage = option(factory=ServerImage, help="image encoding")
    concurrency: int = option(16, ge=1, help="requests in flight at once (does not change the output)")
    timeout: float = option(600.0, gt=0, help="seconds before a request is abandoned (then retried)")
    retries: int = option(3, ge=0, help="retries of a request after a 429, a 5xx, a timeout or a connection error")
    backoff: float = option(1.0, ge=0, help="seconds before the first retry, doubled after each one "
                                            "(a Retry-After header is honoured)")


@dataclass
class Caption:
    """Perceptual Fusion: vision experts give priors, a multimodal LLM writes the caption from image + priors."""

    engine: Literal["transformers", "openai", "template"] = option(
        "transformers", help="transformers: an image-text-to-text model in this process; openai: an "
                             "OpenAI-compatible server (caption.server); template: the priors written out as a "
                             "structured description (offline, no model)")
    model: Optional[str] = option(None, help="the multimodal LLM: a Hub id or local folder (engine transformers), "
                                             "or the served model's name (engine openai)")
    server: Server = option(factory=Server, help="the server, engine openai")
    workers: int = option(0, ge=0, help="processes that decode the next chunks and run their CPU experts (OCR, "
                                        "experts on device cpu) while the current chunk generates; 0: all in "
                                        "this process, one step after the other (does not change the output)")
    prompt_template: Optional[Path] = option(None, help="prompt template file (default: the package's "
                                                         "Perceptual Fusion prompt)")
    experts: Experts = option(factory=Experts, help="vision experts")
    generation: Generation = option(factory=Generation, help="generation settings")
    rows_per_chunk: int = option(32, ge=1, help="rows captioned and saved together; a crash loses at most one chunk")
    batch_size: int = option(4, ge=1, help="images per generation batch (does not change greedy output much)")
    device: Device = option("auto", help="auto: cuda when present, else cpu")
    dtype: Dtype = option("auto", help="auto: bfloat16 on cuda, float32 on cpu")

    def __post_init__(self):
        if self.engine == "transformers" and not self.model:
            raise SchemaProblem("caption.model", "engine 'transformers' needs a model (a Hub id or a local folder); "
                                                 "or use engine: template to write the priors without a model")
        if self.engine == "openai" and not self.model:
            raise SchemaProblem("caption.model", "engine 'openai' needs the served model's name (as the server's "
                                                 "/v1/models lists it)")


@dataclass
class Publish:
    """The final dataset folder, in the Hub's no-script layout."""

    output: Optional[Path] = option(None, help="dataset folder (default: WORKDIR/dataset)")
    config: Optional[str] = option(None, pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*",
                                   help="config name on the Hub, also the folder of its Parquet files "
                                        "(default: the recipe name)")
    max_shard_mb: float = option(500, gt=0, help="largest Parquet file in MB (1 MB = 10^6 bytes); the file "
                                                 "count is rounded up to split evenly over 1-64 consumers")
    max_row_group_mb: float = option(100, gt=0, help="largest row group in MB (row groups also hold at most "
                                                     "100 rows, for random access and the Hub's viewer)")
    min_shards: int = option(1, ge=1, help="write at least this many Parquet files (e.g. one per DataLoader "
                                           "worker on a small dataset)")
    repo: Optional[str] = option(None, pattern=r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*",
                                 help="Hub dataset repo ORG/NAME that `df-hf build --push` publishes to")
    private: bool = option(False, help="create the Hub repo private")


@dataclass
class Workers:
    """One stage's workers on a cluster (`df-hf build --runner ray`); these settings only change speed."""

    cpus: float = option(1, gt=0, help="CPUs each worker (Ray task or actor) reserves")
    gpus: float = option(0, ge=0, help="GPUs each worker reserves; a fraction shares one (0.5: two workers a GPU)")
    workers: Optional[int] = option(None, ge=1, help="actors of fetch, embed and caption (default: as many as "
                                                     "the cluster's resources fit), or tasks in flight for the "
                                                     "others (default: no limit)")
    max_workers: Optional[int] = option(None, ge=1, help="autoscaling: start `workers` actors and add more, up "
                                                         "to this many, while shards wait and the cluster has room")
    batch_size: Optional[int] = option(None, ge=1, help="images per model call on these workers (embed: "
                                                        "embed.batch_size, caption: caption.batch_size)")


@dataclass
class Runner:
    """Resources of each stage's workers on a Ray cluster; the local runner ignores them."""

    max_retries: int = option(3, ge=0, help="a shard whose worker dies (killed, out of memory, node lost) is "
                                            "retried this many times on another worker, then the build stops")
    ingest: Workers = option(factory=Workers, help="metadata reading and filtering, one task per shard")
    fetch: Workers = option(factory=Workers, help="img2dataset downloads: actors that keep img2dataset's "
                                                  "workers from shard to shard (give each the CPUs of "
                                                  "fetch.processes)")
    dedup: Workers = option(factory=Workers, help="perceptual hashing, one task per shard")
    embed: Workers = option(factory=Workers, help="CLIP / SigLIP embedding actors")
    semdedup: Workers = option(factory=Workers, help="centroid assignment and within-cluster search tasks")
    select: Workers = option(factory=Workers, help="selection tasks")
    caption: Workers = option(factory=Workers, help="Perceptual Fusion actors (experts + captioner)")
    publish: Workers = option(factory=Workers, help="(runs on the driver: it writes the dataset folder)")

    def __post_init__(self):
        for name in STAGE_ORDER:
            workers = getattr(self, name)
            if workers.max_workers is not None and workers.max_workers < (workers.workers or 1):
                raise SchemaProblem(f"runner.{name}.max_workers",
                                    f"max_workers ({workers.max_workers}) is below workers ({workers.workers or 1}); "
                                    f"it is the upper end of the range")


@dataclass
class Recipe:
    name: str = option(pattern=r"[a-z0-9][a-z0-9._-]*", help="dataset name (lower case, digits, . _ -)")
    source: Source = option(help="where the metadata comes from")
    version: str = option("0.1.0", pattern=r"\d+\.\d+\.\d+", help="dataset version X.Y.Z")
    pretty_name: Optional[str] = option(None, help="human-readable name for the dataset card")
    description: str = option("", help="one paragraph for the dataset card")
    license: str = option("other", help="license identifier for the dataset card")
    changelog: dict[str, str] = option(factory=dict, help="what changed in each version (X.Y.Z: text), "
                                                          "listed on the dataset card")
    stages: Optional[list[Literal[STAGE_ORDER]]] = option(  # type: ignore[valid-type]
        None, help="stages to run, in build order (default: all; embed and semdedup only with embed.model, "
                   "caption only with a caption section)")
    filters: MetadataFilters = option(factory=MetadataFilters, help="metadata filters")
    fetch: Fetch = option(factory=Fetch, help="download settings")
    dedup: Dedup = option(factory=Dedup, help="exact and perceptual deduplication")
    embed: Embed = option(factory=Embed, help="image embeddings")
    semdedup: SemDedup = option(factory=SemDedup, help="semantic deduplication")
    select: Select = option(factory=Select, help="selection")
    caption: Optional[Caption] = option(None, help="captioning; without this section no caption stage runs")
    publish: Publish = option(factory=Publish, help="output settings")
    runner: Runner = option(factory=Runner, help="workers per stage on a Ray cluster (speed only: changing "
                                                 "them never blocks a resume)")

    def __post_init__(self):
        if self.stages is None:
            skip = () if self.embed.model else ("embed", "semdedup")
            skip += () if self.caption else ("caption",)
            self.stages = [s for s in STAGE_ORDER if s not in skip]
        order = [s for s in STAGE_ORDER if s in self.stages]
        if order != self.stages:
            raise SchemaProblem("stages", f"stages must be listed once each, in build order "
                                          f"({', '.join(STAGE_ORDER)}); found {self.stages}")
        if self.stages[:1] != ["ingest"] or (len(self.stages) > 1 and self.stages[1] != "fetch"):
            raise SchemaProblem("stages", f"every build starts with ingest, then fetch (the stages after "
                                          f"them need the images); found {self.stages}")
        needs = {"semdedup": "embed", "select": "semdedup" if self.select.top_per_cluster else None}
        if self.select.categories:
            needs["select"] = needs["select"] or "embed"
        for stage, needed in needs.items():
            if stage in self.stages and needed and needed not in self.stages:
                raise SchemaProblem("stages", f"{stage} needs the {needed} stage; add it to stages")
        if "caption" in self.stages and self.caption is None:
            raise SchemaProblem("stages", "the caption stage needs a caption section (at least caption.engine)")
        if "embed" in self.stages and not self.embed.model:
            raise SchemaProblem("embed.model", "the embed stage needs a model (a Hub id or a local folder)")
        for name in ("punsafe", "pwatermark", "similarity"):
            limit = getattr(self.filters, ("min_" if name == "similarity" else "max_") + name)
            if limit is not None and getattr(self.source.columns, name) is None:
                raise SchemaProblem("filters", f"a {name} filter is set but source.columns.{name} is null; "
                                               f"name the column or remove the filter")
        if (self.filters.min_short_side or self.filters.max_aspect_ratio) and \
                (self.source.columns.width is None or self.source.columns.height is None):
            raise SchemaProblem("filters", "a size filter is set but source.columns.width/height is null; "
                                           "name the columns or remove the filter")

        for version in self.changelog:
            if not re.fullmatch(r"\d+\.\d+\.\d+", str(version)):
                raise SchemaProblem("changelog", f"keys are versions X.Y.Z; found {version!r}")

    @property
    def config_name(self) -> str:
        """The dataset's config on the Hub and the folder of its Parquet files."""
        return self.publish.config or self.name

    # Set by load_recipe, not read from YAML.
    path: Path = field(default=Path(), init=False)
    sha256: str = field(default="", init=False)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[object, bytes]:
    """The document at ``path`` with its ``extends:`` base merged under it, and all the bytes read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        where = f" (extended by {chain[-1]})" if chain else ""
        raise RecipeError(f"{path}: recipe file not found{where}. Recipes live in builders/, "
                          f"e.g. `df-hf build builders/demo.yaml`.") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder; give the recipe's .yaml file.") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data, raw
    data = dict(data)
    parent = data.pop("extends")
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected the path of another recipe, found {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in chain or parent_path == path.resolve():
        raise RecipeError(f"{path}: extends: {parent} extends itself (through {', '.join(map(str, chain))})")
    base, base_raw = _read_yaml(parent_path, chain + (path.resolve(),))
    return _merge(base, data), base_raw + raw


def _merge(base, override):
    """Mappings merge key by key; anything else in ``override`` replaces what ``base`` had."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return override


def model_sections(recipe: Recipe) -> list:
    """Every recipe section that names a model in its ``model`` field."""
    sections = [recipe.embed]
    if recipe.caption:
        experts = recipe.caption.experts
        # A served model is named as its server knows it, never resolved as a local folder.
        sections += [recipe.caption] if recipe.caption.engine != "openai" else []
        sections += [experts.tagger, experts.detector, experts.open_set, experts.ocr]
    return sections


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; errors name the file and the field.

    ``extends: other.yaml`` starts from another recipe and changes only what is written; relative paths
    resolve against the folder of the file being loaded.
    """
    path = Path(path)
    data, raw = _read_yaml(path)
    base = path.resolve().parent
    recipe = parse(Recipe, data, source=path, base=base)
    release = recipe.source.release
    if release is not None and release.is_local:
        release.repo = str((base / Path(release.repo).expanduser()).resolve())
    for section in model_sections(recipe):
        model = section.model
        if model and (model.startswith((".", "/", "~")) or (base / model).is_dir()):  # a local folder
            section.model = str((base / Path(model).expanduser()).resolve())
    recipe.path = path.resolve()
    recipe.sha256 = hashlib.sha256(raw).hexdigest()
    return recipe


def recipe_fields() -> list[tuple[str, str, str]]:
    """(dotted path, type, help) of every recipe field."""
    return describe_fields(Recipe)
