"""A release's zip shards: each downloaded once, checked against the Hub's LFS SHA-256, and read a member at a
time (the CRC checked by zipfile on every read), never extracted whole.

A zip whose SHA-256 matches can still be damaged inside (the official release has such shards), so the
digest decides nothing alone: a member that reads and decodes is used, whatever the digest said.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from densefusion_hf.release.repo import ReleaseRepo
from densefusion_hf.stages.shards import file_digest as file_sha256, temporary_name


@dataclass
class ZipCheck:
    """What is known about one zip shard before its members are read."""

    path: str                       # in the repo
    present: bool
    sha256_expected: str | None = None
    sha256: str | None = None
    local: str | None = None        # where the downloaded copy is

    @property
    def sha256_matches(self) -> bool | None:
        if not self.present or self.sha256_expected is None:
            return None
        return self.sha256 == self.sha256_expected


def check_zip(repo: ReleaseRepo, path: str, records: Path) -> ZipCheck:
    """Download ``path`` and compare it with its LFS SHA-256; the result is saved under ``records`` so each
    zip is hashed once per work directory.  A mismatch is downloaded again once."""
    record = records / (path.replace("/", "__") + ".json")
    if record.exists():
        check = ZipCheck(**json.loads(record.read_text()))
        if not check.present or (check.local and Path(check.local).exists()):
            return check
    local = repo.file(path)
    if local is None:
        check = ZipCheck(path, present=False)
    else:
        expected = repo.lfs_sha256(path)
        actual = file_sha256(local)
        if expected is not None and actual != expected:
            local = repo.file(path, force=True)
            actual = file_sha256(local)
        check = ZipCheck(path, True, expected, actual, str(local))
    records.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(record)
    tmp.write_text(json.dumps(asdict(check), sort_keys=True))
    os.replace(tmp, record)
    return check


class MemberError(Exception):
    """A member that cannot be had from its zip; ``reason`` is missing_in_release or corrupt_in_release."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class OpenZips:
    """The zips one fetch shard reads from, each opened once, closed together."""

    def __init__(self):
        self._open: dict[str, zipfile.ZipFile | MemberError] = {}

    def _zip(self, check: ZipCheck) -> zipfile.ZipFile:
        if check.path not in self._open:
            if not check.present:
                self._open[check.path] = MemberError("missing_in_release", f"{check.path} is not in the release")
            else:
                try:
                    self._open[check.path] = zipfile.ZipFile(check.local)
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                    self._open[check.path] = MemberError(
                        "corrupt_in_release", f"{check.path} does not open as a zip ({type(exc).__name__}: {exc})")
        found = self._open[check.path]
        if isinstance(found, MemberError):
            raise found
        return found

    def read(self, check: ZipCheck, member: str) -> bytes:
        """The member's bytes, CRC-checked; MemberError when it is absent or damaged."""
        archive = self._zip(check)
        try:
            return archive.read(member)
        except KeyError:
            raise MemberError("missing_in_release", f"{check.path} has no member {member}") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise MemberError("corrupt_in_release",
                              f"{check.path}: member {member} is damaged ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        for archive in self._open.values():
            if isinstance(archive, zipfile.ZipFile):
                archive.close()
        self._open.clear()
