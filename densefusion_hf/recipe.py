"""Recipes: one YAML file per dataset (builders/*.yaml), validated when loaded.

Each stage has its own section, so stages still to come (dedup, embed, select, caption) add a section
and a name in ``STAGE_ORDER`` without touching the others.  Relative paths resolve against the recipe's
folder.  ``describe_fields(Recipe)`` lists every field with its help text.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from densefusion_hf.errors import RecipeError
from densefusion_hf.schema import SchemaProblem, describe_fields, option, parse

# Stages in the order a build runs them.  Each name is a module in densefusion_hf.stages.
STAGE_ORDER = ("ingest", "fetch", "publish")


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


@dataclass
class Source:
    """Where the LAION-style metadata comes from."""

    metadata: list[Path] = option(factory=list, help="Parquet files or glob patterns with the metadata")
    sample: bool = option(False, help="build the embedded offline sample (served from 127.0.0.1) instead")
    columns: SourceColumns = option(factory=SourceColumns, help="column names in the metadata")
    keep_columns: list[str] = option(factory=list, help="other metadata columns carried into the dataset")
    rows_per_shard: int = option(10_000, ge=1, help="rows per work shard; a crash loses at most one shard")
    limit: Optional[int] = option(None, ge=1, help="read only the first N metadata rows (a trial run)")

    def __post_init__(self):
        if bool(self.metadata) == self.sample:
            raise SchemaProblem("source", "give either 'metadata' (a list of Parquet files or globs) "
                                          "or 'sample: true', exactly one of them")


@dataclass
class MetadataFilters:
    """Filters on the metadata, applied before anything is downloaded. Null disables a filter."""

    min_short_side: Optional[int] = option(None, ge=1, help="drop images whose listed short side is smaller")
    max_aspect_ratio: Optional[float] = option(None, ge=1, help="drop images whose long/short side ratio is larger")
    max_punsafe: Optional[float] = option(None, ge=0, le=1, help="drop rows whose punsafe is larger")
    max_pwatermark: Optional[float] = option(None, ge=0, le=1, help="drop rows whose pwatermark is larger")
    min_similarity: Optional[float] = option(None, ge=-1, le=1, help="drop rows whose similarity is smaller")


@dataclass
class Resize:
    max_side: Optional[int] = option(None, ge=16, help="cap the longer side at this many pixels; "
                                                       "null keeps the original bytes untouched")


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


@dataclass
class Publish:
    """The final dataset folder, in the Hub's no-script layout."""

    output: Optional[Path] = option(None, help="dataset folder (default: WORKDIR/dataset)")
    rows_per_file: int = option(5_000, ge=1, help="rows per Parquet file in data/")


@dataclass
class Recipe:
    name: str = option(pattern=r"[a-z0-9][a-z0-9._-]*", help="dataset name (lower case, digits, . _ -)")
    source: Source = option(help="where the metadata comes from")
    version: str = option("0.1.0", pattern=r"\d+\.\d+\.\d+", help="dataset version X.Y.Z")
    pretty_name: Optional[str] = option(None, help="human-readable name for the dataset card")
    description: str = option("", help="one paragraph for the dataset card")
    license: str = option("other", help="license identifier for the dataset card")
    stages: list[Literal[STAGE_ORDER]] = option(factory=lambda: list(STAGE_ORDER),  # type: ignore[valid-type]
                                                help="stages to run, in build order")
    filters: MetadataFilters = option(factory=MetadataFilters, help="metadata filters")
    fetch: Fetch = option(factory=Fetch, help="download settings")
    publish: Publish = option(factory=Publish, help="output settings")

    def __post_init__(self):
        order = [s for s in STAGE_ORDER if s in self.stages]
        if order != self.stages:
            raise SchemaProblem("stages", f"stages must be listed once each, in build order "
                                          f"({', '.join(STAGE_ORDER)}); found {self.stages}")
        if self.stages[:1] != ["ingest"] or (len(self.stages) > 1 and self.stages[1] != "fetch"):
            raise SchemaProblem("stages", f"every build starts with ingest, then fetch (the stages after "
                                          f"them need the images); found {self.stages}")
        for name in ("punsafe", "pwatermark", "similarity"):
            limit = getattr(self.filters, ("min_" if name == "similarity" else "max_") + name)
            if limit is not None and getattr(self.source.columns, name) is None:
                raise SchemaProblem("filters", f"a {name} filter is set but source.columns.{name} is null; "
                                               f"name the column or remove the filter")
        if (self.filters.min_short_side or self.filters.max_aspect_ratio) and \
                (self.source.columns.width is None or self.source.columns.height is None):
            raise SchemaProblem("filters", "a size filter is set but source.columns.width/height is null; "
                                           "name the columns or remove the filter")

    # Set by load_recipe, not read from YAML.
    path: Path = field(default=Path(), init=False)
    sha256: str = field(default="", init=False)

    def section(self, stage: str) -> dict:
        """The recipe's settings as a plain dict, for manifests and fingerprints."""
        return asdict(getattr(self, stage))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found. Recipes live in builders/, "
                          f"e.g. `df-hf build builders/demo.yaml`.") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder; give the recipe's .yaml file.") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    recipe = parse(Recipe, data, source=path, base=path.resolve().parent)
    recipe.path = path.resolve()
    recipe.sha256 = hashlib.sha256(raw).hexdigest()
    return recipe


def recipe_fields() -> list[tuple[str, str, str]]:
    """(dotted path, type, help) of every recipe field."""
    return describe_fields(Recipe)
