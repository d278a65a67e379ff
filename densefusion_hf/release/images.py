"""The release's images for the rows of one fetch shard: what fetch takes from the zips, and what it must
download from the URLs instead.

Two steps, so a shard never holds all its images at once: ``ShardImages(...)`` reads and decodes every
member once and keeps only its size, format and SHA-256; ``image_row`` reads a member again (CRC-checked)
when fetch writes that row.  A row whose zip is missing, whose member is absent or damaged, or whose bytes do
not decode has a failure (``missing_in_release`` / ``corrupt_in_release``); fetch downloads it from its URL,
and when that fails too ``explain`` gives the drop both reasons.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from densefusion_hf.images import UnreadableImage, inspect_image
from densefusion_hf.netguard.opener import TooLarge, check_pixels
from densefusion_hf.recipe import Recipe
from densefusion_hf.release.repo import ReleaseRepo
from densefusion_hf.release.zips import MemberError, OpenZips, ZipCheck, check_zip

#: Counts kept per zip shard in fetch's stats (``stats["release"]``), summed for the card.
COUNTS = ("rows", "read", "missing", "corrupt", "too_large", "repaired", "lost")


def zip_member(recipe: Recipe, image_path: str | None) -> tuple[str, str] | None:
    """(zip path in the repo, member name) of ``<folder>/<shard>/<member>``; None when it is not that shape."""
    parts = (image_path or "").strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        return None
    folder, shard, member = "/".join(parts[:-2]), parts[-2], parts[-1]
    return recipe.source.release.layout.images.format(folder=folder, shard=shard), member


class ShardImages:
    def __init__(self, recipe: Recipe, workdir: Path, rows: pa.Table):
        repo = ReleaseRepo(recipe.source.release, Path(workdir) / "release" / "downloads")
        # One folder of zip checks per repo and revision: another revision's zips are other files.
        where = hashlib.sha256(f"{recipe.source.release.repo}@{recipe.source.release.revision}".encode())
        records = Path(workdir) / "release" / "zips" / where.hexdigest()[:16]
        self.zips = OpenZips()
        self.checks: dict[str, ZipCheck] = {}
        self.found: dict[str, tuple[str, str, dict]] = {}     # key -> (zip, member, image columns)
        self.failures: dict[str, tuple[str, str]] = {}        # key -> (reason, detail)
        self.zip_of: dict[str, str | None] = {}
        for key, image_path in zip(rows.column("key").to_pylist(), rows.column("image_path").to_pylist()):
            where = zip_member(recipe, image_path)
            if where is None:
                self.zip_of[key] = None
                self.failures[key] = ("missing_in_release", f"no image path in the release ({image_path!r})")
                continue
            path, member = where
            self.zip_of[key] = path
            if path not in self.checks:
                self.checks[path] = check_zip(repo, path, records)
            try:
                # fetch's limits hold for the release's images too: the size before reading, the pixels
                # before anything decodes them
                limits = recipe.fetch
                data = self.zips.read(self.checks[path], member, limits.max_bytes)
                check_pixels(data, limits.max_pixels)
                info = inspect_image(data)   # the format comes from the bytes, not the .png name
            except TooLarge as exc:
                self.failures[key] = ("too_large", f"{path}: member {member}: {exc.args[0]}")
                continue
            except MemberError as exc:
                self.failures[key] = (exc.reason, exc.detail)
                continue
            except UnreadableImage as exc:
                self.failures[key] = ("corrupt_in_release", f"{path}: member {member} is not an image ({exc})")
                continue
            self.found[key] = (path, member, {
                "width": info.width, "height": info.height, "original_width": info.width,
                "original_height": info.height, "image_format": info.format,
                "sha256": hashlib.sha256(data).hexdigest(), "image_source": "release"})

    def to_download(self, rows: pa.Table) -> pa.Table:
        """The rows the release could not give."""
        have = pa.array(list(self.found), pa.string())
        return rows.filter(pc.invert(pc.is_in(rows.column("key"), value_set=have)))

    def image_row(self, key: str) -> dict | None:
        """The image columns of a row taken from the release (None: not one); its member is read again."""
        if key not in self.found:
            return None
        path, member, columns = self.found[key]
        data = self.zips.read(self.checks[path], member)
        if hashlib.sha256(data).hexdigest() != columns["sha256"]:
            raise RuntimeError(f"{self.checks[path].local} changed while it was read (member {member}); "
                               f"run the build again")
        return dict(columns, image=data)

    def explain(self, drops: list[dict]) -> None:
        """Drops of rows the release lacked as well: the release's reason first, then the download's."""
        for drop in drops:
            failure = self.failures.get(drop["key"])
            if failure is not None:
                drop["detail"] = f"{failure[1]}; from the URL: {drop['reason']}: {drop.get('detail') or ''}".strip()
                drop["reason"] = failure[0]

    def counts(self, kept_keys: set[str]) -> dict:
        """Per zip shard: rows, members read, missing, corrupt, over fetch's size limits, repaired from the URL,
        lost; the zip's check, and its ``central_directory`` (``OpenZips.central_directory``)."""
        out: dict[str, dict] = {}
        for key, path in self.zip_of.items():
            entry = out.setdefault(path or "(no image path)", dict.fromkeys(COUNTS, 0))
            entry["rows"] += 1
            if key in self.found:
                entry["read"] += 1
                continue
            reason = self.failures[key][0]
            entry[{"missing_in_release": "missing", "too_large": "too_large"}.get(reason, "corrupt")] += 1
            entry["repaired" if key in kept_keys else "lost"] += 1
        for path, entry in out.items():
            check = self.checks.get(path)
            entry["present"] = bool(check and check.present)
            entry["sha256_matches"] = check.sha256_matches if check else None
            entry["central_directory"] = self.zips.central_directory(check) if check else None
        return out

    def close(self) -> None:
        self.zips.close()
