"""The ``df-hf`` command line."""

from __future__ import annotations

import json
import re
import sys
import traceback
from pathlib import Path

import click

from densefusion_hf import __version__
from densefusion_hf.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="densefusion-hf")
def cli():
    """Build DenseFusion-style dense image-caption datasets and publish them for `datasets.load_dataset`.

    A recipe (builders/*.yaml) names the metadata, the filters, the download policy and the output.
    `df-hf build builders/demo.yaml` builds the embedded offline demo end to end.
    """


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work directory holding every stage's shards, the manifest and the dataset "
                   "[default: ./work/<recipe name>].")
@click.option("--only", metavar="STAGE,...", default=None,
              help="Run only these stages (comma-separated, e.g. fetch,publish); the stages before them must "
                   "already be complete in the work directory.")
@click.option("--fresh", is_flag=True,
              help="Discard the outputs of the selected stages and of every stage after them, then rebuild. "
                   "Without it, a build resumes: finished shards are kept and skipped.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress bars (on stderr).")
@click.option("--push", is_flag=True,
              help="After the build, push the dataset to the Hub (see `df-hf publish`): to --repo, or the "
                   "recipe's publish.repo.")
@click.option("--repo", metavar="ORG/NAME", default=None, help="Hub dataset repo for --push.")
@click.option("--version", "version", metavar="X.Y.Z", default=None,
              help="Version tagged on the Hub with --push [default: the recipe's version].")
@click.option("--runner", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the stages run: this process, or a Ray cluster (workers sized by the recipe's "
                   "runner section; the work directory must be on a filesystem every node mounts).")
@click.option("--ray-address", metavar="auto|HOST:PORT|ray://HOST:10001", default=None,
              help="The Ray cluster to join with --runner ray [default: start a local Ray on this machine].")
def build(recipe: Path, workdir: Path | None, only: str | None, fresh: bool, progress: bool, push: bool,
          repo: str | None, version: str | None, runner: str, ray_address: str | None):
    """Build the dataset described by RECIPE (a builders/*.yaml file).

    Stages run in the recipe's order: ingest (metadata, keys, metadata filters), fetch (img2dataset
    download and decode check), dedup (sha256 and pHash), embed (CLIP/SigLIP, clip-retrieval layout),
    semdedup (SemDeDup), select (size, categories, top N per cluster, quotas, subset), caption
    (Perceptual Fusion: vision experts, priors, prompt, multimodal LLM), publish (Parquet + dataset card
    in WORKDIR/dataset). A build that is interrupted or crashes resumes where it stopped
    when run again; a recipe change that would make finished outputs wrong is refused until you pass
    --fresh. With --push, the dataset is then pushed to the Hub and tagged with its version.
    With --runner ray the same stages run on a Ray cluster and publish the same files.
    """
    from densefusion_hf.runners.local import build as run_build, default_workdir, parse_only
    from densefusion_hf.recipe import load_recipe
    from densefusion_hf.stages.publish import dataset_folder

    loaded = load_recipe(recipe)
    workdir = workdir or default_workdir(loaded)
    repo = repo or loaded.publish.repo
    if push and not repo:
        raise UserError(f"--push needs a Hub repo: pass --repo ORG/NAME or set publish.repo in {recipe}.")
    if push and "publish" not in parse_only(only, loaded):
        raise UserError("--push pushes what this build publishes: include publish in --only (or drop --only).")
    if version is not None:
        _check_version(version)
    if ray_address and runner != "ray":
        raise UserError("--ray-address is for --runner ray; add --runner ray (or drop --ray-address).")
    if runner == "ray":
        from densefusion_hf.runners.ray import build as ray_build

        results = ray_build(loaded, workdir, only=only, fresh=fresh, show_progress=progress, address=ray_address)
    else:
        results = run_build(loaded, workdir, only=only, fresh=fresh, show_progress=progress)
    click.echo(f"Built {loaded.name} in {workdir}: {', '.join(results)} done.")
    if "publish" in results:
        folder = dataset_folder(loaded, workdir)
        click.echo(f"Dataset: {folder} ({results['publish'].get('rows_out', 0)} rows). "
                   f"Load it with datasets.load_dataset({str(folder)!r}, {loaded.config_name!r}); "
                   f"check its card with df-hf card check {folder}")
    click.echo(f"Per-stage counts: df-hf status {workdir}")
    if push:
        _push(dataset_folder(loaded, workdir), repo, version=version, private=loaded.publish.private,
              show_progress=progress)


def _check_version(version: str) -> None:
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise UserError(f"--version {version}: expected X.Y.Z, e.g. 1.0.0 (it is tagged v1.0.0).")


def _push(folder: Path, repo: str, *, dry_run: bool = False, **options) -> None:
    from densefusion_hf.publish.hub import plan_push, push

    if dry_run:
        plan = plan_push(folder, repo, version=options.get("version"), revision=options.get("revision"))
        click.echo("Dry run, nothing is pushed. " + plan.describe())
        if plan.changes_tagged:
            click.echo(f"  tag v{plan.version} already exists: the push would be refused (choose a new --version).")
        elif not options.get("create_pr"):
            click.echo(f"  tag v{plan.version}" + (" (exists, unchanged)" if plan.tag_exists_at else ""))
        return
    done = push(folder, repo, **options)
    where = done["pr_url"] or f"{done['repo_id']} ({done['revision']})"
    click.echo(f"Pushed {len(done['uploaded'])} files ({done['uploaded_bytes']:,} bytes) in {done['commits']} "
               f"commits to {where}; {done['unchanged']} unchanged, {len(done['deleted'])} removed.")
    if done["tag"]:
        click.echo(f"Tagged {done['tag']}: datasets.load_dataset({done['repo_id']!r}, revision={done['tag']!r}).")
    elif done["pr_url"]:
        click.echo(f"Not tagged: merge the pull request, then publish again to main to tag v{done['version']}.")


@cli.command()
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo", metavar="ORG/NAME", required=True, help="Hub dataset repo (created if missing).")
@click.option("--version", "version", metavar="X.Y.Z", default=None,
              help="Version to tag (vX.Y.Z) [default: the version the dataset was built with].")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", default=None, help="Push to this branch (created from main) "
                                                                  "instead of main.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, kept and deleted; change nothing.")
@click.option("--commit-files", type=click.IntRange(min=1), default=None,
              help="At most this many data files per commit [default: 20].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def publish(workdir: Path, repo: str, version: str | None, private: bool, revision: str | None, create_pr: bool,
            dry_run: bool, commit_files: int | None, progress: bool):
    """Push the dataset built in WORKDIR (or a dataset folder) to the Hub dataset repo ORG/NAME.

    Uploads only files that differ from the repo's, in bounded commits (data first, then the card and
    charts, removing the config's stale files), and tags the version vX.Y.Z so that
    `load_dataset(repo, config, revision="vX.Y.Z")` loads exactly this data. An interrupted push, run
    again, uploads only what is missing. The token comes from HF_TOKEN or `hf auth login`; it is never
    printed. Set HF_ENDPOINT to push to another Hub server.
    """
    from densefusion_hf.publish.hub import COMMIT_FILES

    if version is not None:
        _check_version(version)
    _push(_dataset_folder_of(workdir), repo, version=version, private=private, revision=revision,
          create_pr=create_pr, dry_run=dry_run, commit_files=commit_files or COMMIT_FILES, show_progress=progress)


def _dataset_folder_of(path: Path) -> Path:
    """A work directory's dataset folder (as its manifest records it), or ``path`` itself if it is one."""
    from densefusion_hf.runners.manifest import MANIFEST_NAME, Manifest

    if (path / "assets").is_dir() and (path / "README.md").exists():
        return path
    recorded = (Manifest(path).stage("publish") or {}).get("dataset") if (path / MANIFEST_NAME).exists() else None
    folder = Path(recorded) if recorded else path / "dataset"
    if not (folder / "assets").is_dir():
        raise UserError(f"{path}: no published dataset here (looked for {folder}/assets). Build it first with "
                        f"`df-hf build RECIPE --workdir {path}`.")
    return folder


@cli.group()
def card():
    """Render and check dataset cards (README.md) of published dataset folders."""


@card.command("render")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo", metavar="ORG/NAME", default=None,
              help="Write the loading code for this Hub repo instead of the folder's path.")
@click.option("--version", "version", metavar="X.Y.Z", default=None, help="Version the card names.")
def card_render(folder: Path, repo: str | None, version: str | None):
    """Render FOLDER/README.md again from its assets/CONFIG/build.json files (offline)."""
    from densefusion_hf.publish.cards import render_card

    if version is not None:
        _check_version(version)
    card = render_card(folder, load_path=repo, version=version)
    click.echo(f"Wrote {folder / 'README.md'} ({len(str(card).splitlines())} lines, configs: "
               f"{', '.join(c['config_name'] for c in card.data.configs)}).")


@card.command("check")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def card_check(folder: Path):
    """Check FOLDER/README.md against the files (offline): the YAML parses, every config's data_files
    resolve to Parquet files, size_categories, features, row counts and checksums match the data."""
    from densefusion_hf.publish.cards import check_card

    problems = check_card(folder)
    if problems:
        raise UserError(f"{folder / 'README.md'} does not match the data:\n  - " + "\n  - ".join(problems))
    click.echo(f"{folder / 'README.md'}: the card matches the data.")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work directory of the build [default: ./work/<recipe name>].")
@click.option("--dry-run", is_flag=True,
              help="Run the experts and write the prompts of the first rows, without generating captions.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Rows in a dry run.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where a dry run writes its JSON Lines [default: WORKDIR/caption-dry-run/prompts.jsonl].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def caption(recipe: Path, workdir: Path | None, dry_run: bool, limit: int, output: Path | None, progress: bool):
    """Caption the selected rows of RECIPE's build (the caption stage alone).

    The stages before caption must be complete in the work directory. With --dry-run, the vision
    experts run on the first --limit rows and their priors and prompts are written as JSON Lines,
    one object per row, so the prompts can be read before any caption is generated; nothing in the
    build changes.
    """
    from densefusion_hf.runners.local import build as run_build, caption_dry_run, default_workdir
    from densefusion_hf.recipe import load_recipe

    loaded = load_recipe(recipe)
    workdir = workdir or default_workdir(loaded)
    if dry_run:
        output = output or workdir / "caption-dry-run" / "prompts.jsonl"
        count, dropped = caption_dry_run(loaded, workdir, output, limit)
        undecodable = f"; {dropped} rows whose image does not decode are listed with the reason" if dropped else ""
        click.echo(f"Wrote the priors and prompts of {count} rows to {output}{undecodable} (nothing was "
                   f"generated).")
        return
    if "caption" not in loaded.stages:
        raise UserError(f"{recipe}: this recipe has no caption stage; add a caption section (see "
                        f"`df-hf recipe fields`).")
    run_build(loaded, workdir, only="caption", show_progress=progress)
    click.echo(f"Captioned {loaded.name} in {workdir}. Per-stage counts: df-hf status {workdir}")


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON instead of a table.")
def status(workdir: Path, as_json: bool):
    """Show, per stage, shards done / total and rows in / kept / dropped by reason in WORKDIR."""
    from densefusion_hf.runners.status import collect_status, format_status

    report = collect_status(workdir)
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


@cli.command()
@click.argument("path")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: a free one).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default web browser.")
@click.option("--config", default=None, help="The dataset config to show [default: the first one].")
@click.option("--revision", default=None, help="For a Hub repo: a branch, tag (e.g. v1.0.0) or commit.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the index and thumbnails go [default: WORKDIR/browse-cache for a work directory, "
                   "else ~/.cache/densefusion-hf/browse/...].")
def browse(path: str, port: int, open_browser: bool, config: str | None, revision: str | None,
           cache_dir: Path | None):
    """Look at a dataset in a web page served on 127.0.0.1: PATH is a work directory, a published dataset
    folder or a Hub dataset repo id (org/name, read with ranged requests, nothing downloaded whole).

    The page shows the card and the per-stage counts, a gallery with filters (category, caption words, OCR,
    box label, expert, image size) and full-text search over captions, alt texts and OCR lines, each row
    with its boxes drawn over the image, and, for a work directory, the dropped rows by stage and reason.
    The server only reads: the index and thumbnails go to the cache folder. Ctrl-C stops it.
    """
    from densefusion_hf.browse.server import serve

    serve(path, port=port, open_browser=open_browser, config=config, revision=revision, cache_dir=cache_dir,
          echo=click.echo)


@cli.group()
def recipe():
    """Check recipes and list their fields."""


@recipe.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def recipe_check(path: Path):
    """Validate the recipe at PATH and print its stages."""
    from densefusion_hf.recipe import load_recipe

    loaded = load_recipe(path)
    click.echo(f"{path}: valid recipe '{loaded.name}' {loaded.version}; stages: {', '.join(loaded.stages)}")


@recipe.command("fields")
def recipe_fields():
    """List every recipe field with its type and meaning."""
    from densefusion_hf.recipe import recipe_fields as fields

    rows = fields()
    width = max(len(path) for path, _, _ in rows) + 1
    for path, kind, text in rows:
        click.echo(f"{path:{width}s} {kind}" + (f"\n{'':{width}s}   {text}" if text else ""))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one paragraph and a non-zero status on failure, never a lost build."""
    try:
        status = cli.main(args=argv, prog_name="df-hf", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted. Finished shards are kept: run the same command again to resume.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("\nInterrupted. Finished shards are kept: run the same command again to resume.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # an unexpected failure: keep the traceback, say that work is kept
        traceback.print_exc()
        click.echo(f"\nError: unexpected {type(exc).__name__}: {exc}. Finished shards are kept; after fixing "
                   f"the cause, run the same command again to resume. Please report this with the "
                   f"traceback above.", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
