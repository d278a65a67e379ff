"""What a dataset card says about how the data was made, gathered once at publish time.

Saved beside the data as ``assets/CONFIG/build.json``: ``df-hf card render`` renders the card again from it
without the work directory, and ``df-hf card check`` compares it with the files.  Nothing in it depends
on the clock or the machine, so a rebuild with the same recipe and inputs writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from densefusion_hf import __version__
from densefusion_hf.recipe import Recipe

BUILD_INFO = "build.json"


def version_key(version: str) -> tuple[int, ...]:
    """A version X.Y.Z in the order of releases (as text, 1.10.0 would sort before 1.2.0)."""
    return tuple(int(part) for part in version.split("."))


def assets_dir(folder: Path, config: str) -> Path:
    return Path(folder) / "assets" / config


def file_sha256(path: Path) -> str:
    from densefusion_hf.stages.shards import file_digest  # here: the stages package imports this module

    return file_digest(path)


def describe_files(folder: Path, paths: list[Path], sha256s: list[str] | None = None) -> list[dict]:
    """Each data file's path in the repo, rows, size and SHA-256 (computed unless given): the card lists
    them, so the card (which ``datasets`` fingerprints) changes whenever the data does."""
    sha256s = sha256s or [file_sha256(p) for p in paths]
    return [{"path": p.relative_to(folder).as_posix(), "rows": pq.ParquetFile(p).metadata.num_rows,
             "bytes": p.stat().st_size, "sha256": digest} for p, digest in zip(paths, sha256s)]


def _model_name(model: str | None) -> str | None:
    from densefusion_hf.fusion.engine import model_name

    return model_name(model) if model else None


def caption_info(recipe: Recipe, prompt_versions: list[str]) -> dict | None:
    """The captioner and experts the recipe names, and the prompt the captions came from."""
    caption = recipe.caption
    if caption is None or "caption" not in recipe.stages:
        return None
    experts = caption.experts
    info = {
        "engine": caption.engine,
        "model": _model_name(caption.model) if caption.engine != "template" else "template",
        "experts": {
            "tagger": _model_name(experts.tagger.model),
            "detector": _model_name(experts.detector.model),
            "open_set": _model_name(experts.open_set.model),
            "ocr": (_model_name(experts.ocr.model) if experts.ocr.engine == "transformers" else experts.ocr.engine),
            "alt_text": experts.alt_text.enabled,
        },
        "generation": {"max_new_tokens": caption.generation.max_new_tokens,
                       "do_sample": caption.generation.do_sample,
                       "repetition_penalty": caption.generation.repetition_penalty},
        "prompt_versions": prompt_versions,
        "prompt": None,
    }
    if caption.engine != "template":
        from densefusion_hf.fusion.prompt import PromptTemplate

        info["prompt"] = PromptTemplate.load(caption.prompt_template).body.strip()
    return info


def build_info(recipe: Recipe, *, features: dict, stages: list[dict], selection: dict | None, stats: dict,
               files: list[dict], num_bytes: int, prompt_versions: list[str], release: dict | None = None) -> dict:
    info = {
        "config": recipe.config_name,
        "recipe": {"name": recipe.name, "version": recipe.version, "sha256": recipe.sha256,
                   "pretty_name": recipe.pretty_name or recipe.name, "description": recipe.description.strip(),
                   "license": recipe.license, "changelog": dict(recipe.changelog)},
        "package_version": __version__,
        "stages": stages,
        "selection": selection,
        "stats": stats,
        "caption": caption_info(recipe, prompt_versions),
        "header_directives": sorted(d.lower() for d in recipe.fetch.disallowed_header_directives),
        "features": features,
        "files": files,
        "num_bytes": num_bytes,
    }
    if release is not None:  # absent otherwise, so other builds' build.json stay byte-identical
        info["release"] = release
    return info


def write_build_info(folder: Path, info: dict) -> Path:
    path = assets_dir(folder, info["config"]) / BUILD_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
