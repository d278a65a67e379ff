"""densefusion-hf: build DenseFusion-style dense image-caption datasets and publish them on the Hub."""

__version__ = "0.1.0"
