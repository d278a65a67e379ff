"""A full disk, turned into a message that says which folder is full and how much the stage still needs."""

from __future__ import annotations

import contextlib
import errno
import shutil

from densefusion_hf.errors import UserError
from densefusion_hf.stages.shards import StageDir


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def space_needed(out: StageDir, upstream: StageDir | None) -> str:
    """An estimate from the shards done: their average size times the shards still to do."""
    done = out.done_shards()
    sizes = [sum(p.stat().st_size for p in out.path.glob(f"shard-{s}.*") if p.is_file()) for s in done]
    if not sizes and out.path.is_dir():
        # A stage that writes its per-shard measurements first (ingest's first pass, dedup's hashes): those
        # shards are about the size of the stage's own.
        for sub in sorted(p for p in out.path.iterdir() if p.is_dir()):
            inner = StageDir(out.path.parent, f"{out.stage}/{sub.name}")
            sizes = [sum(p.stat().st_size for p in inner.path.glob(f"shard-{s}.*") if p.is_file())
                     for s in inner.done_shards()]
            if sizes:
                break
    total = len(upstream.done_shards()) if upstream is not None else None
    if not sizes:
        return "no shard of this stage is done yet, so its size is unknown"
    average = sum(sizes) / len(sizes)
    if total is None:
        return f"each shard takes about {_mb(average)} ({len(sizes)} done)"
    left = max(0, total - len(sizes))
    return f"{left} of {total} shards are left, about {_mb(left * average)} at {_mb(average)} a shard"


@contextlib.contextmanager
def explain_full_disk(workdir, stage: str, upstream: str | None):
    try:
        yield
    except OSError as exc:
        # pyarrow's write errors carry the errno only in their text
        if exc.errno != errno.ENOSPC and "No space left on device" not in str(exc):
            raise
        out = StageDir(workdir, stage)
        out.prepare()  # the half-written shard goes; finished shards stay
        out.remove_unfinished()
        free = shutil.disk_usage(out.path).free
        need = space_needed(out, StageDir(workdir, upstream) if upstream else None)
        raise UserError(f"The disk holding {out.path} is full ({_mb(free)} free) while stage '{stage}' was "
                        f"writing: {need}. Free space there (or build in another --workdir) and run the same "
                        f"command again: finished shards are kept and the build resumes.") from None
