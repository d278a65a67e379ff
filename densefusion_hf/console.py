"""Terminal output: progress bars, and keeping chatty libraries' output in a log file."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm


def progress(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                dynamic_ncols=True, leave=True, file=sys.stderr)


def counted(items, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """``items`` as they come (a stage's shards finishing anywhere), each one step of a progress bar."""
    with progress(total, desc, unit, enabled, initial=initial) as bar:
        for item in items:
            yield item
            bar.update(1)


@contextlib.contextmanager
def output_to_file(path: Path):
    """Send this process's stdout and stderr, and its children's, to ``path`` for the duration.

    Works on the file descriptors, so it also catches output of worker processes started inside, and
    on ``sys.stdout``/``sys.stderr``, which need not write to those descriptors (notebooks, test runners).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
