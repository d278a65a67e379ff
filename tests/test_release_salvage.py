"""A release zip that zipfile refuses (its central directory broken) read from its local file headers: members
byte-identical to what was written, every kind of damage a corrupt_in_release with a detail that says what."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from densefusion_hf.release.salvage import SalvagedZip
from densefusion_hf.release.zips import MemberError, OpenZips, ZipCheck
from tests.release_fixtures import FOLDER_1M, truncate_central_directory, write_mini_release


class Unseekable(io.RawIOBase):
    """A stream zipfile cannot seek back in, so it writes each member's sizes in a data descriptor."""

    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:
        self.data += chunk
        return len(chunk)


def _zip(members: dict[str, tuple[bytes, int]], *, seekable: bool = True) -> bytes:
    out = io.BytesIO() if seekable else Unseekable()
    with zipfile.ZipFile(out, "w") as archive:
        for name, (data, method) in members.items():
            archive.writestr(name, data, compress_type=method)
    return out.getvalue() if seekable else bytes(out.data)


def _read_all(path, names: list[str]) -> dict[str, bytes | MemberError]:
    """What OpenZips gives for each name of the zip at ``path``, and how it opened the zip."""
    zips, check, out = OpenZips(), ZipCheck("images/x/000000.zip", True, local=str(path)), {}
    for name in names:
        try:
            out[name] = zips.read(check, name)
        except MemberError as exc:
            out[name] = exc
    out["central directory"] = zips.central_directory(check)
    zips.close()
    return out


@pytest.fixture
def payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    return {"noise.png": rng.bytes(70_000),                       # incompressible
            "text.png": b"a dense caption, said again and again. " * 4000}   # deflates well


def test_the_fixtures_cut_zip_gives_back_every_member_byte_for_byte(tmp_path):
    release = write_mini_release(tmp_path / "release", "http://127.0.0.1:9")
    cut = release.folder / "images" / FOLDER_1M / "000002.zip"
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(cut)
    written = {row["image_path"].rsplit("/", 1)[1]: row["member"] for row in release.rows
               if row["zip"].endswith("000002.zip")}
    got = _read_all(cut, [*written, "0000000000000.png"])
    assert {name: got[name] for name in written} == written and len(written) == 2
    assert got["central directory"] == "broken"
    assert got["0000000000000.png"].reason == "missing_in_release"   # the walk reached the directory without it


def test_a_damaged_member_of_a_cut_zip_is_corrupt_and_the_others_still_read(tmp_path, payloads):
    members = {"a.png": (payloads["noise.png"], zipfile.ZIP_STORED),
               "b.png": (payloads["text.png"], zipfile.ZIP_DEFLATED),
               "c.png": (payloads["noise.png"][::-1], zipfile.ZIP_STORED)}
    blob = bytearray(truncate_central_directory(_zip(members)))
    at = blob.index(payloads["noise.png"]) + 1000
    blob[at] ^= 0xFF
    (tmp_path / "z.zip").write_bytes(blob)
    got = _read_all(tmp_path / "z.zip", list(members))
    assert got["a.png"].reason == "corrupt_in_release" and "Bad CRC-32" in got["a.png"].detail
    assert "central directory is broken" in got["a.png"].detail
    assert got["b.png"] == payloads["text.png"] and got["c.png"] == payloads["noise.png"][::-1]


def test_stored_and_deflated_members_are_both_read(tmp_path, payloads):
    members = {"stored.png": (payloads["noise.png"], zipfile.ZIP_STORED),
               "deflated.png": (payloads["text.png"], zipfile.ZIP_DEFLATED)}
    (tmp_path / "z.zip").write_bytes(truncate_central_directory(_zip(members)))
    salvaged = SalvagedZip(tmp_path / "z.zip")
    assert {m.name: m.method for m in salvaged.members.values()} == {"stored.png": 0, "deflated.png": 8}
    assert salvaged.members["deflated.png"].compressed_size < len(payloads["text.png"]) // 10
    assert salvaged.read("stored.png") == payloads["noise.png"]
    assert salvaged.read("deflated.png") == payloads["text.png"]
    assert salvaged.stopped is None
    salvaged.close()


def test_members_with_data_descriptors_read_when_deflated_and_stop_the_walk_when_stored(tmp_path, payloads):
    deflated = {"one.png": (payloads["text.png"], zipfile.ZIP_DEFLATED),
                "two.png": (payloads["noise.png"], zipfile.ZIP_DEFLATED)}
    blob = _zip(deflated, seekable=False)
    assert zipfile.ZipFile(io.BytesIO(blob)).infolist()[0].flag_bits & 0x8   # sizes after the data
    (tmp_path / "deflated.zip").write_bytes(truncate_central_directory(blob))
    got = _read_all(tmp_path / "deflated.zip", list(deflated))
    assert got["one.png"] == payloads["text.png"] and got["two.png"] == payloads["noise.png"]

    stored = {"one.png": (payloads["noise.png"], zipfile.ZIP_STORED), "two.png": (b"x" * 100, zipfile.ZIP_STORED)}
    (tmp_path / "stored.zip").write_bytes(truncate_central_directory(_zip(stored, seekable=False)))
    got = _read_all(tmp_path / "stored.zip", list(stored))
    assert got["one.png"].reason == "corrupt_in_release" and "data descriptor" in got["one.png"].detail
    # The next header cannot be found, so a member after it is not known to be absent: damaged, not missing.
    assert got["two.png"].reason == "corrupt_in_release" and "walk stopped" in got["two.png"].detail


def test_garbage_between_headers_stops_the_walk_and_keeps_what_was_indexed(tmp_path, payloads):
    first = _zip({"first.png": (payloads["text.png"], zipfile.ZIP_DEFLATED)})
    end = first.index(b"PK\x01\x02")           # the first zip's member, without its directory
    rest = truncate_central_directory(_zip({"second.png": (payloads["noise.png"], zipfile.ZIP_STORED)}))
    (tmp_path / "z.zip").write_bytes(first[:end] + b"\x00garbage\x00" * 100 + rest)
    salvaged = SalvagedZip(tmp_path / "z.zip")
    assert list(salvaged.members) == ["first.png"] and f"byte {end}" in salvaged.stopped
    salvaged.close()
    got = _read_all(tmp_path / "z.zip", ["first.png", "second.png"])
    assert got["first.png"] == payloads["text.png"]
    second = got["second.png"]
    assert second.reason == "corrupt_in_release" and "no local file header at byte" in second.detail


def test_truncated_data_and_unknown_methods_say_what_is_wrong(tmp_path, payloads):
    members = {"whole.png": (payloads["text.png"], zipfile.ZIP_DEFLATED),
               "cut.png": (payloads["noise.png"], zipfile.ZIP_STORED)}
    blob = _zip(members)
    (tmp_path / "cut.zip").write_bytes(blob[: blob.index(payloads["noise.png"]) + 5000])   # inside cut.png
    got = _read_all(tmp_path / "cut.zip", list(members))
    assert got["whole.png"] == payloads["text.png"]
    cut = got["cut.png"]
    assert cut.reason == "corrupt_in_release" and "truncated: 5000 of its 70000 bytes" in cut.detail

    bz2 = truncate_central_directory(_zip({"b.png": (payloads["text.png"], zipfile.ZIP_BZIP2)}))
    (tmp_path / "bz2.zip").write_bytes(bz2)
    got = _read_all(tmp_path / "bz2.zip", ["b.png"])
    assert got["b.png"].reason == "corrupt_in_release" and "compression method 12" in got["b.png"].detail


def test_a_deflated_member_whose_stream_is_damaged_is_corrupt(tmp_path, payloads):
    (tmp_path / "z.zip").write_bytes(truncate_central_directory(
        _zip({"t.png": (payloads["text.png"], zipfile.ZIP_DEFLATED)})))
    salvaged = SalvagedZip(tmp_path / "z.zip")
    start = salvaged.members["t.png"].data_offset
    salvaged.close()
    blob = bytearray((tmp_path / "z.zip").read_bytes())
    blob[start + 10: start + 14] = b"\xff\xff\xff\xff"
    (tmp_path / "z.zip").write_bytes(blob)
    got = _read_all(tmp_path / "z.zip", ["t.png"])
    assert got["t.png"].reason == "corrupt_in_release"
    # zlib may reject the stream, or inflate it to other bytes: either way the member is refused and said why
    assert any(words in got["t.png"].detail for words in ("deflate stream", "Bad CRC-32", "its header says"))


def test_a_file_with_no_local_header_is_unreadable_with_both_reasons(tmp_path):
    (tmp_path / "z.zip").write_bytes(b"<html>404</html>")
    got = _read_all(tmp_path / "z.zip", ["a.png"])
    assert got["a.png"].reason == "corrupt_in_release" and got["central directory"] == "unreadable"
    assert "does not open as a zip" in got["a.png"].detail and "no member to salvage" in got["a.png"].detail
