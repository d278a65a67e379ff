"""Reading published DenseFusion datasets: short names, streaming for training, and a DataLoader.

    ds = stream("densefusion-1m", columns=["image", "caption"])      # a datasets.IterableDataset
    loader = dataloader(ds, batch_size=64, num_workers=8)              # (images [B,3,224,224], captions)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                                            # another shuffle order per epoch
        for images, captions in loader:
            ...
        state = loader.state_dict()                                    # torchdata's StatefulDataLoader

Short names ("densefusion-1m", "densefusion-4v-100k", "densefusion-demo") come from ``registry.json`` in
this package, which the JSON file named by ``$DENSEFUSION_HF_REGISTRY`` (same shape) overrides and extends:

    {"my-build": {"repo": "./dataset", "config": "densefusion-demo", "revision": null}}

``repo`` is a Hub dataset repo id or a local folder: an absolute path, or one starting with ``./``, ``../`` or
``~`` (relative to the registry file's folder).  Anything that is not a short name goes to
``datasets.load_dataset`` unchanged (a ``pathlib.Path`` is never looked up, even if it is spelled like one).

Images: ``stream`` leaves the image column undecoded (``{"bytes", "path"}``) unless ``decode_images=True``;
``dataloader``'s collate decodes each image once, in the worker process, at reduced size for JPEGs (libjpeg's
DCT scaling, ``PIL.Image.draft``), then resizes and centre-crops it.  Decoding through datasets' ``Image``
feature instead decodes the full-size picture first: about a third more CPU per 500x400..1024x768 photo
(``benchmarks/streaming_throughput.py``).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from densefusion_hf.errors import UserError

REGISTRY_ENV = "DENSEFUSION_HF_REGISTRY"
_ENTRY_KEYS = {"repo", "config", "revision"}


class Resolved(NamedTuple):
    """What ``datasets.load_dataset`` gets for a name: a repo id or folder, a config and a revision."""

    path: str
    config: str | None
    revision: str | None = None
    source: str | None = None     # the registry file the name came from; None when it was not a short name


# ---------------------------------------------------------------------------------------------- registry

def _is_local(repo: str) -> bool:
    # A repo id ("org/name") and a relative folder ("data/name") look alike, so a folder must say so.
    return os.path.isabs(repo) or repo.startswith(("./", "../", "~"))


def _parse_registry(text: str, source: str, base: Path | None) -> dict[str, Resolved]:
    """The entries of one registry file; a UserError naming ``source`` and the problem if it is malformed."""
    def bad(problem: str) -> UserError:
        return UserError(f"dataset registry {source} is malformed: {problem}. Each entry must look like "
                         f'"short-name": {{"repo": "org/repo or ./folder", "config": "name"}} '
                         f'("config" and "revision" are optional).')

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad(f"the top level is a JSON {type(data).__name__}, not an object of short names")
    entries = {}
    for name, entry in data.items():
        if not name.strip():
            raise bad("a short name is empty")
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is a {type(entry).__name__}, not an object")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise bad(f"entry {name!r} has unknown keys {unknown}")
        repo = entry.get("repo")
        if not isinstance(repo, str) or not repo.strip():
            raise bad(f"entry {name!r} needs a non-empty string \"repo\", got {repo!r}")
        for key in ("config", "revision"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise bad(f"entry {name!r} has a non-string {key!r}: {entry[key]!r}")
        if _is_local(repo):
            folder = Path(repo).expanduser()
            repo = folder if folder.is_absolute() or base is None else os.path.normpath(base / folder)
        entries[name] = Resolved(str(repo), entry.get("config"), entry.get("revision"), source)
    return entries


def registry() -> dict[str, Resolved]:
    """Short name -> where it loads from: the shipped registry, updated by ``$DENSEFUSION_HF_REGISTRY``."""
    shipped = resources.files("densefusion_hf").joinpath("registry.json")
    entries = _parse_registry(shipped.read_text(encoding="utf-8"), "densefusion_hf/registry.json", None)
    override = os.environ.get(REGISTRY_ENV)
    if override:
        path = Path(override).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{REGISTRY_ENV}={override} cannot be read ({exc.strerror or exc}); point it at a "
                            f"JSON registry file or unset it.") from None
        entries.update(_parse_registry(text, str(path), path.absolute().parent))
    return entries


def resolve(name: str | os.PathLike, config: str | None = None) -> Resolved:
    """Where ``name`` loads from; a name the registry does not know is returned as it is."""
    if isinstance(name, str):
        entry = registry().get(name)
        if entry is not None:
            return entry._replace(config=config or entry.config)
    return Resolved(os.fspath(name), config)


# ---------------------------------------------------------------------------------------------- loading

def load_dataset(name: str | os.PathLike, config: str | None = None, **kwargs: Any):
    """``datasets.load_dataset`` that also knows the registry's short names; other arguments pass unchanged.

    ``config`` is what datasets calls ``name`` (its second argument).
    """
    import datasets

    where = resolve(name, config)
    if where.source is not None and _is_local(where.path) and not Path(where.path).exists():
        # datasets would go on to look the path up on the Hub and report a confusing 404.
        raise UserError(f"dataset {name!r} points at {where.path} (from {where.source}), which does not exist; "
                        f"build or copy the dataset there, or fix the registry entry.")
    if where.revision is not None and kwargs.get("revision") is None:
        kwargs["revision"] = where.revision
    return datasets.load_dataset(where.path, where.config, **kwargs)


NO_IMAGES_HINT = (" These rows have no images: the official release (densefusion-1m, densefusion-4v-100k) is "
                  "captions and URLs, its images are zip files beside them. Build the Parquet-with-images version "
                  "with `df-hf build builders/densefusion-1m-release.yaml --push --repo ORG/NAME` and load ORG/NAME "
                  "(or register it under a short name in $DENSEFUSION_HF_REGISTRY).")


def _no_images_hint(features, wanted: list[str]) -> str:
    """What to do when an image column is asked of rows that have none (a release's JSON Lines)."""
    if features is not None and "image" in wanted and "image" not in features and "url" in features:
        return NO_IMAGES_HINT
    return ""


def _node(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): given, or from torchrun's RANK / WORLD_SIZE, or (0, 1)."""
    if rank is None and world_size is None:
        try:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise UserError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                            f"are not integers") from None
    elif rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither (then RANK and WORLD_SIZE are read)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


def stream(name: str | os.PathLike, config: str | None = None, *, split: str = "train",
           revision: str | None = None, shuffle_buffer: int = 1000, seed: int = 0,
           rank: int | None = None, world_size: int | None = None, columns: list[str] | None = None,
           decode_images: bool = False, reshard: bool = False, buffer_input_shards: int = 1, **kwargs: Any):
    """A shuffled, per-node ``datasets.IterableDataset`` of ``name`` for a training loop.

    * ``shuffle_buffer``: rows in datasets' shuffle buffer (0: no shuffling); with ``seed``, the same order on
      every node, which ``split_dataset_by_node`` needs.  Call ``set_epoch(epoch)`` for another order per epoch.
    * ``rank`` / ``world_size``: this node's part (default: torchrun's ``RANK`` / ``WORLD_SIZE``, else all rows).
      Whole Parquet files go to each node when their number divides by ``world_size``; otherwise every node
      reads everything and keeps one row in ``world_size``.
    * ``columns``: read only these Parquet columns (the others are never read from disk or the network).
    * ``decode_images``: False leaves images as ``{"bytes", "path"}`` for ``dataloader`` to decode in its
      workers; True gives PIL images as ``datasets`` does.
    * ``reshard``: one shard per Parquet row group instead of per file (more shards for workers and nodes,
      better shuffling; costs one footer read per file when the stream is built).
    * ``buffer_input_shards``: shards read at once into the shuffle buffer (datasets' ``max_buffer_input_shards``,
      whose own default is 10).  1 fills the buffer from one shard at a time, in an order shuffled per epoch.
      More mixes better, but in datasets 5.2 it (a) makes a StatefulDataLoader with workers fail to resume
      (IndexError in ``load_state_dict``) and (b) ends every pass, and every abandoned iterator, with a 5 s
      ``time.sleep`` per process (``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN``).

    Resuming: ``state_dict()`` / ``load_state_dict()`` of the returned dataset (or of a StatefulDataLoader
    over it), after ``set_epoch`` with the checkpoint's epoch.  Without shuffling it is exact.  datasets does
    not save its shuffle buffer, so a shuffled stream resumes approximately: in datasets 5.2 the rest of that
    epoch misses up to about ``shuffle_buffer`` rows and may repeat a few it had already given.
    """
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    rank, world_size = _node(rank, world_size)
    if columns is not None:
        # The Parquet builder's own column selection: unlike select_columns(), nothing else is read.
        kwargs["columns"] = list(columns)
    ds = load_dataset(name, config, split=split, streaming=True, revision=revision, **kwargs)
    if ds.features is None:
        # JSON Lines (the official release) stream without declared features; read them from the first rows
        # so that a missing column is reported here, not inside a DataLoader worker.
        ds = ds._resolve_features()
    missing = [c for c in columns or () if ds.features is not None and c not in ds.features]
    if missing:
        # Otherwise the Parquet reader fails later, inside a DataLoader worker, with a wall of schema.
        del kwargs["columns"]
        every = load_dataset(name, config, split=split, streaming=True, revision=revision, **kwargs).features
        raise UserError(f"{name} has no column {', '.join(map(repr, missing))}; columns= takes some of: "
                        f"{', '.join(every or ())}." + _no_images_hint(every, missing))
    if decode_images and ds.features is not None and "image" not in ds.features:
        raise UserError(f"{name} has no image column to decode." + (_no_images_hint(ds.features, ["image"]) or
                        f" Its columns: {', '.join(ds.features)}."))
    if not decode_images and ds.features is not None:
        ds = ds.decode(False)
    if reshard:
        ds = ds.reshard()   # before shuffling, as datasets requires
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer, max_buffer_input_shards=buffer_input_shards)
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


# ---------------------------------------------------------------------------------------------- images

def decode_resized(data: bytes, size: int):
    """JPEG/PNG/... bytes -> RGB uint8 array [size, size, 3]: short side scaled to ``size``, centre-cropped.

    JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale that still covers ``size`` (``Image.draft``): the
    inverse DCT, colour conversion and resize then work on a quarter of the pixels or fewer (entropy decoding
    is the same), and the DCT scaling averages like a box filter.
    """
    import numpy as np
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(data))
    w, h = image.size
    scale = size / min(w, h)
    image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))  # no-op for other formats
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)    # as datasets' Image feature does
    return np.asarray(_square(image.convert("RGB"), size))


def _square(image, size: int):
    """Resize the centre square of ``image`` to size x size in one step (no full-size intermediate)."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def _to_array(value: Any, size: int):
    """One image cell as datasets gives it: undecoded {"bytes", "path"}, raw bytes, or a PIL image."""
    import numpy as np
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_resized(bytes(value), size)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return decode_resized(value["bytes"], size)
    if isinstance(value, dict):
        # Path-only cells (not what publish writes): let datasets open local or hf:// paths.
        import datasets

        value = datasets.Image().decode_example(value)
    if isinstance(value, Image.Image):
        return np.asarray(_square(value.convert("RGB"), size))
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


class ImageCaptionCollate:
    """Rows -> (images [B, 3, size, size], captions): float32 in 0..1 by default.

    ``dtype``: another floating dtype (``torch.bfloat16``...) scales to 0..1 in that type; ``torch.uint8`` keeps
    0..255, a quarter of the bytes for workers to hand over (convert on the GPU instead).
    A module-level class so DataLoader workers can unpickle it: decoding runs there, not in the main process.
    """

    def __init__(self, image_size: int = 224, caption_column: str = "caption", image_column: str = "image",
                 dtype=None):
        self.image_size = image_size
        self.caption_column = caption_column
        self.image_column = image_column
        self.dtype = dtype

    def __call__(self, rows: list[dict]):
        import numpy as np
        import torch

        dtype = self.dtype or torch.float32
        images = _batch_tensor((len(rows), 3, self.image_size, self.image_size), dtype)
        out = images.numpy() if dtype in (torch.float32, torch.uint8) else None
        for i, row in enumerate(rows):
            pixels = _to_array(row[self.image_column], self.image_size).transpose(2, 0, 1)   # HWC -> CHW
            # numpy, single-threaded, rather than torch: per-image torch ops would wake torch's thread pool
            # for each picture, which costs more than the division when num_workers=0.
            if dtype == torch.uint8:
                out[i] = pixels
            elif out is not None:
                np.divide(pixels, 255, out=out[i], dtype=np.float32)
            else:    # bfloat16 and other types numpy lacks
                torch.div(torch.from_numpy(pixels.copy()), 255.0, out=images[i])   # PIL's arrays are read-only
        return images, [row[self.caption_column] for row in rows]


def _batch_tensor(shape: tuple[int, ...], dtype):
    """An empty batch; in a DataLoader worker, allocated in shared memory as torch's default_collate does.

    The DataLoader sends a worker's tensors through shared memory: one made there from the start is sent
    as it is, where an ordinary one is copied over first (about 0.3 ms of CPU per 224 px float image).
    """
    import torch

    out = torch.empty(shape, dtype=dtype)
    if torch.utils.data.get_worker_info() is not None:
        storage = out._typed_storage()._new_shared(out.numel(), device=out.device)
        out = out.new(storage).view(shape)
    return out


def stateful_loader_class():
    """torchdata's StatefulDataLoader when installed (resumable with workers), else None."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return None
    return StatefulDataLoader


def dataloader(dataset, batch_size: int, *, image_size: int = 224, num_workers: int = 0,
               caption_column: str = "caption", image_column: str = "image", dtype=None,
               stateful: bool | None = None, **kwargs: Any):
    """A DataLoader over ``dataset`` yielding ``(images, captions)`` as ``ImageCaptionCollate`` makes them
    (float32 [B, 3, image_size, image_size] in 0..1 unless ``dtype`` says otherwise).

    ``stateful``: None uses torchdata's StatefulDataLoader when it is installed, True requires it, False
    uses torch's DataLoader.  With a StatefulDataLoader, ``loader.state_dict()`` / ``load_state_dict()``
    resume with or without workers (exactly for an unshuffled stream; see ``stream`` for a shuffled one).
    With torch's DataLoader only ``num_workers=0`` can resume,
    through ``dataset.state_dict()`` (workers hold their own copies of the dataset and its position).
    ``dataset.set_epoch(epoch)`` takes effect at the next ``iter(loader)``: the loader iterates ``dataset``
    itself, not a copy.  Other keyword arguments go to the loader (``pin_memory``, ``persistent_workers``...).
    """
    if stateful is False:
        loader_class = None
    else:
        loader_class = stateful_loader_class()
        if loader_class is None and stateful:
            raise UserError("stateful=True needs torchdata (pip install torchdata) for StatefulDataLoader.")
    if loader_class is None:
        from torch.utils.data import DataLoader as loader_class
    features = getattr(dataset, "features", None)
    missing = [c for c in (image_column, caption_column) if features is not None and c not in features]
    if missing:  # caught here, not as a KeyError inside a worker process
        raise UserError(f"the dataset has no column {', '.join(map(repr, missing))} (its columns: "
                        f"{', '.join(features)}); pass caption_column= / image_column= (e.g. "
                        f"caption_column='text' for the alt text)." + _no_images_hint(features, missing))
    collate = ImageCaptionCollate(image_size, caption_column, image_column, dtype)
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which torch 2.14 deprecates with a warning on every loader.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return loader_class(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                            **kwargs)
