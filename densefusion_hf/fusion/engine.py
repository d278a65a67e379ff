"""Caption engines: the image + its priors -> one dense caption.

``MllmEngine`` is the paper's path: a multimodal LLM through ``pipeline("image-text-to-text")``, given
chat messages (the image, then the Perceptual Fusion prompt), batched, with the recipe's generation
settings, loaded once per run (bfloat16 on cuda).  ``TemplateEngine`` needs no model: it writes the
priors out as a structured description (see ``fusion.describe``), recorded as ``caption_model: template``.
An engine returns, per image, the caption or the exception that stopped it.
"""

from __future__ import annotations

from pathlib import Path

from densefusion_hf.fusion.describe import TEMPLATE_VERSION, describe
from densefusion_hf.fusion.experts import failure_reason
from densefusion_hf.fusion.priors import Priors


def chat_messages(image, prompt: str) -> list[dict]:
    """One user turn holding the image and the prompt, the chat shape every image-text-to-text model takes."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def generated_texts(outputs) -> list[str]:
    """The new text of each input from an image-text-to-text pipeline's output (one list per input)."""
    texts = []
    for output in outputs:
        first = output[0] if isinstance(output, list) else output
        text = first["generated_text"]
        if not isinstance(text, str):  # a chat comes back as messages; the reply is the last one
            text = text[-1]["content"]
        texts.append(text)
    return texts


class CaptionFailed(Exception):
    """The engine produced no caption for an image; the message says why."""


class TemplateEngine:
    name = "template"
    prompt_version = TEMPLATE_VERSION

    def __init__(self, boxes_settings):
        self.small_area, self.large_area = boxes_settings.small_area, boxes_settings.large_area

    def caption(self, images: list, priors: list[Priors], prompts: list[str]) -> list[str | Exception]:
        return [describe(p, self.small_area, self.large_area) for p in priors]


class ChatGenerator:
    """An image-text-to-text pipeline loaded once, turning (image, text) pairs into generated text."""

    def __init__(self, model: str, workdir: Path, device: str, dtype: str, batch_size: int, generate_kwargs: dict,
                 what: str, seed: int | None = None):
        from densefusion_hf.models import load_pipeline

        self.pipe = load_pipeline("image-text-to-text", model, workdir, device, dtype, half="bfloat16", what=what)
        tokenizer = getattr(self.pipe.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only models generate after the prompt, so pad before it
        self.batch_size, self.generate_kwargs, self.seed = batch_size, generate_kwargs, seed

    def generate(self, images: list, prompts: list[str]) -> list[str]:
        if self.seed is not None:
            from transformers import set_seed

            set_seed(self.seed)
        # Generation settings must go in generate_kwargs: loose keyword arguments go to the processor.
        outputs = self.pipe(text=[chat_messages(image, prompt) for image, prompt in zip(images, prompts)],
                            batch_size=self.batch_size, return_full_text=False,
                            generate_kwargs=dict(self.generate_kwargs))
        texts = [text.strip() for text in generated_texts(outputs)]
        if len(texts) != len(images):
            raise RuntimeError(f"the pipeline returned {len(texts)} texts for {len(images)} images")
        return texts


def model_name(model: str) -> str:
    """How a model is named in the dataset: its Hub id, or a local folder's name (not the builder's path)."""
    return Path(model).name if Path(model).is_absolute() else model


class MllmEngine:
    """A multimodal LLM through the image-text-to-text pipeline."""

    def __init__(self, caption, workdir: Path, prompt_version: str):
        generation = caption.generation
        kwargs = {"max_new_tokens": generation.max_new_tokens, "do_sample": generation.do_sample,
                  "repetition_penalty": generation.repetition_penalty}
        if generation.do_sample:
            kwargs.update(temperature=generation.temperature, top_p=generation.top_p)
        self.generator = ChatGenerator(caption.model, workdir, caption.device, caption.dtype, caption.batch_size,
                                       kwargs, what="caption.model",
                                       seed=generation.seed if generation.do_sample else None)
        self.pipe = self.generator.pipe
        self.name = model_name(caption.model)
        self.prompt_version = prompt_version

    def caption(self, images: list, priors: list[Priors], prompts: list[str]) -> list[str | Exception]:
        """Captions for a batch; if the batch fails, image by image, so one bad image costs one caption."""
        try:
            return self.generator.generate(images, prompts)
        except Exception as exc:  # noqa: BLE001 - retried one by one below, each failure recorded
            if len(images) == 1:
                return [CaptionFailed(failure_reason(exc))]
        results: list[str | Exception] = []
        for image, prompt in zip(images, prompts):
            try:
                results.extend(self.generator.generate([image], [prompt]))
            except Exception as exc:  # noqa: BLE001
                results.append(CaptionFailed(failure_reason(exc)))
        return results


def load_engine(caption, workdir: Path, prompt_version: str):
    if caption.engine == "template":
        return TemplateEngine(caption.experts.boxes)
    return MllmEngine(caption, workdir, prompt_version)
