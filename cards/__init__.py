"""Dataset card templates, installed as ``densefusion_hf.card_templates``."""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent


def template_path(name: str = "dataset_card.md") -> Path:
    return TEMPLATE_DIR / name
