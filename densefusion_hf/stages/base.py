"""What every stage is: a name, the settings that decide its output, and a ``run``.

A ``ShardStage`` is a plain function of (one input shard, settings) -> one output shard, so any runner
(this local one, or a distributed one) can call ``run_shard`` for shards in any order.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from densefusion_hf.console import progress
from densefusion_hf.recipe import Recipe
from densefusion_hf.shards import StageDir


@dataclass
class BuildContext:
    recipe: Recipe
    workdir: Path
    show_progress: bool = True

    def stage_dir(self, name: str) -> StageDir:
        return StageDir(self.workdir, name)


class Stage:
    name: str = ""

    def params(self, recipe: Recipe) -> dict:
        """The settings that decide this stage's output (its fingerprint is made of them)."""
        raise NotImplementedError

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        """Do the stage's work, skipping what is done; return a summary for the manifest."""
        raise NotImplementedError

    def has_outputs(self, ctx: BuildContext) -> bool:
        return bool(ctx.stage_dir(self.name).done_shards())

    def clear(self, ctx: BuildContext) -> None:
        ctx.stage_dir(self.name).clear()


class ShardStage(Stage):
    """One output shard per input shard of the upstream stage."""

    def session(self, ctx: BuildContext):
        """Resources held while shards run (a server, a loaded model); entered once per run."""
        return contextlib.nullcontext()

    def run_shard(self, ctx: BuildContext, shard: str, source: StageDir, out: StageDir) -> dict:
        """Process one shard and commit it with ``out.finish``; return its stats."""
        raise NotImplementedError

    def run(self, ctx: BuildContext, upstream: str | None) -> dict:
        source, out = ctx.stage_dir(upstream), ctx.stage_dir(self.name)
        out.prepare()
        shards = source.done_shards()
        todo = [s for s in shards if not out.is_done(s)]
        kept = dropped = 0
        bar = progress(len(shards), self.name, "shard", ctx.show_progress, initial=len(shards) - len(todo))
        with bar:
            if todo:
                with self.session(ctx):
                    for shard in todo:
                        started = time.monotonic()
                        stats = self.run_shard(ctx, shard, source, out)
                        kept += stats["rows_out"]
                        dropped += stats["rows_dropped"]
                        bar.set_postfix(kept=kept, dropped=dropped, s_per_shard=f"{time.monotonic() - started:.1f}")
                        bar.update(1)
        return {"shards_total": len(shards)}
