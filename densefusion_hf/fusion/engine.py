"""Caption engines: the image + its priors -> one dense caption.

``MllmEngine`` is the paper's path: a multimodal LLM through ``pipeline("image-text-to-text")``, given
chat messages (the image, then the Perceptual Fusion prompt), batched, with the recipe's generation
settings, loaded once per run (bfloat16 on cuda).  ``TemplateEngine`` needs no model: it writes the
priors out as a structured description (see ``fusion.describe``), recorded as ``caption_model: template``.
``OpenAiEngine`` (``fusion.openai_engine``) sends each image and prompt to an OpenAI-compatible server.
An engine returns, per image, the caption or the exception that stopped it; ``blobs`` are the images'
stored bytes, for engines that send them as they are.
"""

from __future__ import annotations

from pathlib import Path

from densefusion_hf.fusion.chat import ChatGenerator
from densefusion_hf.fusion.describe import TEMPLATE_VERSION, describe
from densefusion_hf.fusion.priors import Priors, failure_reason


class CaptionFailed(Exception):
    """The engine produced no caption for an image; the message says why."""


class TemplateEngine:
    name = "template"
    prompt_version = TEMPLATE_VERSION

    def __init__(self, boxes_settings):
        self.small_area, self.large_area = boxes_settings.small_area, boxes_settings.large_area

    def caption(self, images: list, priors: list[Priors], prompts: list[str],
                blobs: list | None = None) -> list[str | Exception]:
        return [describe(p, self.small_area, self.large_area) for p in priors]


def model_name(model: str) -> str:
    """How a model is named in the dataset: its Hub id, or a local folder's name (not the builder's path)."""
    return Path(model).name if Path(model).is_absolute() else model


class MllmEngine:
    """A multimodal LLM through the image-text-to-text pipeline."""

    def __init__(self, caption, workdir: Path, prompt_version: str, pipe=None):
        generation = caption.generation
        kwargs = {"max_new_tokens": generation.max_new_tokens, "do_sample": generation.do_sample,
                  "repetition_penalty": generation.repetition_penalty}
        if generation.do_sample:
            kwargs.update(temperature=generation.temperature, top_p=generation.top_p)
        self.generator = ChatGenerator(caption.model, workdir, caption.device, caption.dtype, caption.batch_size,
                                       kwargs, what="caption.model",
                                       seed=generation.seed if generation.do_sample else None, pipe=pipe)
        self.pipe = self.generator.pipe
        self.name = model_name(caption.model)
        self.prompt_version = prompt_version

    def caption(self, images: list, priors: list[Priors], prompts: list[str],
                blobs: list | None = None) -> list[str | Exception]:
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
    if caption.engine == "openai":
        from densefusion_hf.fusion.openai_engine import OpenAiEngine

        return OpenAiEngine(caption, prompt_version)
    return MllmEngine(caption, workdir, prompt_version)
