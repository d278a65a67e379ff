"""Tiny random-weight models, built offline, that load through the real transformers classes.

They exist so that the demo and the tests exercise the real loading and inference code with nothing to
download.  Their outputs carry no meaning: a card built with one says so (the model is named
``sample:tiny-clip``, ``sample:tiny-detr`` and so on).  Everything is seeded, so the same folder is written on
every machine.
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


def build_tokenizer(folder: Path, extra_tokens: list[str] | None = None, vocab_size: int = 400, *,
                    add_eos: bool = True, model_max_length: int = 32, padding_side: str | None = None):
    """A byte-level BPE tokenizer trained on a small corpus, wrapped for transformers.

    ``add_eos=False`` is for causal LMs: a prompt that ends in ``</s>`` tells the model the text is over.
    ``padding_side="left"`` is for batched generation, so every prompt ends where generation starts.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + (extra_tokens or []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    if add_eos:
        # CLIP-style text towers pool at the end-of-text token, so every sequence is <s> ... </s>.
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>", model_max_length=model_max_length,
                                      **({} if padding_side is None else {"padding_side": padding_side}))
    wrapped.save_pretrained(folder)
    return wrapped


def _build_atomically(folder: Path, write) -> Path:
    """Runs ``write(staging)`` beside ``folder`` and renames the result into place.

    So a killed build never leaves half a model behind, and two processes racing to build the same
    model both end with one complete folder.
    """
    folder = Path(folder)
    if folder.exists():
        return folder
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if folder.exists():  # another process finished first: its folder is as good as ours
            return folder
        raise
    return folder


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP with hidden size 32, 2 layers, 32-px images and 8-px patches, saved to ``folder``."""

    def write(staging: Path) -> None:
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

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

    return _build_atomically(folder, write)


def build_tiny_owlvit(folder: Path, seed: int = 0) -> Path:
    """An OWL-ViT detector (hidden size 32, 2 layers, 32-px images, 8-px patches), saved to ``folder``.

    Its class head projects image patches into the text tower's space, so ``projection_dim`` must
    equal the text hidden size.  The text tower pools at the highest token id rather than at ``</s>``
    (CLIP's vocabulary puts end-of-text last; ours does not), which only matters for trained weights.
    """

    def write(staging: Path) -> None:
        import torch
        from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

        tokenizer = build_tokenizer(staging)
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = OwlViTConfig(
            text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=32,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(tower, image_size=32, patch_size=8),
            # The box and class heads take their init std from here; unset, it is 1.0 and every box saturates.
            projection_dim=32, initializer_range=0.02,
        )
        torch.manual_seed(seed)
        model = OwlViTForObjectDetection(config).eval()
        square = {"height": 32, "width": 32}
        processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=square, crop_size=square),
                                    tokenizer=tokenizer)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    return _build_atomically(folder, write)


DETR_LABELS = ["person", "cup", "cat", "dog", "car", "sign", "book", "bottle"]


def build_tiny_detr(folder: Path, seed: int = 0) -> Path:
    """A DETR over a 4-stage ResNet with 8-32 channels and 10 queries, for 64-96 px images, saved to ``folder``.

    The backbone is transformers' own ResNet, built from its config, so nothing comes from timm or the Hub.
    """

    def write(staging: Path) -> None:
        import torch
        from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                layer_type="basic", out_features=["stage4"])
        config = DetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
            id2label=dict(enumerate(DETR_LABELS)), label2id={label: i for i, label in enumerate(DETR_LABELS)},
        )
        torch.manual_seed(seed)
        model = DetrForObjectDetection(config).eval()
        model.save_pretrained(staging)
        # Every image is padded to one 96x96 canvas: the object-detection pipeline batches by concatenating
        # pixel values and masks, which fails on images of different shapes.
        DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, do_pad=True,
                           pad_size={"height": 96, "width": 96}).save_pretrained(staging)

    return _build_atomically(folder, write)


# Renders user turns as "USER: <image>\n{text}" and ends with "ASSISTANT:" for the model to continue.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A LLaVA (32-px CLIP vision tower with 8-px patches, 2-layer Llama with hidden size 32), saved to ``folder``.

    Its tokenizer pads on the left and adds no ``</s>`` to prompts, as batched generation needs.
    Each image becomes 16 ``<image>`` tokens: 4x4 patches, the CLS token dropped ("default" strategy).
    """

    def write(staging: Path) -> None:
        import torch
        from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                                  LlavaForConditionalGeneration, LlavaProcessor)

        tokenizer = build_tokenizer(staging, extra_tokens=["<image>"], add_eos=False, model_max_length=4096,
                                    padding_side="left")
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, **special)
        config = LlavaConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-1)
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(**special)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
        )
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    return _build_atomically(folder, write)


# Model names the demo may use instead of a Hub id or a folder.
SAMPLE_MODELS = {
    "sample:tiny-clip": build_tiny_clip,
    "sample:tiny-owlvit": build_tiny_owlvit,
    "sample:tiny-detr": build_tiny_detr,
    "sample:tiny-llava": build_tiny_llava,
}


def resolve_sample_model(name: str, cache: Path) -> Path | None:
    """The folder of a ``sample:`` model, built on first use under ``cache``; None for other names."""
    builder = SAMPLE_MODELS.get(name)
    if builder is None:
        return None
    return builder(Path(cache) / name.replace(":", "-"))
