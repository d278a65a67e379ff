"""A zip whose central directory is broken, read member by member from its local file headers.

``zipfile`` needs the central directory at the end of the file; a release shard cut or damaged there does not
open at all, though its members are intact.  Each member is also preceded by a local file header (ZIP
specification 4.3.7, CPython's ``zipfile.structFileHeader``) giving its name, method, sizes and CRC, so the
file can be walked from its start: ``SalvagedZip`` indexes the headers once (seeking past each member's data,
never holding it) and reads a member on demand, CRC-checked.  The walk stops at the central directory, at the
end of the file, or at the first thing that is not a local header; what was indexed before stays readable.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")   # signature, version, flags, method, time, date, crc, sizes, lengths
LOCAL_SIGNATURE = b"PK\x03\x04"
DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
#: Where the members end and the zip's directory records begin: central header, zip64 end, end of directory.
DIRECTORY_SIGNATURES = (b"PK\x01\x02", b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06")
STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800
ZIP64_EXTRA = 0x0001
CHUNK = 1 << 20


class SalvageError(Exception):
    """A member the local headers cannot give back intact; the message says what is wrong."""


@dataclass(frozen=True)
class LocalMember:
    """One member as its local header (and data descriptor, if any) describes it."""

    name: str
    header_offset: int
    data_offset: int
    method: int
    compressed_size: int
    size: int
    crc: int
    next_header: int              # where the walk goes on: after the data (and its descriptor)
    problem: str | None = None    # why it cannot be read, found while walking (e.g. stored with a descriptor)


def _zip64_sizes(extra: bytes, size: int, compressed: int) -> tuple[int, int, bool]:
    """The sizes a zip64 extra field holds in place of the header's 0xFFFFFFFF ones (uncompressed first),
    and whether there is such a field (then a data descriptor holds 8-byte sizes)."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4: at + 4 + length]
        if kind == ZIP64_EXTRA:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                compressed = values.pop(0)
            return size, compressed, True
        at += 4 + length
    return size, compressed, False


class SalvagedZip:
    """The members of ``path`` found by walking its local file headers; ``read`` like ``ZipFile.read``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.members: dict[str, LocalMember] = {}
        self.stopped: str | None = None   # why the walk ended before the zip's directory (None: it reached it)
        self._file = open(self.path, "rb")
        self._file_size = self.path.stat().st_size
        try:
            self._walk()
        except OSError:
            self._file.close()
            raise

    def _walk(self) -> None:
        at = 0
        while True:
            if at == self._file_size:
                return
            self._file.seek(at)
            head = self._file.read(LOCAL_HEADER.size)
            if head[:4] in DIRECTORY_SIGNATURES:
                return
            if len(head) < LOCAL_HEADER.size or head[:4] != LOCAL_SIGNATURE:
                self.stopped = f"no local file header at byte {at}"
                return
            (_, _, flags, method, _, _, crc, compressed, size, name_length,
             extra_length) = LOCAL_HEADER.unpack(head)
            name_bytes, extra = self._file.read(name_length), self._file.read(extra_length)
            if len(name_bytes) < name_length or len(extra) < extra_length:
                self.stopped = f"the local file header at byte {at} runs past the end of the file"
                return
            name = name_bytes.decode("utf-8" if flags & FLAG_UTF8 else "cp437", errors="replace")
            size, compressed, zip64 = _zip64_sizes(extra, size, compressed)
            data_offset = at + LOCAL_HEADER.size + name_length + extra_length
            member = LocalMember(name, at, data_offset, method, compressed, size, crc, data_offset + compressed)
            if flags & FLAG_ENCRYPTED:
                member = replace(member, problem="it is encrypted")
            elif flags & FLAG_DESCRIPTOR:
                member, stop = self._described(member, zip64)
                if stop:
                    self.members[name] = member
                    self.stopped = f"at member {name} (byte {at}): {member.problem}"
                    return
            self.members[name] = member
            at = member.next_header
            if at > self._file_size:
                self.stopped = f"member {name} (byte {member.header_offset}) runs past the end of the file"
                return

    def _described(self, member: LocalMember, zip64: bool) -> tuple[LocalMember, bool]:
        """A member whose sizes and CRC follow its data (flag bit 3): a deflate stream says where it ends, so
        the descriptor after it can be read; stored data does not.  Returns the member and whether the walk
        must stop (its end, and so the next header, unknown)."""
        if member.method != DEFLATED:
            return replace(member, problem="its sizes are in a data descriptor after data that is not "
                                           "deflated, so where it ends is unknown"), True
        self._file.seek(member.data_offset)
        inflate, fed = zlib.decompressobj(-15), 0
        try:
            while not inflate.eof:
                chunk = self._file.read(CHUNK)
                if not chunk:
                    return replace(member, problem="its deflate stream is cut off by the end of the file"), True
                fed += len(chunk)
                inflate.decompress(chunk, CHUNK)   # only to find the stream's end; the output is dropped
                while inflate.unconsumed_tail and not inflate.eof:
                    inflate.decompress(inflate.unconsumed_tail, CHUNK)
        except zlib.error as exc:
            return replace(member, problem=f"its deflate stream is damaged ({exc})"), True
        compressed = fed - len(inflate.unused_data)
        self._file.seek(member.data_offset + compressed)
        descriptor = self._file.read(24)
        signed = descriptor[:4] == DESCRIPTOR_SIGNATURE     # the signature is optional (APPNOTE 4.3.9.3)
        fmt = "<LQQ" if zip64 else "<LLL"
        if len(descriptor) - 4 * signed < struct.calcsize(fmt):
            return replace(member, problem="its data descriptor is cut off by the end of the file"), True
        crc, listed, size = struct.unpack_from(fmt, descriptor, 4 * signed)
        if listed != compressed:
            return replace(member, problem=f"its data descriptor says {listed} compressed bytes, its deflate "
                                           f"stream has {compressed}"), True
        return replace(member, compressed_size=compressed, size=size, crc=crc,
                       next_header=member.data_offset + compressed + 4 * signed + struct.calcsize(fmt)), False

    def namelist(self) -> list[str]:
        return list(self.members)

    def read(self, name: str) -> bytes:
        """The member's bytes, CRC-checked; KeyError when the walk reached the zip's directory without
        meeting it, SalvageError when it is damaged or the walk stopped before it."""
        member = self.members.get(name)
        if member is None:
            if self.stopped is None:
                raise KeyError(name)
            raise SalvageError(f"no local header names it before the walk stopped ({self.stopped})")
        if member.problem is not None:
            raise SalvageError(member.problem)
        if member.method not in (STORED, DEFLATED):
            raise SalvageError(f"compression method {member.method} (only stored and deflated are read)")
        self._file.seek(member.data_offset)
        inflate = zlib.decompressobj(-15) if member.method == DEFLATED else None
        out, crc, left = bytearray(), 0, member.compressed_size
        try:
            while left:
                chunk = self._file.read(min(CHUNK, left))
                if not chunk:
                    raise SalvageError(f"truncated: {member.compressed_size - left} of its "
                                       f"{member.compressed_size} bytes are in the file")
                left -= len(chunk)
                # Never more than the header's size: a damaged stream cannot grow without bound.
                data = chunk if inflate is None else inflate.decompress(chunk, member.size + 1 - len(out))
                out += data
                crc = zlib.crc32(data, crc)
                if len(out) > member.size:
                    raise SalvageError(f"it holds more than the {member.size} bytes its header says")
        except zlib.error as exc:
            raise SalvageError(f"its deflate stream is damaged ({exc})") from None
        if inflate is not None and not inflate.eof:
            raise SalvageError("its deflate stream ends early")
        if len(out) != member.size:
            raise SalvageError(f"it holds {len(out)} bytes, its header says {member.size}")
        if crc != member.crc:
            raise SalvageError(f"Bad CRC-32 (header {member.crc:08x}, data {crc:08x})")
        return bytes(out)

    def close(self) -> None:
        self._file.close()

