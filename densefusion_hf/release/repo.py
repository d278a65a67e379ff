"""The files of a release: downloaded through huggingface_hub (``HF_ENDPOINT`` honoured) at the recipe's
revision, or found in a local folder of the same layout.

A build keeps its downloads in the work directory, written to ``NAME.partial`` and renamed when complete, so a
download cut off (a dropped connection, or the build killed) goes on from the bytes it has when run again.
huggingface_hub's own cache resumes only within one process: each process downloads into a file of its own.
Processes that want the same file take turns on ``NAME.lock`` (flock, released when a process dies).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import Release


class ReleaseRepo:
    """One release's repo (or folder) at one revision."""

    def __init__(self, release: Release, downloads: Path | None = None):
        self.release = release
        self.downloads = downloads  # where resumable downloads go; None: huggingface_hub's cache

    @property
    def where(self) -> str:
        revision = f"@{self.release.revision}" if self.release.revision else ""
        return f"{self.release.repo}{revision}"

    def file(self, path: str, *, force: bool = False) -> Path | None:
        """The local path of the repo's file ``path`` (downloaded when needed); None when the repo lacks it."""
        if self.release.is_local:
            local = Path(self.release.repo) / path
            return local if local.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            if self.downloads is not None:
                return self._resumable(path, force)
            return Path(hf_hub_download(self.release.repo, path, repo_type="dataset",
                                        revision=self.release.revision, force_download=force))
        except EntryNotFoundError:
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise UserError(f"source.release: {self.where} cannot be read from the Hub "
                            f"({type(exc).__name__}); check source.release.repo and revision.") from None

    def _resumable(self, path: str, force: bool) -> Path:
        """``path`` downloaded into ``self.downloads/COMMIT/``, going on from a ``.partial`` file left there."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.release.repo, path, repo_type="dataset", revision=self.release.revision)
        metadata = get_hf_file_metadata(url)
        target = self.downloads / (metadata.commit_hash or "unknown-commit") / path
        if target.exists() and not force and (metadata.size is None or target.stat().st_size == metadata.size):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Fetch shards run side by side (Ray) and can need the same zip: one process downloads it, the others
        # wait and then find it complete, rather than appending to the same .partial file at once.
        with open(target.with_name(target.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.exists() and not force and (metadata.size is None or target.stat().st_size == metadata.size):
                return target
            partial = target.with_name(target.name + ".partial")
            if force or (partial.exists() and metadata.size is not None and partial.stat().st_size > metadata.size):
                partial.unlink(missing_ok=True)
            with open(partial, "ab") as handle:
                http_get(metadata.location or url, handle, resume_size=handle.tell(), headers=build_hf_headers(),
                         expected_size=metadata.size, displayed_filename=Path(path).name)
            os.replace(partial, target)
        return target

    def lfs_sha256(self, path: str) -> str | None:
        """The SHA-256 the Hub lists for an LFS file (None: a local folder, or not an LFS file)."""
        if self.release.is_local:
            return None
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(self.release.repo, [path], repo_type="dataset",
                                       revision=self.release.revision)
        lfs = getattr(infos[0], "lfs", None) if infos else None
        return lfs.sha256 if lfs is not None else None
