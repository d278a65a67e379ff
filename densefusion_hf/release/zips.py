"""A release's zip shards: each downloaded once, checked against the Hub's LFS SHA-256, and read a member at a
time (the CRC checked by zipfile on every read), never extracted whole.  A zip that zipfile cannot open (its
central directory broken) is read from its members' local file headers instead (``salvage``).

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

from densefusion_hf.netguard.opener import TooLarge
from densefusion_hf.release.repo import ReleaseRepo
from densefusion_hf.release.salvage import SalvagedZip, SalvageError
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
        self._open: dict[str, zipfile.ZipFile | SalvagedZip | MemberError] = {}
        self._directory: dict[str, str] = {}   # zip path -> "ok" or "broken"; kept after close for the card

    def _zip(self, check: ZipCheck) -> zipfile.ZipFile | SalvagedZip:
        if check.path not in self._open:
            if not check.present:
                self._open[check.path] = MemberError("missing_in_release", f"{check.path} is not in the release")
            else:
                self._open[check.path] = self._opened(check)
                opened = self._open[check.path]
                self._directory[check.path] = ("ok" if isinstance(opened, zipfile.ZipFile) else
                                               "broken" if isinstance(opened, SalvagedZip) else "unreadable")
        found = self._open[check.path]
        if isinstance(found, MemberError):
            raise found
        return found

    @staticmethod
    def _opened(check: ZipCheck) -> zipfile.ZipFile | SalvagedZip | MemberError:
        try:
            return zipfile.ZipFile(check.local)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            refused = f"{type(exc).__name__}: {exc}"
        try:
            salvaged = SalvagedZip(check.local)
        except OSError as exc:
            return MemberError("corrupt_in_release", f"{check.path} does not open as a zip ({refused}; {exc})")
        if not salvaged.members:
            salvaged.close()
            why = salvaged.stopped or "the file holds no local file header"
            return MemberError("corrupt_in_release", f"{check.path} does not open as a zip ({refused}) and has "
                                                     f"no member to salvage ({why})")
        return salvaged

    def central_directory(self, check: ZipCheck) -> str | None:
        """"ok" when zipfile opened the zip, "broken" when it did not and its members are read from their local
        headers, "unreadable" when neither could; None when the zip is absent or was never opened."""
        return self._directory.get(check.path)

    def read(self, check: ZipCheck, member: str, max_bytes: int | None = None) -> bytes:
        """The member's bytes, CRC-checked; MemberError when it is absent or damaged, TooLarge (before reading
        anything) when the size its zip states is over ``max_bytes``."""
        archive = self._zip(check)
        if max_bytes is not None:
            if isinstance(archive, SalvagedZip):
                stated = archive.members[member].size if member in archive.members else None
            else:
                stated = archive.NameToInfo[member].file_size if member in archive.NameToInfo else None
            if stated is not None and stated > max_bytes:
                raise TooLarge(f"{stated} bytes > fetch.max_bytes {max_bytes}")
        try:
            return archive.read(member)
        except KeyError:
            raise MemberError("missing_in_release", f"{check.path} has no member {member}") from None
        except SalvageError as exc:
            raise MemberError("corrupt_in_release", f"{check.path}: member {member} cannot be salvaged from its "
                                                    f"local header (the central directory is broken): {exc}") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError,
                RuntimeError) as exc:  # RuntimeError: an encrypted member
            raise MemberError("corrupt_in_release",
                              f"{check.path}: member {member} is damaged ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        for archive in self._open.values():
            if not isinstance(archive, MemberError):
                archive.close()
        self._open.clear()
