"""The local runner: run a recipe's stages in order in one work directory, resuming by default.

``build`` plans the stages (fingerprints, ``--only``, ``--fresh``), holds the work directory's lock and keeps
the manifest; the stages' per-shard work goes to an executor: this process by default, a Ray cluster with
``runners.ray.build``, which calls this same function."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from densefusion_hf.errors import UserError
from densefusion_hf.runners.executor import SerialExecutor
from densefusion_hf.runners.diskfull import explain_full_disk
from densefusion_hf.runners.manifest import MANIFEST_NAME, Manifest, fingerprint
from densefusion_hf.recipe import Recipe
from densefusion_hf.stages import STAGES
from densefusion_hf.stages.base import BuildContext


def default_workdir(recipe: Recipe) -> Path:
    return Path("work") / recipe.name


def parse_only(only: str | None, recipe: Recipe) -> list[str]:
    """``--only fetch,publish`` -> the stages to run, checked against the recipe."""
    if not only:
        return list(recipe.stages)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in recipe.stages]
    if unknown or not names:
        raise UserError(f"--only {only}: unknown stage {', '.join(unknown) or '(none given)'}. "
                        f"This recipe's stages are: {', '.join(recipe.stages)}.")
    return [n for n in recipe.stages if n in names]


@contextmanager
def _locked(workdir: Path):
    """One build per work directory at a time; the lock dies with the process."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UserError(f"Another build is running in {workdir} (process {handle.read().strip() or '?'}). "
                            f"Wait for it, or use another --workdir.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _check_workdir(workdir: Path) -> None:
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MANIFEST_NAME).exists() \
            and not (workdir / ".lock").exists():
        raise UserError(f"{workdir} exists and is not a densefusion-hf work directory (no {MANIFEST_NAME}). "
                        f"Choose an empty or new --workdir.")


def build(recipe: Recipe, workdir: Path, only: str | None = None, fresh: bool = False,
          show_progress: bool = True, executor=None) -> dict:
    """Run the recipe; return {stage: summary}.  Raises UserError for anything the user can fix.

    ``executor`` decides where the stages' per-shard work runs (default: this process; ``runners.ray``
    passes its own)."""
    workdir = Path(workdir)
    selected = parse_only(only, recipe)
    _check_workdir(workdir)
    executor = executor or SerialExecutor()
    ctx = BuildContext(recipe=recipe, workdir=workdir, show_progress=show_progress, executor=executor)
    results = {}
    with _locked(workdir):
        executor.check_workdir(workdir)
        manifest = Manifest(workdir)
        if fresh:
            # A stage rebuilt from scratch invalidates everything after it too.
            first = recipe.stages.index(selected[0])
            for name in recipe.stages[first:]:
                STAGES[name].clear(ctx)
                manifest.data["stages"].pop(name, None)
        # Every check before anything runs or the manifest changes: a refused build leaves no trace.
        plan, upstream_fp = [], None
        for name in recipe.stages[: recipe.stages.index(selected[-1]) + 1]:
            stage = STAGES[name]
            params = stage.params(recipe)
            fp = fingerprint(params, upstream_fp)
            manifest.check(name, params, fp, stage.has_outputs(ctx), workdir)
            plan.append((stage, params, fp))
            upstream_fp = fp
        first = recipe.stages.index(selected[0])
        if first and not (manifest.stage(recipe.stages[first - 1]) or {}).get("complete"):
            before = recipe.stages[first - 1]
            raise UserError(f"Stage '{selected[0]}' reads the output of '{before}', which is not complete "
                            f"in {workdir}. Run it first: `--only {before},{selected[0]}`, or no --only.")
        manifest.set_recipe(recipe)

        upstream = None
        for stage, params, fp in plan:
            if stage.name in selected:
                manifest.record(stage.name, params, fp, complete=False)
                with explain_full_disk(workdir, stage.name, upstream):
                    summary = stage.run(ctx, upstream)
                manifest.record(stage.name, params, fp, complete=True, **summary)
                results[stage.name] = summary
            upstream = stage.name
    return results


def caption_dry_run(recipe: Recipe, workdir: Path, output: Path, limit: int) -> tuple[int, int]:
    """Priors and prompts of the first ``limit`` rows the caption stage would read; nothing else changes."""
    from densefusion_hf.stages.caption import write_prompts

    if recipe.caption is None or "caption" not in recipe.stages:
        raise UserError(f"{recipe.path}: this recipe has no caption stage; add a caption section.")
    upstream = recipe.stages[recipe.stages.index("caption") - 1]
    workdir = Path(workdir)
    if not (Manifest(workdir).stage(upstream) or {}).get("complete"):
        raise UserError(f"The caption stage reads the output of '{upstream}', which is not complete in {workdir}. "
                        f"Build up to it first: `df-hf build {recipe.path} --workdir {workdir} "
                        f"--only {','.join(recipe.stages[:recipe.stages.index('caption')])}`.")
    return write_prompts(recipe, workdir, upstream, Path(output), limit)
