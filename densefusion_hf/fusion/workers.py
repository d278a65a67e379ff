"""The caption stage's first pass (decoding, the alt text, the CPU experts), in this process or in a pool of
worker processes that prepares the next chunks while the current one generates.

A chunk is prepared whole by one worker, with the same code and the same batches as in this process, so its
priors are the same either way; several workers prepare several chunks at once.  ``PriorsPool.prepared``
keeps at most ``workers + 1`` chunks submitted ahead of the one being captioned (a bounded queue: their
decoded images wait in memory).  The pool belongs to whoever made it (the stage's session, or a Ray actor's)
and is shut down with it.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from densefusion_hf.errors import UserError
from densefusion_hf.fusion.experts import apply, enabled_experts, load_experts
from densefusion_hf.fusion.priors import Priors, clean_alt_text


@dataclass
class Prepared:
    """A chunk after its first pass: the rows (with image bytes), the decoded images and their priors."""

    rows: pa.Table
    images: list  # None per row where nothing needs pixels (``needs_pixels``)
    priors: list[Priors]
    decoded: list[bool]
    drops: list[dict]
    seconds: Counter = field(default_factory=Counter)


def needs_pixels(settings) -> bool:
    """Whether anything in the caption stage looks at the images: an expert, or an engine other than the
    template, which writes out the priors alone (fetch has already decoded every image once)."""
    return bool(enabled_experts(settings)) or settings.engine != "template"


def first_pass(settings, experts: list, rows: pa.Table) -> Prepared:
    """Decode ``rows``' images where anything needs them, clean their alt texts and run ``experts`` on them
    (boxes not yet merged)."""
    from densefusion_hf.stages.base import decode_rows

    seconds: Counter = Counter()
    started = time.perf_counter()
    if needs_pixels(settings):
        images, decoded, drops = decode_rows(rows)
    else:
        images, decoded, drops = [None] * rows.num_rows, [True] * rows.num_rows, []
    alt = settings.experts.alt_text
    texts = [text for text, ok in zip(rows.column("text").to_pylist(), decoded) if ok]
    priors = [Priors(alt_text=clean_alt_text(text, alt.max_chars) if alt.enabled else "") for text in texts]
    seconds["decode"] += time.perf_counter() - started
    for expert in experts:
        started = time.perf_counter()
        apply(expert, images, priors)
        seconds[expert.name] += time.perf_counter() - started
    return Prepared(rows, images, priors, decoded, drops, seconds)


_worker: dict = {}


def _start_worker(settings, workdir: Path, names: list[str], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _worker["settings"] = settings
    try:
        _worker["experts"] = load_experts(settings, workdir, names, threads=threads)
    except Exception as exc:  # noqa: BLE001 - handed to the stage with the first chunk, as a clear message
        _worker["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)


def _prepare_in_worker(rows: pa.Table) -> Prepared:
    if "error" in _worker:
        raise UserError(f"A caption worker process could not load its experts: {_worker['error']}")
    return first_pass(_worker["settings"], _worker["experts"], rows)


class PriorsPool:
    """``workers`` processes, each with its own copy of the CPU experts ``names``."""

    def __init__(self, settings, workdir: Path, names: list[str], workers: int):
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.workers, self.names = workers, names
        # spawn, not fork: the parent may hold CUDA and threads, which a forked child cannot use.
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker,
                                            initargs=(settings, Path(workdir), names, threads))

    def prepared(self, parts: Iterable[pa.Table]) -> Iterator[Prepared]:
        """The first pass of each part, in order, with up to ``workers + 1`` parts submitted ahead."""
        parts = iter(parts)
        pending: deque = deque()

        def submit_next() -> None:
            part = next(parts, None)
            if part is not None:
                pending.append(self.executor.submit(_prepare_in_worker, part))

        for _ in range(self.workers + 1):
            submit_next()
        while pending:
            future = pending.popleft()
            submit_next()
            started = time.perf_counter()
            try:
                result = future.result()
            except BrokenProcessPool:
                raise UserError("A caption worker process died (out of memory, or killed); nothing of the chunk "
                                "was saved. Run the same command again, with fewer caption.workers if memory "
                                "is short.") from None
            result.seconds["wait_for_workers"] += time.perf_counter() - started
            yield result

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
