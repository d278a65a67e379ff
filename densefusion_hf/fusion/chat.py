"""An image-text-to-text pipeline in chat form, shared by the captioner (``engine``) and the OCR expert
(``experts``): (image, prompt) pairs in, generated text out."""

from __future__ import annotations

from pathlib import Path


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


class ChatGenerator:
    """An image-text-to-text pipeline loaded once, turning (image, text) pairs into generated text."""

    def __init__(self, model: str, workdir: Path, device: str, dtype: str, batch_size: int, generate_kwargs: dict,
                 what: str, seed: int | None = None, pipe=None):
        from densefusion_hf.models import load_pipeline

        # ``pipe``: one built already (a benchmark's model made in memory); else loaded from ``model``.
        self.pipe = pipe or load_pipeline("image-text-to-text", model, workdir, device, dtype, half="bfloat16",
                                          what=what)
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
