"""Throughput of the caption stage and where its time goes.

CPU mode (default), with tiny random models built offline (nothing is downloaded):

* the caption stage's own code (``Captioner.caption_rows``) over real photographs and rendered signs,
  in chunks as the stage runs them, reporting images/s and the time per image of each step: decoding,
  each expert, box post-processing, prompt building and generation;
* "everything that is not a model": decode + boxes + prompt per image, in milliseconds (the tiny models'
  forward passes are left out of it, since they stand for real models whose cost is elsewhere);
* the same rows with ``--workers`` worker processes doing the first pass (decoding and every CPU
  expert) of the next chunks while the current one generates, in the same run: images/s of both, and the
  rate the slowest step allows;
* the open-set detector's one pass per image against the zero-shot-object-detection pipeline;
* the openai engine against ``transformers serve`` with the tiny Llava: per image, the stage's own work
  (encoding the request, HTTP, parsing the reply) beside the server's time;
* the tagger against its baseline in the same run: the ``zero-shot-image-classification`` pipeline
  called with the whole tag vocabulary as candidate labels, which embeds every tag again for every
  image; ours embeds the vocabulary once.  Both give the same scores (checked here).

GPU mode (``--gpu``): a full-size VLM architecture built from its config with random weights (the
LLaVA-1.5-7B shape: CLIP ViT-L/14 at 336 px + a 7B Llama), run through the caption engine's real
image-text-to-text pipeline, generating exactly ``--tokens`` tokens per image, at several batch sizes;
prints images/s and generated tokens/s.  ``--gpu --shape tiny`` runs the same code on the CPU with a
tiny shape, to check the script itself.

    python benchmarks/caption_throughput.py [--images 48] [--chunk 16] [--workers 2] [--no-ocr] [--no-serve]
    python benchmarks/caption_throughput.py --gpu [--tokens 512] [--batch-sizes 1,4,8,16] [--shape llava-7b]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from densefusion_hf.keys import url_key
from densefusion_hf.recipe import Caption, Experts, Generation
from densefusion_hf.recipe import Ocr, Tagger, Detector, OpenSetDetector


def _images(count: int) -> list[tuple[bytes, str]]:
    """(JPEG bytes, alt text): scikit-image photographs and rendered signs, varied by crops and flips."""
    from skimage import data

    from densefusion_hf.sample.make import render_sign

    sources = [(getattr(data, n)(), f"a photo of {n}") for n in ("astronaut", "chelsea", "coffee", "rocket")]
    sources.append((np.asarray(render_sign(["GRAND OPENING", "SALE"], (200, 30, 40), (255, 255, 255))),
                    "grand opening sale banner"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        array, text = sources[i % len(sources)]
        h, w = array.shape[:2]
        top, left = rng.integers(0, h // 8 + 1), rng.integers(0, w // 8 + 1)
        image = Image.fromarray(array[top:, left:]).convert("RGB")
        if i % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), text))
    return out


class _Recipe:
    """The part of a recipe the Captioner reads."""

    def __init__(self, caption):
        self.caption = caption


def _bench_caption(experts, **changes) -> Caption:
    fields = dict(engine="transformers", model="sample:tiny-llava", experts=experts,
                  generation=Generation(max_new_tokens=16), batch_size=8)
    fields.update(changes)
    return Caption(**fields)


def _run_stage(captioner, table: pa.Table, chunk: int) -> tuple[float, Counter, int]:
    """(seconds, seconds per step summed, rows) of the stage's chunk loop over ``table``."""
    seconds: Counter = Counter()
    rows = 0
    started = time.perf_counter()
    parts = (table.slice(start, chunk) for start in range(0, table.num_rows, chunk))
    for captioned, drops, stats in captioner.caption_chunks(parts):
        seconds.update(stats["seconds_by_step"])
        rows += captioned.num_rows + len(drops)
    return time.perf_counter() - started, seconds, rows


def cpu_benchmark(args) -> None:
    from densefusion_hf.stages.caption import Captioner

    work = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    experts = Experts(tagger=Tagger(model="sample:tiny-clip", threshold=0.0, top_k=5),
                      detector=Detector(model="sample:tiny-detr", threshold=0.0),
                      open_set=OpenSetDetector(model="sample:tiny-owlvit", threshold=0.0, max_queries=3),
                      ocr=Ocr(engine=None if args.no_ocr else "rapidocr"))
    caption = _bench_caption(experts)
    started = time.perf_counter()
    captioner = Captioner(_Recipe(caption), work, workers=0)
    print(f"{os.cpu_count()} CPU cores; models loaded (built on first use) in {time.perf_counter() - started:.1f} s")

    samples = _images(args.images)
    urls = [f"http://bench.test/{i}.jpg" for i in range(len(samples))]
    table = pa.table({"key": [url_key(u) for u in urls], "url": urls, "text": [t for _, t in samples],
                      "image": [b for b, _ in samples]})
    captioner.caption_rows(table.slice(0, 2))  # warm-up: first calls allocate and compile

    total, seconds, rows = _run_stage(captioner, table, args.chunk)
    captioner.close()
    print(f"\ncaption stage, sequential (workers: 0), tiny models, {rows} images in chunks of {args.chunk}: "
          f"{rows / total:.2f} images/s ({total:.2f} s)")
    print(f"{'step':16s} {'ms/image':>10s} {'share':>7s}")
    for step, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{step:16s} {1000 * value / rows:10.2f} {value / total:7.1%}")
    overhead = sum(seconds[s] for s in ("decode", "boxes", "prompt"))
    accounted = sum(seconds.values())
    print(f"not a model (decode + boxes + prompt): {1000 * overhead / rows:.2f} ms/image; "
          f"unaccounted (assembling rows): {1000 * (total - accounted) / rows:.2f} ms/image")

    # The same rows with the first pass (decode + every CPU expert) in worker processes.
    first_pass = sum(v for k, v in seconds.items() if k not in ("generate", "prompt", "boxes"))
    slowest = max(first_pass / args.workers, seconds["generate"] + seconds["prompt"] + seconds["boxes"])
    started = time.perf_counter()
    overlapped = Captioner(_Recipe(caption), work, workers=args.workers)
    overlapped.caption_rows(table.slice(0, 2))  # starts the workers and warms them up
    print(f"\n{args.workers} worker processes started in {time.perf_counter() - started:.1f} s")
    total_o, seconds_o, rows_o = _run_stage(overlapped, table, args.chunk)
    overlapped.close()
    print(f"caption stage, overlapped (workers: {args.workers}): {rows_o / total_o:.2f} images/s "
          f"({total_o:.2f} s), {total / total_o:.2f}x the sequential stage; the slowest step "
          f"(first pass over {args.workers} workers, or generation here) allows {rows / slowest:.2f} images/s")
    print(f"  waited for the workers {1000 * seconds_o['wait_for_workers'] / rows_o:.1f} ms/image, "
          f"generated {1000 * seconds_o['generate'] / rows_o:.1f} ms/image")

    # The tagger against the pipeline called with the whole vocabulary.
    from transformers import pipeline

    from densefusion_hf.images import load_rgb
    from densefusion_hf.models import model_location

    tagger = next(e for e in captioner.experts if e.name == "tagger")
    images = [load_rgb(b) for b, _ in samples[: args.tagger_images]]
    pipe = pipeline("zero-shot-image-classification", model=model_location("sample:tiny-clip", work),
                    device="cpu")
    started = time.perf_counter()
    baseline = pipe(images, candidate_labels=tagger.vocabulary,
                    hypothesis_template=caption.experts.tagger.hypothesis_template)
    base_s = time.perf_counter() - started
    started = time.perf_counter()
    ours = tagger.scores(images)
    ours_s = time.perf_counter() - started
    index = {tag: i for i, tag in enumerate(tagger.vocabulary)}
    worst = max(abs(d["score"] - ours[i, index[d["label"]]]) for i, result in enumerate(baseline) for d in result)
    print(f"\ntagger over {len(tagger.vocabulary)} tags, {len(images)} images:")
    print(f"  baseline zero-shot-image-classification pipeline: {len(images) / base_s:.2f} images/s")
    print(f"  ours (vocabulary embedded once):                 {len(images) / ours_s:.2f} images/s "
          f"({base_s / ours_s:.0f}x); largest score difference {worst:.2e}")

    # The open-set detector: one pass per image with all its queries against the pipeline's pass per pair.
    detector = next(e for e in captioner.experts if e.name == "open_set")
    queries = [["person", "cup", "cat", "sign", "car", "tree", "dog", "book"][:8]] * len(images)
    pipe = pipeline("zero-shot-object-detection", model=model_location("sample:tiny-owlvit", work), device="cpu")
    started = time.perf_counter()
    pipe([{"image": image, "candidate_labels": q} for image, q in zip(images, queries)], threshold=0.0)
    base_s = time.perf_counter() - started
    started = time.perf_counter()
    detector.detect(images, queries)
    ours_s = time.perf_counter() - started
    print(f"\nopen-set detection, {len(images)} images x {len(queries[0])} queries (tiny OWL-ViT):")
    print(f"  baseline zero-shot-object-detection pipeline: {len(images) / base_s:.2f} images/s")
    print(f"  ours (one pass per image):                   {len(images) / ours_s:.2f} images/s "
          f"({base_s / ours_s:.1f}x)")

    if not args.no_serve:
        serve_benchmark(work, table.slice(0, args.serve_images))


def serve_benchmark(work: Path, table: pa.Table) -> None:
    """The openai engine against ``transformers serve`` with the tiny Llava: where a request's time goes."""
    import httpx

    from densefusion_hf.models import model_location
    from densefusion_hf.recipe import Server
    from densefusion_hf.stages.caption import Captioner
    from densefusion_hf.testing.transformers_serve import TransformersServe

    folder = model_location("sample:tiny-llava", work)
    started = time.perf_counter()
    with TransformersServe(folder) as server:
        print(f"\nopenai engine against transformers serve (tiny Llava, started in "
              f"{time.perf_counter() - started:.1f} s), {table.num_rows} images, one request in flight "
              f"(the server generates one at a time for vision models):")
        caption = _bench_caption(Experts(ocr=Ocr(engine=None)), engine="openai", model=folder,
                                 server=Server(base_url=server.base_url, generation_fields="transformers",
                                               concurrency=1))
        captioner = Captioner(_Recipe(caption), work, workers=0)
        captioner.caption_rows(table.slice(0, 2))  # warm-up
        captioner.engine.seconds.clear()
        started = time.perf_counter()
        _, _, stats = captioner.caption_rows(table)
        total = time.perf_counter() - started
        engine = captioner.engine.seconds
        with httpx.Client(trust_env=False) as client:  # HTTP alone: a request the server answers at once
            client.get(f"{server.base_url}/models")
            started = time.perf_counter()
            for _ in range(20):
                client.get(f"{server.base_url}/models")
            http = (time.perf_counter() - started) / 20
        captioner.close()
    n = table.num_rows
    request = engine["request"] / n
    print(f"  {n / total:.2f} images/s; per image: request {1000 * request:.2f} ms, of which HTTP about "
          f"{1000 * http:.2f} ms (a GET /v1/models round trip) and the server {1000 * (request - http):.2f} ms")
    print(f"  the stage's own work per image: encoding the request {1000 * engine['encode'] / n:.2f} ms, "
          f"parsing the reply {1000 * engine['parse'] / n:.2f} ms, HTTP {1000 * http:.2f} ms, the rest of the "
          f"stage (prompt, rows) {1000 * (total - stats['seconds_by_step']['generate']) / n:.2f} ms")


SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, a 7B Llama (32 layers, hidden 4096).
    "llava-7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
                     text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
                     vocab=32000),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=14, projection_dim=32),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=2048),
                 vocab=1000),
}


def build_vlm(folder: Path, shape: dict) -> Path:
    """A LLaVA of the given shape with random weights, saved with a processor and a chat template."""
    import torch
    from tokenizers import AddedToken
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from densefusion_hf.sample.tiny_models import LLAVA_CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(folder, extra_tokens=["<image>"], add_eos=False, model_max_length=4096,
                                padding_side="left")
    # Pad the vocabulary to the model's size with plain tokens, so any generated id decodes.
    tokenizer.add_tokens([AddedToken(f"w{i}", special=False) for i in range(shape["vocab"] - len(tokenizer))])
    tokenizer.padding_side = "left"
    vision = shape["vision"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                **shape["text"]),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    size = vision["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=vision["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def gpu_benchmark(args) -> None:
    import torch

    from densefusion_hf.fusion.engine import MllmEngine
    from densefusion_hf.images import load_rgb

    work = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    started = time.perf_counter()
    folder = build_vlm(work / "vlm", SHAPES[args.shape])
    print(f"{args.shape} built with random weights in {time.perf_counter() - started:.1f} s "
          f"on {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    prompt = "Please describe the image in detail."
    images = [load_rgb(b) for b, _ in _images(max(args.batch_sizes) * 2)]
    for batch_size in args.batch_sizes:
        caption = Caption(engine="transformers", model=str(folder), batch_size=batch_size,
                          generation=Generation(max_new_tokens=args.tokens, repetition_penalty=1.0))
        engine = MllmEngine(caption, work, "bench")
        engine.pipe.model.generation_config.min_new_tokens = args.tokens  # exactly --tokens per image
        engine.pipe.model.generation_config.eos_token_id = None
        batch = images[: batch_size * 2]
        engine.caption(batch[:batch_size], [None] * batch_size, [prompt] * batch_size)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        captions = engine.caption(batch, [None] * len(batch), [prompt] * len(batch))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        failed = [c for c in captions if isinstance(c, Exception)]
        if failed:
            print(f"batch {batch_size}: {len(failed)} captions failed: {failed[0]}")
            continue
        print(f"batch {batch_size:3d}: {len(batch) / elapsed:7.2f} images/s, "
              f"{len(batch) * args.tokens / elapsed:9.1f} tokens/s ({elapsed:.1f} s for {len(batch)} images)")
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--chunk", type=int, default=16, help="rows per caption_rows call, as rows_per_chunk")
    parser.add_argument("--tagger-images", type=int, default=8)
    parser.add_argument("--no-ocr", action="store_true", help="leave rapidocr out (about 1 s per image on a CPU)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the overlapped run")
    parser.add_argument("--serve-images", type=int, default=8, help="images sent to transformers serve")
    parser.add_argument("--no-serve", action="store_true", help="leave the transformers serve part out")
    parser.add_argument("--gpu", action="store_true", help="the full-size VLM generation benchmark")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava-7b")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    args = parser.parse_args(argv)
    if args.gpu:
        gpu_benchmark(args)
    else:
        cpu_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
