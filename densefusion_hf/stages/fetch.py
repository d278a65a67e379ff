"""fetch: download each ingest shard's images with img2dataset (its Python API, Parquet output).

One img2dataset run per shard, in a scratch folder; its chatter goes to ``fetch/shard-N.log`` and its
per-shard stats into ours.  Every downloaded file is then decoded in full with Pillow, because with the
default "keep the original bytes" policy img2dataset does not decode, and an empty file, a truncated
JPEG or an HTML error page would otherwise pass as a success.  Each failure is a dropped row with
img2dataset's status (``failed_to_download``, ``failed_to_resize``) or ``undecodable``, and the reason.

A release build (``source.release``) first takes each row's image from the release's zip
(``densefusion_hf.release.images``); only the rows the release lacks go to img2dataset, and a row lost by
both is dropped with the release's reason, the download's error in its detail.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import signal
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from densefusion_hf.console import output_to_file
from densefusion_hf.images import UnreadableImage, inspect_image
from densefusion_hf.netguard.addresses import AddressPolicy
from densefusion_hf.netguard.opener import DownloadGuard, TooLarge, check_pixels
from densefusion_hf.recipe import Recipe
from densefusion_hf.recipe.sections import DEFAULT_DISALLOWED_DIRECTIVES, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from densefusion_hf.sample.server import SampleServer, proxied_through
from densefusion_hf.stages.downloads import DownloadedRows, check_complete, download_stats
from densefusion_hf.stages.removal import exclusion_params, load_removals
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.stages.base import BuildContext, ShardStage

# albumentations (imported by img2dataset) asks the network for updates unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Columns fetch adds to (or replaces in) the ingest shard.
IMAGE_COLUMNS = pa.schema([
    ("width", pa.int64()),            # size of the stored image
    ("height", pa.int64()),
    ("original_width", pa.int64()),   # size before a resize (equal when none)
    ("original_height", pa.int64()),
    ("image_format", pa.string()),
    ("sha256", pa.string()),          # of the stored bytes
    ("image", pa.binary()),
])

_WRITE_BATCH = 256

# The guard's refusals travel through img2dataset as error text: "<urlopen error [blocked_address] ...>".
_ROBOTS_REFUSAL = "Use of image disallowed by X-Robots-Tag"  # img2dataset 1.47's words
_GUARD_REFUSAL = re.compile(r"\[(blocked_address|too_large)\] ([^>]*)")


def download_guard(recipe: Recipe, extra_allowed: tuple[str, ...] = ()) -> DownloadGuard:
    """The recipe's address policy and size limits, plus the operator's allow-list from the environment."""
    fetch = recipe.fetch
    policy = AddressPolicy.from_environment(fetch.allow_private_addresses,
                                            list(fetch.allow_networks) + list(extra_allowed))
    return DownloadGuard(policy, fetch.max_bytes, fetch.max_pixels)


def guard_drop(error_message: str | None) -> tuple[str, str] | None:
    """(reason, detail) when img2dataset's error is one of the guard's refusals or an X-Robots-Tag refusal."""
    if (error_message or "").startswith(_ROBOTS_REFUSAL):
        return "disallowed_by_header", error_message
    found = _GUARD_REFUSAL.search(error_message or "")
    return (found.group(1), found.group(2).strip()) if found else None


def img2dataset_options(recipe: Recipe) -> dict:
    """The recipe's download policy in img2dataset's words."""
    fetch = recipe.fetch
    options = dict(
        timeout=fetch.timeout, retries=fetch.retries, processes_count=fetch.processes,
        thread_count=fetch.threads, user_agent_token=fetch.user_agent_token,
        disallowed_header_directives=list(fetch.disallowed_header_directives),
    )
    if fetch.resize.max_side is None:
        options.update(resize_mode="no", disable_all_reencoding=True)
    else:
        options.update(resize_mode="keep_ratio_largest", image_size=fetch.resize.max_side,
                       resize_only_if_bigger=True, skip_reencode=True,
                       encode_format=fetch.encode_format, encode_quality=fetch.encode_quality)
    return options


def run_img2dataset(urls_path: str, output_folder: str, rows: int, options: dict,
                    guard: DownloadGuard | None = None, log_path: str | None = None) -> int:
    """Download one of our shards; img2dataset splits it so that each of its processes gets a part.

    Returns the number of parts it was given."""
    import img2dataset

    from densefusion_hf.netguard.img2dataset_hook import guarded_downloads
    from densefusion_hf.stages.img2dataset_workers import shared_workers

    part_rows = max(1, math.ceil(rows / options.get("processes_count", 1)))

    previous = signal.getsignal(signal.SIGINT)
    try:
        with guarded_downloads(guard or DownloadGuard(), log_path), shared_workers():
            img2dataset.download(
                url_list=urls_path, input_format="parquet", url_col="url", caption_col="text",
                save_additional_columns=["row_key"], output_folder=output_folder, output_format="parquet",
                number_sample_per_shard=part_rows, incremental_mode="incremental", extract_exif=False,
                compute_hash=None, enable_wandb=False, **options,
            )
    except SystemExit as exc:
        # img2dataset answers Ctrl-C with sys.exit(0); a stopped download is not a success.
        if exc.code in (0, None):
            raise KeyboardInterrupt from None
        raise RuntimeError(f"img2dataset exited with status {exc.code}; see the shard's img2dataset.log") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    return math.ceil(rows / part_rows)


def _close_img2dataset_workers() -> None:
    """Stop the img2dataset workers this process kept, if it started any (without importing img2dataset)."""
    workers = sys.modules.get("densefusion_hf.stages.img2dataset_workers")
    if workers is not None:
        workers.close_pools()


class Fetch(ShardStage):
    name = "fetch"
    session_per_worker = True  # img2dataset's worker processes (fetch.processes > 1), started once per worker

    def params(self, recipe: Recipe) -> dict:
        params: dict = {"resize_max_side": recipe.fetch.resize.max_side}
        if recipe.fetch.resize.max_side is not None:
            params.update(encode_format=recipe.fetch.encode_format, encode_quality=recipe.fetch.encode_quality)
        # Named only when changed, so that work directories made before these settings existed still resume.
        fetch = recipe.fetch
        if fetch.allow_private_addresses:
            params["allow_private_addresses"] = True
        if fetch.allow_networks:
            params["allow_networks"] = sorted(fetch.allow_networks)
        if fetch.max_bytes != DEFAULT_MAX_BYTES:
            params["max_bytes"] = fetch.max_bytes
        if fetch.max_pixels != DEFAULT_MAX_PIXELS:
            params["max_pixels"] = fetch.max_pixels
        if sorted(fetch.disallowed_header_directives) != sorted(DEFAULT_DISALLOWED_DIRECTIVES):
            params["disallowed_header_directives"] = sorted(d.lower() for d in fetch.disallowed_header_directives)
        if load_removals(recipe.source.exclude).sha256 if recipe.source.exclude else False:
            params["exclude"] = exclusion_params(recipe.source.exclude)
        return params

    # Endpoints allowed for the length of a session: the demo's own loopback server, and nothing else.
    session_allowed: tuple[str, ...] = ()

    def session(self, ctx: BuildContext):
        stack = contextlib.ExitStack()
        # img2dataset's workers serve every shard of the session (the whole stage locally, one actor's shards
        # on Ray), then stop (stages.img2dataset_workers)
        stack.callback(_close_img2dataset_workers)
        if not ctx.recipe.source.sample:
            return stack
        server = stack.enter_context(SampleServer(ctx.workdir / "sample" / "files"))
        stack.enter_context(proxied_through(server))
        self.session_allowed = (server.address.split("//", 1)[1],)
        stack.callback(setattr, self, "session_allowed", ())
        return stack

    def run_shard(self, ctx: BuildContext, shard: str, source: StageDir, out: StageDir) -> dict:
        started = time.monotonic()
        rows = source.read(shard)
        scratch = out.scratch(shard)
        downloaded = scratch / "img2dataset"
        results, i2d_stats = None, {}
        # A release build takes each row's image from its zip; only the rows it lacks are downloaded.
        release = self._release_images(ctx, rows)
        to_download = rows if release is None else release.to_download(rows)
        if to_download.num_rows:
            urls = pa.table({"url": to_download["url"], "text": to_download["text"].fill_null(""),
                             "row_key": to_download["key"]})
            pq.write_table(urls, scratch / "urls.parquet")
            log_path = out.path / f"shard-{shard}.img2dataset.log"
            options = img2dataset_options(ctx.recipe)
            with output_to_file(log_path):
                parts = run_img2dataset(str(scratch / "urls.parquet"), str(downloaded), to_download.num_rows,
                                        options, download_guard(ctx.recipe, self.session_allowed), str(log_path))
            check_complete(downloaded, parts, log_path)
            results, i2d_stats = DownloadedRows(downloaded), download_stats(downloaded)

        schema = self.output_schema(rows.schema, release is not None)
        drops: list[dict] = []
        kept_keys: set[str] = set()
        with out.writer(shard, schema) as writer:
            for start in range(0, rows.num_rows, _WRITE_BATCH):
                batch = rows.slice(start, _WRITE_BATCH)
                kept = self._check_batch(batch, results, drops, ctx.recipe.fetch, release)
                kept = self._removed_images(kept, drops, load_removals(ctx.recipe.source.exclude))
                kept_keys.update(row["key"] for row in kept)
                writer.write(pa.Table.from_pylist(kept, schema=schema))
            rows_out = writer.rows
        if results is not None:
            results.close()
        shutil.rmtree(scratch, ignore_errors=True)
        stats = {"rows_in": rows.num_rows, "rows_out": rows_out,
                 "seconds": round(time.monotonic() - started, 3), "img2dataset": i2d_stats}
        if release is not None:
            release.close()
            release.explain(drops)
            stats["release"] = release.counts(kept_keys)
        return out.finish(shard, drops, stats)

    @staticmethod
    def _release_images(ctx: BuildContext, rows: pa.Table):
        """The release's images for these rows (densefusion_hf.release.images), or None for other sources."""
        if ctx.recipe.source.release is None:
            return None
        from densefusion_hf.release.images import ShardImages

        return ShardImages(ctx.recipe, ctx.workdir, rows)

    @staticmethod
    def _removed_images(kept: list[dict], drops: list, removals) -> list[dict]:
        """Images whose SHA-256 a removal request lists, found now that their bytes are known."""
        if not removals.sha256:
            return kept
        for row in kept:
            if row["sha256"] in removals.sha256:
                drops.append({"key": row["key"], "url": row["url"], "reason": "removal_request",
                              "detail": f"image sha256 {row['sha256']} listed in source.exclude"})
        return [row for row in kept if row["sha256"] not in removals.sha256]

    @staticmethod
    def output_schema(ingest_schema: pa.Schema, release: bool = False) -> pa.Schema:
        fields = [f for f in ingest_schema if f.name not in IMAGE_COLUMNS.names]
        # A release build says where each image came from: "release" (its zip) or "url" (downloaded again).
        return pa.schema(fields + list(IMAGE_COLUMNS) + ([pa.field("image_source", pa.string())] if release else []))

    @staticmethod
    def _check_batch(batch: pa.Table, results: DownloadedRows | None, drops: list, limits=None,
                     release=None) -> list[dict]:
        kept = []
        by_key = results.results(batch.column("key").to_pylist()) if results is not None else {}
        for row in batch.to_pylist():
            taken = release.image_row(row["key"]) if release is not None else None
            if taken is not None:
                row.update(taken)
                kept.append(row)
                continue
            result = by_key.get(row["key"])
            base = {"key": row["key"], "url": row["url"]}
            if result is None:
                drops.append(dict(base, reason="missing_from_download",
                                  detail="img2dataset returned no row for this URL"))
                continue
            if result["status"] != "success":
                reason, detail = guard_drop(result["error_message"]) or (
                    result["status"] or "failed_to_download", result["error_message"] or "")
                drops.append(dict(base, reason=reason, detail=detail))
                continue
            data = result["image"] or b""
            try:
                # Again here: a body img2dataset re-encoded, or a limit lowered since the download.
                if limits is not None and limits.max_bytes is not None and len(data) > limits.max_bytes:
                    raise TooLarge(f"{len(data)} bytes > fetch.max_bytes {limits.max_bytes}")
                check_pixels(data, limits.max_pixels if limits is not None else None)
            except TooLarge as exc:
                drops.append(dict(base, reason="too_large", detail=exc.args[0]))
                continue
            try:
                info = inspect_image(data)
            except UnreadableImage as exc:
                drops.append(dict(base, reason="undecodable", detail=str(exc)))
                continue
            row.update(
                width=info.width, height=info.height,
                original_width=result["original_width"] or info.width,
                original_height=result["original_height"] or info.height,
                image_format=info.format, sha256=hashlib.sha256(data).hexdigest(), image=data,
            )
            if release is not None:
                row["image_source"] = "url"
            kept.append(row)
        return kept
