"""Tiny random-weight models, built offline, that load through the real transformers classes.

They exist so that the demo and the tests exercise the real loading and inference code with nothing to
download.  Their outputs carry no meaning: a card built with one says so (the model is named
``sample:tiny-clip``).  Everything is seeded, so the same folder is written on every machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]

_CORPUS = [
    "a photo of a cat", "a photo of a dog", "an astronaut in a space suit", "a cup of coffee",
    "a rocket on the launch pad", "galaxies in the night sky", "a sign with text", "a street at night",
    "food on a plate", "a page of printed text", "a landscape with mountains", "people in a city",
    "GRAND OPENING SALE", "open 24 hours", "no parking", "fresh coffee", "texture background",
]


def build_tokenizer(folder: Path, extra_tokens: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a small corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + (extra_tokens or []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    # CLIP-style text towers pool at the end-of-text token, so every sequence is <s> ... </s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>", model_max_length=32)
    wrapped.save_pretrained(folder)
    return wrapped


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP with hidden size 32, 2 layers, 32-px images and 8-px patches, saved to ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    if folder.exists():
        return folder
    # Built beside its place and renamed, so a killed build never leaves half a model behind.
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = build_tokenizer(staging)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=32)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=32,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    os.replace(staging, folder)
    return folder


# Model names the demo may use instead of a Hub id or a folder.
SAMPLE_MODELS = {"sample:tiny-clip": build_tiny_clip}


def resolve_sample_model(name: str, cache: Path) -> Path | None:
    """The folder of a ``sample:`` model, built on first use under ``cache``; None for other names."""
    builder = SAMPLE_MODELS.get(name)
    if builder is None:
        return None
    return builder(Path(cache) / name.replace(":", "-"))
