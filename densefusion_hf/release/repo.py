"""The files of a release: downloaded through huggingface_hub (resumable, cached, ``HF_ENDPOINT`` honoured) at
the recipe's revision, or found in a local folder of the same layout."""

from __future__ import annotations

from pathlib import Path

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import Release


class ReleaseRepo:
    """One release's repo (or folder) at one revision."""

    def __init__(self, release: Release):
        self.release = release

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
            return Path(hf_hub_download(self.release.repo, path, repo_type="dataset",
                                        revision=self.release.revision, force_download=force))
        except EntryNotFoundError:
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise UserError(f"source.release: {self.where} cannot be read from the Hub "
                            f"({type(exc).__name__}); check source.release.repo and revision.") from None

    def lfs_sha256(self, path: str) -> str | None:
        """The SHA-256 the Hub lists for an LFS file (None: a local folder, or not an LFS file)."""
        if self.release.is_local:
            return None
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(self.release.repo, [path], repo_type="dataset",
                                       revision=self.release.revision)
        lfs = getattr(infos[0], "lfs", None) if infos else None
        return lfs.sha256 if lfs is not None else None
