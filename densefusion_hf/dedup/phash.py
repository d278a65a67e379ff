"""Fast perceptual hashes of encoded images, bit-compatible with imagehash 4.3.

Why not just call imagehash: for a typical 1024-px JPEG nearly all of imagehash's time goes into
decoding every pixel in full colour, only to shrink the picture to 32x32 grey. Here JPEGs are
decoded in draft mode (libjpeg's DCT scaling, straight to the luma channel, at 1/2..1/8 of the
size), the 32x32 DCT is one pair of small matrix products with a cached DCT-II matrix instead of
two ``scipy.fftpack`` calls, and many images are hashed across processes.

Compatibility: hashes are plain ``int``s whose bits are imagehash's, i.e.
``phash_bytes(data) == int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16)``. That is
exact for every non-JPEG input (same pixels, same filter, same bits). For JPEGs the draft decode
feeds slightly different pixels to the final resize, which moves a coefficient across the median
now and then: well under 1 bit in 64 on average (about 0.4 on 1024-px photos; see
``benchmarks/phash_throughput.py``), so near-duplicate pairs at a threshold of ~10 bits barely
change.

EXIF orientation is *not* applied, exactly as imagehash on ``Image.open(...)`` does not: the hash
is of the pixels as stored. That keeps our hashes comparable with imagehash's and costs nothing;
the price is that a copy that differs only in its orientation tag hashes like a rotated image
(i.e. not as a duplicate), which is the same for every image in a dataset.
"""

from __future__ import annotations

import io
import os
import warnings
from functools import lru_cache, partial
from typing import Sequence

import numpy as np
from PIL import Image

from densefusion_hf.images import UnreadableImage

ALGORITHMS = ("phash", "dhash", "ahash", "whash")

# imagehash's phash shrinks to hash_size * HIGHFREQ_FACTOR pixels a side before its DCT.
HIGHFREQ_FACTOR = 4

# JPEG draft target, as a multiple of the side of the image imagehash resizes to (so 64 px for an
# 8x8 phash, whose DCT input is 32x32). libjpeg then picks the largest 1/2, 1/4 or 1/8 scale that
# keeps *both* decoded sides >= 64, i.e. at least 2 decoded pixels per output pixel for the final
# Lanczos. Measured (mean bits off imagehash, 120 JPEGs per size, 1 process; see the report of the
# change): factor 1 / 2 / 4 gave 0.78 / 0.35 / 0.10 bits at 200 px, 0.63 / 0.58 / 0.32 at 512 px,
# 0.37 / 0.38 / 0.30 at 1024 px and ~0.3 for all at 1600-2400 px. For photos of 1024 px or more
# with a short side >= 512, factors 1 and 2 both decode at 1/8 and run at the same speed, while
# factor 4 decodes at 1/4 (4x the pixels) and was ~1.35x slower on the 1024-px benchmark set for
# ~0.1 bit better agreement. Factor 2 keeps small images accurate at no cost for large ones.
DRAFT_FACTOR = 2
# Below this gap (relative to the largest coefficient) between a DCT coefficient and the median,
# rounding could decide the bit differently from scipy's FFT; such images are redone with scipy.
_TIE_EPS = 1e-9


def _check(hash_size: int, algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if hash_size < 2:
        raise ValueError("hash_size must be at least 2")
    if algorithm == "whash" and hash_size & (hash_size - 1):
        raise ValueError("whash needs a power-of-2 hash_size")


@lru_cache(maxsize=16)
def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of scipy.fftpack's unnormalised DCT-II matrix of size ``n``.

    ``scipy.fftpack.dct(x, axis=0)`` is ``C @ x`` with ``C[u, i] = 2 cos(pi u (2i + 1) / 2n)``;
    only the low ``k`` frequencies are kept, so only ``k`` rows are needed.
    """
    u = np.arange(k, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    rows = 2.0 * np.cos(np.pi * u * (2.0 * i + 1.0) / (2.0 * n))
    rows.setflags(write=False)
    return rows


def _bits_to_int(bits: np.ndarray) -> int:
    """Pack a boolean array, row-major, first element most significant: imagehash's hex order."""
    flat = np.ascontiguousarray(bits, dtype=bool).ravel()
    packed = np.packbits(flat)
    return int.from_bytes(packed.tobytes(), "big") >> (8 * len(packed) - flat.size)


def _open(data: bytes, target: tuple[int, int] | None) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """Open ``data``; for JPEGs, ask for a draft decode (luma only, scaled down to >= ``target``).

    Returns the image and the region of the decoded image that the full-size image maps to
    (libjpeg rounds the scaled size up, so the last decoded row/column is only partly covered);
    passing that box to ``resize`` keeps the geometry imagehash sees.
    """
    image = Image.open(io.BytesIO(data))
    box = None
    if target is not None and image.format == "JPEG":
        drafted = image.draft("L", target)
        if drafted is not None:
            box = drafted[1]
    return image, box


def _phash_image(pixels: np.ndarray, hash_size: int) -> int:
    """imagehash's phash bits from the ``img_size`` x ``img_size`` grey pixels, via matrix DCT."""
    x = pixels.astype(np.float64)
    c = _dct_rows(x.shape[0], hash_size)
    low = c @ x @ c.T  # == dct(dct(x, axis=0), axis=1)[:hash_size, :hash_size]
    med = np.median(low)
    gap = np.abs(low - med).min()
    if gap <= _TIE_EPS * max(1.0, float(np.abs(low).max())):
        # Near-tie (e.g. a flat image, where all AC terms are rounding noise): whichever side of
        # the median the noise falls decides the bit, so reproduce scipy's arithmetic exactly.
        import scipy.fftpack

        low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:hash_size, :hash_size]
        med = np.median(low)
    return _bits_to_int(low > med)


def phash_bytes(data: bytes, hash_size: int = 8, algorithm: str = "phash", draft: bool = True) -> int:
    """Perceptual hash of an encoded image as an int of ``hash_size**2`` bits (imagehash's bits).

    ``algorithm`` is "phash" (default), "dhash", "ahash" (imagehash's ``average_hash``) or
    "whash" (imagehash's ``whash``, computed by imagehash itself on the full decode, since its
    wavelet scale depends on the image size). Raises ``UnreadableImage`` for bytes Pillow cannot
    decode and ``ValueError`` for a bad ``hash_size``/``algorithm``.  ``draft=False`` decodes JPEGs
    in full: slower, and then the bits are imagehash's exactly.
    """
    _check(hash_size, algorithm)
    try:
        with warnings.catch_warnings():
            # Per-image warnings (large but allowed images, palette transparency) would flood a
            # batch's stderr; whatever cannot be decoded still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            return _hash(data, hash_size, algorithm, draft)
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for bad data; all mean "unreadable"
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def _hash(data: bytes, hash_size: int, algorithm: str, draft: bool = True) -> int:
    if algorithm == "whash":
        import imagehash

        with Image.open(io.BytesIO(data)) as image:
            return int(str(imagehash.whash(image, hash_size)), 16)

    if algorithm == "phash":
        size = (hash_size * HIGHFREQ_FACTOR, hash_size * HIGHFREQ_FACTOR)
    elif algorithm == "dhash":
        size = (hash_size + 1, hash_size)
    else:  # ahash
        size = (hash_size, hash_size)
    pixels = _small_grey(data, size, (size[0] * DRAFT_FACTOR, size[1] * DRAFT_FACTOR) if draft else None)
    if algorithm == "phash":
        return _phash_image(pixels, hash_size)
    if algorithm == "dhash":
        return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])
    return _bits_to_int(pixels > pixels.mean())


def _small_grey(data: bytes, size: tuple[int, int], target: tuple[int, int] | None) -> np.ndarray:
    """The image as grey pixels of ``size``, resized as imagehash does (from a draft decode if ``target``)."""
    image, box = _open(data, target)
    with image:
        grey = image.convert("L")  # a no-op copy after a luma draft; imagehash's conversion otherwise
    return np.asarray(grey.resize(size, Image.Resampling.LANCZOS, box=box))


def _hash_or_none(data: bytes, hash_size: int, algorithm: str, draft: bool = True) -> int | None:
    try:
        return phash_bytes(data, hash_size, algorithm, draft)
    except UnreadableImage:
        return None
    except Exception:  # anything else Pillow or numpy throws on hostile input: still one bad image
        return None


# The batch a forked worker inherits from its parent (see ``phash_many``); empty in the parent.
_INHERITED: list[bytes] = []


def _inherit(blobs: list[bytes]) -> None:
    global _INHERITED
    _INHERITED = blobs


def _hash_span(span: tuple[int, int], hash_size: int, algorithm: str, draft: bool) -> list[int | None]:
    return [_hash_or_none(b, hash_size, algorithm, draft) for b in _INHERITED[span[0]:span[1]]]


def phash_many(
    blobs: Sequence[bytes],
    hash_size: int = 8,
    algorithm: str = "phash",
    processes: int | None = None,
    draft: bool = True,
) -> list[int | None]:
    """Hash many encoded images, in order; ``None`` for any that cannot be decoded (never raises).

    Decoding is CPU-bound, so the work is spread over a ``multiprocessing`` pool of ``processes``
    workers (``None``: ``os.cpu_count()``; 1: inline, no pool), in chunks of images so per-task
    overhead stays small. With the "fork" start method (Linux's default before Python 3.14) the
    workers inherit the bytes through fork and only receive index ranges: piping ~100 kB per
    image to the workers would otherwise cost ~10% of the hashing time. Other start methods get
    the bytes in chunks. Argument errors (bad ``algorithm``/``hash_size``) do raise, up front.
    """
    _check(hash_size, algorithm)
    blobs = list(blobs)
    if processes is None:
        processes = os.cpu_count() or 1
    processes = max(1, min(int(processes), len(blobs)))
    if processes == 1:
        return [_hash_or_none(b, hash_size, algorithm, draft) for b in blobs]

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # ~4 chunks per worker balances the load; capping the size keeps a chunk's bytes moderate.
    # ProcessPoolExecutor rather than Pool: a worker killed by a decoder crash raises BrokenProcessPool
    # instead of hanging the build forever.
    chunksize = max(1, min(32, len(blobs) // (processes * 4)))
    context = multiprocessing.get_context()
    if context.get_start_method() == "fork":
        spans = [(i, min(i + chunksize, len(blobs))) for i in range(0, len(blobs), chunksize)]
        work = partial(_hash_span, hash_size=hash_size, algorithm=algorithm, draft=draft)
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_inherit, initargs=(blobs,)) as pool:
            return [h for part in pool.map(work, spans) for h in part]
    one = partial(_hash_or_none, hash_size=hash_size, algorithm=algorithm, draft=draft)
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        return list(pool.map(one, blobs, chunksize=chunksize))


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes (imagehash's ``h1 - h2``)."""
    return (a ^ b).bit_count()


# Draft hashes differ from imagehash's by a few bits at most (0.43 on average on the benchmark set; bits
# flip in pairs across the median, so by 2, rarely 4).  Pairs whose draft distance lies within this slack
# of the threshold are decided on exact hashes instead.  2 gave the very pairs imagehash gives on
# benchmarks/phash_throughput.py's set with known duplicates; it is measured there, not a proof.
REFINE_SLACK = 2


def refined_pairs(hashes: np.ndarray, threshold: int, exact_hashes, slack: int = REFINE_SLACK) -> np.ndarray:
    """Near-duplicate pairs (distance <= threshold) as imagehash's own hashes would give them.

    ``hashes`` are draft hashes (uint64); ``exact_hashes(rows)`` returns the full-decode hashes of the
    given row indices.  Pairs far below or above the threshold are decided by the draft hashes; only
    rows in a pair within ``slack`` of it are hashed again, usually a small fraction.
    """
    from densefusion_hf.dedup.hamming import _popcount, hamming_pairs

    hashes = np.asarray(hashes, dtype=np.uint64)
    candidates = hamming_pairs(hashes, threshold + slack)
    if len(candidates) == 0:
        return candidates
    distance = _popcount(hashes[candidates[:, 0]] ^ hashes[candidates[:, 1]])
    sure = candidates[distance <= threshold - slack]
    border = candidates[distance > threshold - slack]
    if len(border) == 0:
        return sure
    rows = np.unique(border)
    exact = dict(zip(rows.tolist(), exact_hashes(rows)))
    keep = [(i, j) for i, j in border.tolist()
            if exact[i] is not None and exact[j] is not None and (exact[i] ^ exact[j]).bit_count() <= threshold]
    found = np.concatenate([sure, np.array(keep, dtype=np.int64).reshape(-1, 2)])
    return found[np.lexsort((found[:, 1], found[:, 0]))]
