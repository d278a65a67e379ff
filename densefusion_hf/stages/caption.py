"""caption: Perceptual Fusion.  The vision experts give each image its priors, the prompt template turns
them into text, and the caption engine writes the caption from image + prompt.

Columns added: ``caption``, ``priors`` (tags, boxes with label / score / expert, OCR lines, the cleaned
alt text, and the experts that failed on the image), ``caption_model``, ``prompt_version``,
``caption_words``.  Rows whose image cannot be decoded (where anything needs its pixels), or for which no
caption came out, are dropped with the reason (``undecodable``, ``caption_failed``, ``empty_caption``).

Captioning is the slowest stage, so each shard is done in chunks of ``caption.rows_per_chunk`` rows,
each committed on its own under ``caption/chunks/<shard>/``: a crash loses at most one chunk.  When all
chunks of a shard are done they are joined into the stage's shard and removed.

``write_prompts`` is the dry run: the experts and the prompt for the first rows, written to a JSON
Lines file without generating, for reading the prompts before spending GPU hours.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from densefusion_hf.errors import UserError
from densefusion_hf.fusion.boxes import postprocess
from densefusion_hf.fusion.describe import TEMPLATE_VERSION
from densefusion_hf.fusion.engine import load_engine
from densefusion_hf.fusion.experts import (EXPERT_ORDER, apply, cpu_experts, enabled_experts, load_experts,
                                           read_vocabulary)
from densefusion_hf.fusion.priors import PRIORS_TYPE, Priors
from densefusion_hf.fusion.workers import Prepared, PriorsPool, first_pass
from densefusion_hf.fusion.prompt import PromptTemplate
from densefusion_hf.models import resolved_dtype_name
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages.shards import StageDir, atomic_write_bytes, atomic_write_json, shard_name
from densefusion_hf.stages.base import BuildContext, ShardStage, image_chunks, with_images

CAPTION_FIELDS = [
    pa.field("caption", pa.string()),
    pa.field("priors", PRIORS_TYPE),
    pa.field("caption_model", pa.string()),
    pa.field("prompt_version", pa.string()),
    pa.field("caption_words", pa.int32()),
]


BESIDE_A_RELEASE_CAPTION = {"caption": "fusion_caption", "caption_model": "fusion_caption_model",
                            "prompt_version": "fusion_prompt_version"}


def caption_words(text: str) -> int:
    return len(text.split())


def _expert_params(caption) -> dict:
    """The expert settings that decide the priors (not batch sizes or devices), with resolved dtypes."""
    experts = caption.experts
    params = {"boxes": asdict(experts.boxes), "alt_text": asdict(experts.alt_text)}
    for name in ("tagger", "detector", "open_set"):
        section = getattr(experts, name)
        if section.model:
            chosen = {k: v for k, v in asdict(section).items() if k not in ("batch_size", "device", "dtype")}
            chosen["dtype"] = resolved_dtype_name(section.dtype, section.device)
            params[name] = chosen
    if experts.tagger.model:
        vocabulary = read_vocabulary(experts.tagger.vocabulary)
        params["tagger"]["vocabulary"] = hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()
    ocr = experts.ocr
    if ocr.engine == "rapidocr":
        params["ocr"] = {"engine": ocr.engine, "min_score": ocr.min_score, "max_lines": ocr.max_lines,
                         "line_boxes": True}  # each line's box is saved (older builds have none)
    elif ocr.engine == "transformers":
        params["ocr"] = {"engine": ocr.engine, "model": ocr.model, "prompt": ocr.prompt, "max_lines": ocr.max_lines,
                         "max_new_tokens": ocr.max_new_tokens,
                         "dtype": resolved_dtype_name(ocr.dtype, ocr.device, half="bfloat16")}
    return params


class Captioner:
    """Experts + prompt + engine, loaded once; ``caption_rows`` captions a table of rows with images,
    ``caption_chunks`` a sequence of them, with the next chunks' first pass in worker processes when
    ``caption.workers`` is set.  ``close`` stops the workers and the engine's connections."""

    def __init__(self, recipe: Recipe, workdir: Path, generate: bool = True, workers: int | None = None):
        self.settings = recipe.caption
        self.template = PromptTemplate.load(self.settings.prompt_template)
        workers = self.settings.workers if workers is None else workers
        offloaded = cpu_experts(self.settings) if workers else []
        self.experts = load_experts(self.settings, workdir, [n for n in enabled_experts(self.settings)
                                                             if n not in offloaded])
        self.pool = PriorsPool(self.settings, workdir, offloaded, workers) if workers else None
        try:
            self.engine = load_engine(self.settings, workdir, self.template.prompt_version) if generate else None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            close()

    def prepared(self, parts: Iterable[pa.Table]) -> Iterator[Prepared]:
        """Each part after every expert (in workers for the offloaded ones, then here for the others) and the
        box post-processing."""
        if self.pool is None:
            firsts = (first_pass(self.settings, self.experts, part) for part in parts)
            local = []
        else:
            firsts = self.pool.prepared(parts)
            local = self.experts
        for chunk in firsts:
            for expert in local:
                started = time.perf_counter()
                apply(expert, chunk.images, chunk.priors)
                chunk.seconds[expert.name] += time.perf_counter() - started
            started = time.perf_counter()
            for prior in chunk.priors:
                # Experts append in the order they ran; put boxes and failures in the experts' own order, so
                # where an expert ran never changes the priors.
                prior.boxes = sorted(prior.boxes, key=lambda b: EXPERT_ORDER.index(b.expert))
                prior.failures = sorted(prior.failures, key=lambda f: EXPERT_ORDER.index(f.expert))
                prior.boxes = postprocess(prior.boxes, self.settings.experts.boxes)
            chunk.seconds["boxes"] += time.perf_counter() - started
            yield chunk

    def priors_for(self, rows: pa.Table) -> tuple[list, list[Priors], list[bool], list[dict], dict]:
        """(decoded images, their priors, which rows decoded, drops, seconds per step) for rows that carry
        ``image``."""
        chunk = next(self.prepared([rows]))
        return chunk.images, chunk.priors, chunk.decoded, chunk.drops, dict(chunk.seconds)

    def prompts_for(self, priors: list[Priors]) -> list[str]:
        return [self.template.render(p) for p in priors]

    def caption_chunks(self, parts: Iterable[pa.Table]) -> Iterator[tuple[pa.Table, list[dict], dict]]:
        """``caption_rows`` of each part, in order; the first pass of the next parts overlaps this one's
        generation when there are workers."""
        for chunk in self.prepared(parts):
            yield self._caption_prepared(chunk)

    def caption_rows(self, rows: pa.Table) -> tuple[pa.Table, list[dict], dict]:
        """(captioned rows without image bytes, drops, stats: seconds per step and failures per expert)."""
        return next(self.caption_chunks([rows]))

    def _caption_prepared(self, chunk: Prepared) -> tuple[pa.Table, list[dict], dict]:
        images, priors, drops, seconds = chunk.images, chunk.priors, chunk.drops, dict(chunk.seconds)
        rows = chunk.rows.filter(pa.array(chunk.decoded, pa.bool_())) if drops else chunk.rows
        started = time.perf_counter()
        prompts = self.prompts_for(priors)
        seconds["prompt"] = time.perf_counter() - started
        started = time.perf_counter()
        blobs = rows.column("image").to_pylist() if self.settings.engine == "openai" else None
        captions = self.engine.caption(images, priors, prompts, blobs=blobs) if images else []
        seconds["generate"] = time.perf_counter() - started
        failed = [c for c in captions if isinstance(c, Exception)]
        if len(images) > 1 and len(failed) == len(images):
            # Every image failing is the captioner's problem (memory, a broken chat template), not the
            # images': stop before the chunk is saved, so a rerun after the fix captions these rows.
            hint = ("check the server and caption.server" if self.settings.engine == "openai"
                    else "a smaller caption.batch_size for out-of-memory errors")
            raise UserError(f"The caption model failed on every image of a chunk ({len(images)} images); nothing "
                            f"of the chunk was saved. The first error: {failed[0]}. Fix the cause ({hint}) and "
                            f"run the same command again.")

        kept = []
        for i, (key, url, caption) in enumerate(zip(rows.column("key").to_pylist(), rows.column("url").to_pylist(),
                                                    captions)):
            if isinstance(caption, Exception):
                drops.append({"key": key, "url": url, "reason": "caption_failed", "detail": str(caption)})
            elif not caption.strip():
                drops.append({"key": key, "url": url, "reason": "empty_caption",
                              "detail": f"{self.engine.name} generated no text"})
            else:
                kept.append(i)
        rows = rows.drop_columns(["image"]).take(pa.array(kept, pa.int64()))
        texts = [captions[i] for i in kept]
        added = {
            "caption": pa.array(texts, pa.string()),
            "priors": pa.array([priors[i].to_row() for i in kept], PRIORS_TYPE),
            "caption_model": pa.array([self.engine.name] * len(kept), pa.string()),
            "prompt_version": pa.array([self.engine.prompt_version] * len(kept), pa.string()),
            "caption_words": pa.array([caption_words(t) for t in texts], pa.int32()),
        }
        # Rows that already have a caption (a release's) keep it; ours goes beside it, in fusion_caption.
        beside = "caption" in rows.column_names
        for field in CAPTION_FIELDS:
            name = BESIDE_A_RELEASE_CAPTION.get(field.name, field.name) if beside else field.name
            rows = rows.append_column(field.with_name(name), added[field.name])
        failures = Counter(f.expert for prior in priors for f in prior.failures)
        return rows, drops, {"seconds_by_step": seconds, "expert_failures": dict(sorted(failures.items()))}


class Caption(ShardStage):
    name = "caption"
    session_per_worker = True  # the model, loaded once per worker

    def params(self, recipe: Recipe) -> dict:
        caption = recipe.caption
        params = {"engine": caption.engine, "experts": _expert_params(caption)}
        if caption.engine == "template":  # it writes the priors in its own format and reads no prompt
            params["template_version"] = TEMPLATE_VERSION
            return params
        template = PromptTemplate.load(caption.prompt_template)
        generation = asdict(caption.generation)
        if not caption.generation.do_sample:  # greedy: the sampling settings change nothing
            for name in ("temperature", "top_p", "seed"):
                generation.pop(name)
        params.update(prompt_version=template.prompt_version, prompt_sha256=template.sha256, model=caption.model,
                      generation=generation)
        if caption.engine == "openai":
            # What the server is asked and sees; not where it is, nor concurrency, timeouts and retries.
            params.update(image=asdict(caption.server.image), generation_fields=caption.server.generation_fields)
        else:
            params["dtype"] = resolved_dtype_name(caption.dtype, caption.device, half="bfloat16")
        return params

    def has_outputs(self, ctx: BuildContext) -> bool:
        # Chunks made with other settings must not be joined into a shard either.
        return super().has_outputs(ctx) or any((ctx.stage_dir(self.name).path / "chunks").glob("*/shard-*.done"))

    @contextlib.contextmanager
    def session(self, ctx: BuildContext):
        self.captioner = Captioner(ctx.recipe, ctx.workdir)
        try:
            yield
        finally:
            self.captioner.close()
            del self.captioner

    def chunk_dir(self, ctx: BuildContext, shard: str) -> StageDir:
        return StageDir(ctx.workdir, f"{self.name}/chunks/{shard}")

    @staticmethod
    def chunk_size(chunks: StageDir, wanted: int, rows: int) -> int:
        """The chunk size of this shard: the one its saved chunks were cut with, so that a resume after
        ``rows_per_chunk`` changed neither loses nor repeats rows; ``wanted`` for a fresh shard."""
        layout = chunks.path / "layout.json"
        if layout.exists() and chunks.done_shards():
            saved = json.loads(layout.read_text())
            if saved.get("rows") == rows:
                return int(saved["rows_per_chunk"])
        for leftover in chunks.path.glob("shard-*"):  # chunks without a layout cannot be placed: redo them
            leftover.unlink()
        atomic_write_json(layout, {"rows_per_chunk": wanted, "rows": rows})
        return wanted

    def run_shard(self, ctx: BuildContext, shard: str, source: StageDir, out: StageDir) -> dict:
        started = time.monotonic()
        rows = source.read(shard)
        chunks = self.chunk_dir(ctx, shard)
        chunks.prepare()
        size = self.chunk_size(chunks, ctx.recipe.caption.rows_per_chunk, rows.num_rows)
        names = [shard_name(i) for i in range(max(1, -(-rows.num_rows // size)))]
        todo = [index for index, name in enumerate(names) if not chunks.is_done(name)]
        wanted = set(todo)
        # One chunk's image bytes at a time, read from fetch's shard as the chunks are captioned.
        parts = (chunk for index, chunk in enumerate(image_chunks(ctx, rows, shard, size)) if index in wanted)
        if not rows.num_rows and todo:
            parts = iter([with_images(ctx, rows, shard)])
        chunk_started = time.monotonic()
        for index, (captioned, drops, stats) in zip(todo, self.captioner.caption_chunks(parts)):
            name, rows_in = names[index], min(size, rows.num_rows - index * size)
            with chunks.writer(name, captioned.schema) as writer:
                writer.write(captioned)
            chunks.finish(name, drops, {"rows_in": max(rows_in, 0), "rows_out": captioned.num_rows,
                                        "expert_failures": stats["expert_failures"],
                                        "seconds_by_step": {k: round(v, 4) for k, v in
                                                            stats["seconds_by_step"].items()},
                                        "seconds": round(time.monotonic() - chunk_started, 3)})
            chunk_started = time.monotonic()
        # chunk_size left only this shard's chunks, all done now: the folder's own readers see exactly them.
        joined = pa.concat_tables([chunks.read(name) for name in names])
        stats = chunks.all_stats()
        steps: Counter = Counter()
        failures: Counter = Counter()
        for chunk_stats in stats:
            steps.update(chunk_stats.get("seconds_by_step", {}))
            failures.update(chunk_stats.get("expert_failures", {}))
        with out.writer(shard, joined.schema) as writer:
            writer.write(joined)
        result = out.finish(shard, chunks.read_dropped().to_pylist(), {
            "rows_in": sum(s["rows_in"] for s in stats), "rows_out": joined.num_rows,
            "caption_words": int(sum(joined.column("caption_words").to_pylist())),
            "expert_failures": dict(sorted(failures.items())),
            "seconds_by_step": {k: round(v, 3) for k, v in steps.items()},
            "seconds": round(time.monotonic() - started, 3)})
        shutil.rmtree(chunks.path, ignore_errors=True)
        return result


def write_prompts(recipe: Recipe, workdir: Path, upstream: str, output: Path, limit: int) -> tuple[int, int]:
    """The dry run: priors and prompts of the first ``limit`` rows upstream, one JSON object per line (a row
    whose image does not decode gets its drop reason instead); returns (prompts, rows dropped)."""
    source = StageDir(workdir, upstream)
    captioner = Captioner(recipe, workdir, generate=False, workers=0)  # a few rows: no pool to start
    ctx = BuildContext(recipe=recipe, workdir=workdir, show_progress=False)
    lines, dropped = [], 0
    for shard in source.done_shards():
        if len(lines) >= limit:
            break
        rows = with_images(ctx, source.read(shard).slice(0, limit - len(lines)), shard)
        images, priors, decoded, drops, _ = captioner.priors_for(rows)
        kept = [r for r, ok in zip(rows.drop_columns(["image"]).to_pylist(), decoded) if ok]
        for row, prior, prompt in zip(kept, priors, captioner.prompts_for(priors)):
            lines.append({"key": row["key"], "url": row["url"], "caption_engine": recipe.caption.engine,
                          "prompt_version": captioner.template.prompt_version, "prompt": prompt,
                          "priors": prior.to_row()})
        lines.extend({"key": d["key"], "url": d["url"], "dropped": d["reason"], "detail": d["detail"]}
                     for d in drops)
        dropped += len(drops)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode())
    return len(lines) - dropped, dropped
