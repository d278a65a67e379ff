"""Caption generation on one GPU: the transformers engine at several batch sizes and the openai engine against
vLLM / SGLang servers where they are installed, with a 2B-class and a 7B-class VLM built from their configs with
random weights (nothing is downloaded).  Every image gets exactly ``--tokens`` new tokens; the figures are
images/s and output tokens/s.  Results go to one JSON file, rewritten after each measurement, so a run stopped
by its time budget keeps what it measured.

Run through ``benchmarks/gpu_caption.sh`` (which checks for a GPU and sets the offline variables), or:

    python benchmarks/gpu_caption.py --output results.json [--budget 450] [--tokens 512] [--batch-sizes 1,8,32]
    python benchmarks/gpu_caption.py --check      # the same code, tiny shapes, on the CPU, 8 tokens
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_throughput import SHAPES, _images  # noqa: E402

GPU_SHAPES = {
    # 2B class: LLaVA's CLIP ViT-L/14 at 336 px + a 1.4B Llama (24 layers, hidden 2048): about 1.7B.
    "vlm-2b": dict(vision=SHAPES["llava-7b"]["vision"],
                   text=dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                             num_key_value_heads=16, max_position_embeddings=4096),
                   vocab=32000),
    # 7B class: LLaVA-1.5-7B (CLIP ViT-L/14 at 336 px + a 7B Llama).
    "vlm-7b": SHAPES["llava-7b"],
}
PROMPT = "Please describe the image in detail."


def write_folder(folder: Path, shape: dict):
    """Config, tokenizer, processor and chat template of a LLaVA of ``shape``: no weights (servers load them
    as ``--load-format dummy``; the transformers engine builds the model in memory).  Returns the config."""
    from tokenizers import AddedToken
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaProcessor)

    from densefusion_hf.sample.tiny_models import LLAVA_CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(folder, extra_tokens=["<image>"], add_eos=False, model_max_length=4096,
                                padding_side="left")
    tokenizer.add_tokens([AddedToken(f"w{i}", special=False) for i in range(shape["vocab"] - len(tokenizer))])
    tokenizer.padding_side = "left"
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    vision = shape["vision"]
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision),
                         text_config=LlamaConfig(vocab_size=len(tokenizer), **special, **shape["text"]),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "bfloat16"
    size = vision["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=vision["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    config.save_pretrained(folder)
    GenerationConfig(**special).save_pretrained(folder)
    processor.save_pretrained(folder)
    return config, processor


class Results:
    def __init__(self, path: Path, machine: dict):
        self.path, self.data = path, {"machine": machine, "results": [], "skipped": []}
        self.save()

    def add(self, **row) -> None:
        self.data["results"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        print(f"skipped {what}: {why}", flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def transformers_engine(shape_name, config, processor, folder, images, args, results, left) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration, pipeline

    from densefusion_hf.fusion.engine import MllmEngine
    from densefusion_hf.recipe import Caption, Generation

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).eval()
    torch.set_default_dtype(previous)
    pipe = pipeline("image-text-to-text", model=model, processor=processor, device=device)
    print(f"{shape_name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters built on {device} "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    for batch_size in args.batch_sizes:
        if left() < 30:
            results.skip(f"{shape_name} transformers batch {batch_size}", "time budget")
            continue
        caption = Caption(engine="transformers", model=str(folder), batch_size=batch_size,
                          generation=Generation(max_new_tokens=args.tokens, repetition_penalty=1.0))
        engine = MllmEngine(caption, folder.parent, "bench", pipe=pipe)
        exact = dict(engine.generator.generate_kwargs, min_new_tokens=args.tokens)  # exactly --tokens each
        engine.generator.generate_kwargs = dict(exact, max_new_tokens=4, min_new_tokens=4)
        engine.caption(images[:batch_size], [None] * batch_size, [PROMPT] * batch_size)  # warm-up
        engine.generator.generate_kwargs = exact
        batch = images[:batch_size]
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        captions = engine.caption(batch, [None] * len(batch), [PROMPT] * len(batch))
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        failed = [c for c in captions if isinstance(c, Exception)]
        if failed:
            results.skip(f"{shape_name} transformers batch {batch_size}", f"{len(failed)} failed: {failed[0]}")
            continue
        results.add(shape=shape_name, engine="transformers", batch_size=batch_size, images=len(batch),
                    tokens_per_image=args.tokens, seconds=round(elapsed, 3),
                    images_per_s=round(len(batch) / elapsed, 3),
                    output_tokens_per_s=round(len(batch) * args.tokens / elapsed, 1))
    del pipe, model
    if device == "cuda":
        torch.cuda.empty_cache()


SERVERS = {
    "vllm": lambda folder, port: [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                                  "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
                                  "--max-model-len", "4096", "--gpu-memory-utilization", "0.85"],
    "sglang": lambda folder, port: [sys.executable, "-m", "sglang.launch_server", "--model-path", str(folder),
                                    "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
                                    "--context-length", "4096", "--mem-fraction-static", "0.85"],
}


def openai_engine(server_name, shape_name, folder, blobs, images, args, results, left) -> None:
    import httpx

    from densefusion_hf.fusion.openai_engine import OpenAiEngine
    from densefusion_hf.recipe import Caption, Generation, Server
    from densefusion_hf.testing.transformers_serve import free_port

    if importlib.util.find_spec(server_name) is None:
        results.skip(f"{shape_name} openai/{server_name}", f"{server_name} is not installed")
        return
    if left() < 90:
        results.skip(f"{shape_name} openai/{server_name}", "time budget")
        return
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"gpu-caption-{server_name}.log", "wb")
    process = subprocess.Popen(SERVERS[server_name](folder, port), stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.perf_counter()
        while True:
            if process.poll() is not None:
                results.skip(f"{shape_name} openai/{server_name}", f"the server exited; see {log.name}")
                return
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).is_success:
                    break
            except httpx.TransportError:
                pass
            if left() < 30:
                results.skip(f"{shape_name} openai/{server_name}", f"not up before the time budget; see {log.name}")
                return
            time.sleep(1)
        print(f"{server_name} up in {time.perf_counter() - started:.1f} s", flush=True)
        caption = Caption(engine="openai", model=str(folder),
                          generation=Generation(max_new_tokens=args.tokens, repetition_penalty=1.0),
                          server=Server(base_url=f"http://127.0.0.1:{port}/v1", concurrency=args.concurrency,
                                        timeout=300))
        engine = OpenAiEngine(caption, "bench")
        engine.fields.update(min_tokens=args.tokens, ignore_eos=True)  # exactly --tokens per image
        engine.caption(images[:4], [None] * 4, [PROMPT] * 4, blobs=blobs[:4])  # warm-up
        count = min(len(images), args.server_images)
        started = time.perf_counter()
        captions = engine.caption(images[:count], [None] * count, [PROMPT] * count, blobs=blobs[:count])
        elapsed = time.perf_counter() - started
        engine.close()
        failed = [c for c in captions if isinstance(c, Exception)]
        if len(failed) == count:
            results.skip(f"{shape_name} openai/{server_name}", f"every request failed: {failed[0]}")
            return
        done = count - len(failed)
        results.add(shape=shape_name, engine=f"openai/{server_name}", concurrency=args.concurrency, images=done,
                    failed=len(failed), tokens_per_image=args.tokens, seconds=round(elapsed, 3),
                    images_per_s=round(done / elapsed, 3), output_tokens_per_s=round(done * args.tokens / elapsed, 1))
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("gpu_caption_results.json"))
    parser.add_argument("--budget", type=float, default=450, help="seconds; parts that would not fit are skipped")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight to a server")
    parser.add_argument("--server-images", type=int, default=128)
    parser.add_argument("--shapes", default="vlm-2b,vlm-7b")
    parser.add_argument("--check", action="store_true", help="tiny shapes on the CPU, 8 tokens: checks the script")
    args = parser.parse_args(argv)
    if args.check:
        GPU_SHAPES["tiny"] = SHAPES["tiny"]
        args.shapes, args.tokens, args.batch_sizes, args.server_images = "tiny", 8, [1, 2], 4

    import torch
    import transformers

    from densefusion_hf.images import load_rgb

    deadline = time.monotonic() + args.budget

    def left() -> float:
        return deadline - time.monotonic()

    machine = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "tokens_per_image": args.tokens}
    for name in ("vllm", "sglang"):
        if importlib.util.find_spec(name) is not None:
            machine[name] = getattr(__import__(name), "__version__", "installed")
    results = Results(args.output, machine)
    samples = _images(max(max(args.batch_sizes), args.server_images))
    blobs = [b for b, _ in samples]
    images = [load_rgb(b) for b in blobs]
    for shape_name in args.shapes.split(","):
        folder = Path(tempfile.mkdtemp(prefix="gpu-caption-")) / shape_name
        folder.mkdir(parents=True)
        config, processor = write_folder(folder, GPU_SHAPES[shape_name])
        transformers_engine(shape_name, config, processor, folder, images, args, results, left)
        for server_name in SERVERS:
            openai_engine(server_name, shape_name, folder, blobs, images, args, results, left)
    print(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
