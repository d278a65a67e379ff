"""Loading the models a recipe names (Hub id, local folder, or a ``sample:`` model) on the right device."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from densefusion_hf.errors import UserError
from densefusion_hf.sample.tiny_models import resolve_sample_model


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("The recipe asks for device 'cuda' but torch sees no GPU here. "
                        "Use device: auto or cpu.")
    return requested


def resolved_dtype_name(requested: str, device: str = "auto", half: str = "float16") -> str:
    """The dtype a run will use, by name: 'auto' means ``half`` on cuda, float32 on cpu."""
    if requested != "auto":
        return requested
    return half if pick_device(device) == "cuda" else "float32"


def pick_dtype(requested: str, device: str, half: str = "float16"):
    import torch

    if requested == "auto":
        return getattr(torch, half) if device == "cuda" else torch.float32
    return getattr(torch, requested)


def model_location(name: str, workdir: Path) -> str:
    """Where to load ``name`` from: a built sample model's folder, a local folder, or a Hub id."""
    sample = resolve_sample_model(name, Path(workdir) / "models")
    return str(sample) if sample else name


def _features(output) -> "torch.Tensor":  # noqa: F821
    # transformers 5 returns an output object from get_*_features; older versions a tensor.
    if hasattr(output, "pooler_output"):
        return output.pooler_output
    return output


def cannot_load(what: str, exc: Exception) -> UserError:
    return UserError(f"Cannot load {what}: {exc}. Give a Hub id that is in the local cache (or reachable), or "
                     f"a local folder with config.json and weights.")


class ImageTextEmbedder:
    """A CLIP / SigLIP model: L2-normalised image and text embeddings as float32 numpy arrays."""

    def __init__(self, name: str, workdir: Path, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModel, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the stage's own bar is enough

        self.name = name
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        location = model_location(name, workdir)
        try:
            self.processor = AutoProcessor.from_pretrained(location)
            self.model = AutoModel.from_pretrained(location, dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError, ImportError) as exc:
            raise cannot_load(f"the model {name!r}", exc) from None
        if not hasattr(self.model, "get_image_features"):
            raise UserError(f"The model {name!r} ({type(self.model).__name__}) has no image embeddings; "
                            f"use a CLIP or SigLIP model.")
        self._torch = torch

    def embed_images(self, images: list) -> np.ndarray:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._torch.inference_mode():
            features = _features(self.model.get_image_features(**inputs))
        return self._normalise(features)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        # SigLIP was trained on text padded to its full length; CLIP pads to the longest text.
        padding = "max_length" if "siglip" in self.model.config.model_type else True
        inputs = self.processor(text=texts, return_tensors="pt", padding=padding, truncation=True).to(self.device)
        with self._torch.inference_mode():
            features = _features(self.model.get_text_features(**inputs))
        return self._normalise(features)

    @staticmethod
    def _normalise(features) -> np.ndarray:
        array = features.float().cpu().numpy()
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        return array / np.maximum(norms, 1e-12)


def load_pipeline(task: str, name: str, workdir: Path, device: str = "auto", dtype: str = "auto",
                  half: str = "float16", what: str = "model"):
    """A transformers pipeline for ``task`` with the model ``name`` (Hub id, local folder or ``sample:``),
    loaded once on the recipe's device; a model that cannot load is a clear error naming the recipe field."""
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    resolved = pick_device(device)
    try:
        return pipeline(task, model=model_location(name, workdir), device=resolved,
                        dtype=pick_dtype(dtype, resolved, half))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise cannot_load(f"the {what} {name!r} for the {task} pipeline", exc) from None
