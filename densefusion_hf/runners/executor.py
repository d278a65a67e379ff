"""Where a stage's independent pieces of work run.

A stage cuts its work into items (shards, or groups of clusters) and asks ``ctx.executor.map`` to call one of
its methods on each: ``getattr(stage, method)(ctx, item, *args)``.  The method reads and writes the work
directory itself and returns something small (stats, counts), so the same stage code runs in this process
(``SerialExecutor``) or on a Ray cluster (``runners.ray.RayExecutor``), and the results on disk are the same.

``session=True`` runs the calls inside ``stage.session(ctx)``: the resources the stage sets up once (a model,
a loopback server), entered once here and once per worker on a cluster.  ``heavy`` marks the stage's main work
(the stage's ``runner`` settings apply to it); light work (a decision applied shard by shard) runs as plain
tasks.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence


class SerialExecutor:
    """Every call in this process, in the order given."""

    name = "local"

    def map(self, ctx, stage, method: str, items: Sequence, args: tuple = (), *, session: bool = False,
            heavy: bool = True) -> Iterator[tuple[object, object]]:
        """Yield ``(item, result)`` as each call finishes."""
        if not items:
            return
        work = getattr(stage, method)
        if not session:
            for item in items:
                yield item, work(ctx, item, *args)
            return
        with stage.session(ctx):
            for item in items:
                yield item, work(ctx, item, *args)

    def check_workdir(self, workdir) -> None:
        """Nothing to check: this process is the only one that reads and writes it."""

    def close(self) -> None:
        pass


def run_all(executor, ctx, stage, method: str, items: Iterable, args: tuple = (), **options) -> dict:
    """``executor.map`` to completion; {item: result}."""
    return dict(executor.map(ctx, stage, method, list(items), args, **options))
