"""densefusion-hf: build DenseFusion-style dense image-caption datasets and publish them on the Hub.

For training code: ``densefusion_hf.load_dataset``, ``densefusion_hf.stream`` and
``densefusion_hf.dataloader`` (see ``densefusion_hf.loading``), imported on first use so that the
command line does not pay for torch and datasets before it needs them.
"""

__version__ = "0.1.0"

_LOADING = ("load_dataset", "stream", "dataloader")
__all__ = ["__version__", *_LOADING]


def __getattr__(name: str):
    if name in _LOADING:
        from densefusion_hf import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'densefusion_hf' has no attribute {name!r}")
