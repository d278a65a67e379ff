"""All pairs of 64-bit perceptual hashes within a Hamming distance, without comparing all pairs.

Method: multi-index hashing with the generalised pigeonhole principle. The bits are split into
chunks and chunk ``i`` gets a radius ``r_i`` with ``sum(r_i + 1) > threshold``: if two hashes
differed by more than ``r_i`` bits in every chunk they would differ by more than ``threshold`` bits
in all, so every pair within the threshold is within ``r_i`` of each other in some chunk ``i``.
Each chunk is searched for pairs of buckets (hashes with equal chunk values) whose values differ
in at most ``r_i`` bits, and every such candidate is verified on the full hash.

The textbook form (``threshold + 1`` chunks, radius 0) is hopeless at threshold 10: 11 chunks of
~6 bits make buckets of n/64 hashes, about n**2/6 candidates. Fewer, wider chunks with a radius
(e.g. 22/22/20 bits with radii 3/3/2) cut the candidates ~200-fold; the price is one probe per
XOR mask of up to ``r_i`` bits (1793 masks for 22 bits, radius 3), which stays cheap because a
probe works on a bitmap of the occupied chunk values (2**22 bits = 64K words), not on the hashes.
The chunk layout is picked by a small cost model (``_plan``) that also falls back to exact
brute force when that is cheaper: tiny inputs, or thresholds so large that no chunking pays off.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb, inf
from typing import Iterator, Sequence

import numpy as np

# Pairs materialised at a time (candidates, brute-force blocks, output pieces): bounds the
# temporaries to a few hundred MB whatever the data, e.g. a bucket holding most hashes.
_BATCH = 1 << 22
_MAX_RADIUS = 4
_LOW32 = np.uint64(0xFFFFFFFF)
# A probed chunk keeps a dense table of 2**width uint32 or uint64 (up to 128 MiB at 24 bits).
_MAX_PROBE_WIDTH = 24

# Cost model: seconds per operation, measured with numpy on one (busy) core; only ratios matter.
_COST_SORT = 3e-7  # per hash per chunk: argsort, tables, bitmaps
_COST_MASK = 1.5e-4  # per probe mask: Python and numpy call overhead
_COST_WORD = 1.2e-8  # per bitmap word visited per probe mask (half the bitmap)
_COST_CAND = 6e-8  # per candidate pair, dominated by two random lookups in a big table
_COST_BRUTE = 6e-9  # per pair, brute force

if hasattr(np, "bitwise_count"):  # numpy >= 2.0
    _popcount = np.bitwise_count
else:  # pragma: no cover - old numpy
    _BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.uint64)
        return _BYTE_POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


# _SWAP[j]: bits of a word whose position has bit j clear; a "delta swap" with it XORs positions.
_SWAP = [np.uint64(sum(1 << p for p in range(64) if not p >> j & 1)) for j in range(6)]


def hamming_pairs(
    hashes: np.ndarray, threshold: int, *, chunks: Sequence[tuple[int, int]] | None = None
) -> np.ndarray:
    """All index pairs ``(i, j)``, ``i < j``, with ``popcount(hashes[i] ^ hashes[j]) <= threshold``.

    ``hashes`` is a 1-D array of uint64 (e.g. imagehash's 8x8 phash packed into 64 bits; shorter
    hashes work too). Returns an (m, 2) int64 array, sorted lexicographically, without duplicates:
    exactly what ``brute_force_pairs`` returns, for every threshold.

    Speed: identical hashes are collapsed to one first, so piles of exact copies (blank images)
    cost nothing beyond their output. The rest costs far less than all pairs but grows steeply
    with the threshold: for a million random 64-bit hashes about 8 s at threshold 8 and 35 s at
    threshold 10 on one core, ~300 MB. Larger thresholds stay exact: as the pigeonhole filters
    lose their bite (around 16-20 for 64-bit hashes) the cost model switches to the blocked
    brute force, O(n**2). Hashes clustered more tightly than random ones make more candidates
    (slower, never wrong). The output itself can be quadratic: k copies of one hash give
    k(k-1)/2 pairs.

    ``chunks`` forces the layout instead of the cost model's choice (for tests and tuning): a
    ``(width, radius)`` per chunk, low bits first, widths summing to 64, ``sum(radius + 1) >
    threshold``, and width at most 24 where radius > 0.
    """
    h = _as_hashes(hashes)
    t = _as_threshold(threshold)
    n = len(h)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    distinct = np.sort(h)
    edge = np.empty(n, dtype=bool)
    edge[0] = True
    np.not_equal(distinct[1:], distinct[:-1], out=edge[1:])
    distinct = distinct[edge]
    del edge
    pairs = _distinct_pairs(distinct, t, chunks)
    # Which distinct hash each row has, looked up only now: not held through the search, the peak.
    inverse = np.searchsorted(distinct, h)
    return _expand_groups(pairs, inverse, np.bincount(inverse, minlength=len(distinct)))


def brute_force_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """The O(n**2) reference for ``hamming_pairs`` (same contract), compared a block of rows at a time."""
    h = _as_hashes(hashes)
    t = _as_threshold(threshold)
    n = len(h)
    parts = [np.zeros((0, 2), dtype=np.int64)]
    rows = max(1, _BATCH // max(n, 1))
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        near = _popcount(h[i0:i1, None] ^ h[None, i0:]) <= t
        near &= np.arange(n - i0)[None, :] > np.arange(i1 - i0)[:, None]  # only j > i
        i, j = np.nonzero(near)  # row-major, so already in lexicographic order
        parts.append(np.stack([i + i0, j + i0], axis=1).astype(np.int64))
    return np.concatenate(parts)


def _as_hashes(hashes: np.ndarray) -> np.ndarray:
    h = hashes if isinstance(hashes, np.ndarray) else np.asarray(hashes, dtype=np.uint64)
    if h.ndim != 1:
        raise ValueError(f"hashes must be a 1-D array, got shape {h.shape}")
    if h.size and h.dtype != np.uint64:
        if h.dtype.kind not in "ui" or (h.dtype.kind == "i" and h.min() < 0):
            raise ValueError(f"hashes must be unsigned 64-bit integers, got {h.dtype}")
    return h.astype(np.uint64, copy=False)


def _as_threshold(threshold: int) -> int:
    t = int(threshold)
    if t != threshold or t < 0:
        raise ValueError(f"threshold must be a non-negative integer, got {threshold!r}")
    return t


def _distinct_pairs(u: np.ndarray, t: int, chunks: Sequence[tuple[int, int]] | None) -> np.ndarray:
    """Pairs of indices into the sorted distinct hashes ``u`` within distance ``t``."""
    if chunks is not None:
        widths = [w for w, _ in chunks]
        if sum(widths) != 64 or sum(r + 1 for _, r in chunks) <= t or \
                any(w < 1 or r < 0 or (r and w > _MAX_PROBE_WIDTH) for w, r in chunks):
            raise ValueError(f"chunks {chunks!r} do not cover 64 bits and threshold {t}")
        plan = tuple((sum(widths[:i]), w, r) for i, (w, r) in enumerate(chunks))
    if t == 0 or len(u) < 2:  # distinct hashes are never at distance 0
        return np.zeros((0, 2), dtype=np.int64)
    if chunks is None:
        nbits = int(np.bitwise_or.reduce(u)).bit_length()  # bits above are 0 everywhere: skip them
        plan = _plan(_round(len(u)), t, nbits)
    if plan is None:
        return brute_force_pairs(u, t)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for shift, width, radius in plan:
        found += _search_chunk(u, t, shift, width, radius)
    pairs = np.concatenate(found)
    # A pair close in several chunks is found once per chunk.
    key = np.unique(np.minimum(pairs[:, 0], pairs[:, 1]) * len(u) + np.maximum(pairs[:, 0], pairs[:, 1]))
    return np.stack(np.divmod(key, len(u)), axis=1)


def _search_chunk(u: np.ndarray, t: int, shift: int, width: int, radius: int) -> list[np.ndarray]:
    """Verified pairs (indices into ``u``) among those whose chunk values differ in <= ``radius`` bits."""
    # Temporaries of n elements are freed or updated in place as soon as they can be: at a billion hashes
    # each one is 8 GB, and this is the dedup decision's peak memory.
    low = np.uint64((1 << width) - 1)
    chunk = (u >> np.uint64(shift)).view(np.int64)  # the same bits as astype, without a second copy
    chunk &= np.int64(low)
    order = np.argsort(chunk, kind="stable")
    del chunk
    hs = u[order]
    sorted_chunk = hs >> np.uint64(shift)
    sorted_chunk &= low
    edge = np.empty(len(hs), dtype=bool)
    edge[0] = True
    np.not_equal(sorted_chunk[1:], sorted_chunk[:-1], out=edge[1:])
    first = np.flatnonzero(edge)  # buckets, sorted
    del edge
    size = np.diff(np.r_[first, len(u)])
    values = sorted_chunk[first].view(np.int64)  # below 2**width: the same numbers
    del sorted_chunk
    found: list[np.ndarray] = []

    def verify(left: np.ndarray, right: np.ndarray) -> None:
        """Keep candidates (positions in sorted order; see ``_expand``) within ``t`` on the full hash."""
        for a, b in _expand(left, right):
            ok = _popcount(hs[a] ^ hs[b]) <= t
            found.append(np.stack([order[a[ok]], order[b[ok]]], axis=1))

    # Radius 0: pairs inside a bucket; each position pairs with the rest of its bucket.
    partners = _later_in_group(first, size)
    rows = np.flatnonzero(partners)
    verify(rows, np.stack([rows + 1, partners[rows]], axis=1))
    del partners, rows
    if radius == 0:
        return found

    # Probing works on bitmaps of chunk values (value v is bit v & 63 of word v >> 6): one pass per
    # XOR mask finds every pair of occupied values {v, v ^ mask}. Candidates are then filtered on
    # a 32-bit fold (XOR of the halves) of their other bits, which never raises a popcount, so
    # the filter drops no true pair; the fold sits in a dense value -> fold table (a 2-hash bucket
    # keeps both folds in one 64-bit entry), so a candidate costs two lookups and only the few
    # survivors are verified exactly. Buckets of 3+ hashes (rare unless hashes cluster) skip it.
    nwords = 1 << max(0, width - 6)
    others = ~np.uint64(((1 << width) - 1) << shift)

    def fold(positions: np.ndarray) -> np.ndarray:
        rest = hs[positions]
        rest &= others
        rest ^= rest >> np.uint64(32)
        rest &= _LOW32
        return rest

    small = np.flatnonzero(size <= 2)
    two = bool((size == 2).any())
    table = np.empty(1 << width, dtype=np.uint64 if two else np.uint32)  # only occupied values are read
    for lo in range(0, len(small), _BATCH):  # a block of buckets at a time: the temporaries stay bounded
        block = small[lo:lo + _BATCH]
        entry = fold(first[block])
        if two:  # a singleton repeats its fold in the high half: that only re-tests the same pair
            second = fold(np.minimum(first[block] + 1, len(hs) - 1))
            pair = size[block] == 2
            second[~pair] = entry[~pair]
            second <<= np.uint64(32)
            entry |= second
            del second, pair
        table[values[block]] = entry
        del entry, block
    small_words, any_words = _bitmap(values[small], nwords), _bitmap(values, nwords)
    counts = _popcount(any_words).astype(np.int64)
    before = np.cumsum(counts) - counts  # occupied values in earlier words: bucket numbers by rank
    big_words = _bitmap(values[size > 2], nwords)
    big = len(small) < len(size)
    all_words = np.arange(nwords)
    sides: dict[int, tuple] = {}  # per top mask bit: the probing side's word indices and words

    for r in range(1, min(radius, t) + 1):  # chunks alone more than t apart: no pair
        limit = t - r  # the other bits may differ in at most this many
        for bits in combinations(range(width), r):
            mask = sum(1 << b for b in bits)
            top = bits[-1]
            # Each unordered bucket pair {v, v ^ mask} once: from the side whose top mask bit is clear.
            if top not in sides:
                index = all_words[(all_words >> (top - 6)) & 1 == 0] if top >= 6 else all_words
                keep = _SWAP[top] if top < 6 else ~np.uint64(0)
                sides[top] = index, *(words[index] & keep for words in (small_words, any_words, big_words))
            index, here_small, here_any, here_big = sides[top]
            v = _set_bits(index, here_small & _xor_words(small_words, index, mask))
            a, b = table[v], table[v ^ mask]
            x = a ^ b
            if two:
                y = a ^ ((b >> np.uint64(32)) | (b << np.uint64(32)))
                ok = ((_popcount(x & _LOW32) <= limit) | (_popcount(x >> np.uint64(32)) <= limit)
                      | (_popcount(y & _LOW32) <= limit) | (_popcount(y >> np.uint64(32)) <= limit))
            else:
                ok = _popcount(x) <= limit
            v = v[ok]
            if big:
                hit = (here_big & _xor_words(any_words, index, mask)) | \
                      (here_any & _xor_words(big_words, index, mask))
                v = np.concatenate([v, _set_bits(index, hit)])
            a, b = _rank(any_words, before, v), _rank(any_words, before, v ^ mask)
            verify(_ranges(first[a], size[a]),
                   np.stack([np.repeat(first[b], size[a]), np.repeat(size[b], size[a])], axis=1))
    return found


def _later_in_group(start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """For each position of consecutive groups (``start``, ``size``): how many later positions its group has,
    computed in place (one array of ``sum(size)``, no temporaries of that length)."""
    later = np.repeat(start + size - 1, size)
    later -= np.arange(len(later))
    return later


def _rank(words: np.ndarray, before: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Number of set bits below each value ``v`` in the bitmap ``words``."""
    below = (np.uint64(1) << (v & 63).astype(np.uint64)) - np.uint64(1)
    return before[v >> 6] + _popcount(words[v >> 6] & below)


def _bitmap(values: np.ndarray, nwords: int) -> np.ndarray:
    """Words with bit ``v & 63`` of word ``v >> 6`` set for each of the sorted distinct ``values``."""
    words = np.zeros(nwords, dtype=np.uint64)
    word = values >> 6
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    if len(values):
        words[word[starts]] = np.bitwise_or.reduceat(np.uint64(1) << (values & 63).astype(np.uint64), starts)
    return words


def _xor_words(words: np.ndarray, index: np.ndarray, mask: int) -> np.ndarray:
    """Words ``index`` of the bitmap of ``{v ^ mask}``, for the bitmap ``words`` of ``{v}``."""
    out = words[index ^ (mask >> 6)]
    for j in range(6):
        if mask >> j & 1:  # a "delta swap" exchanges the bit positions that differ in bit j
            s = np.uint64(1 << j)
            out = ((out >> s) & _SWAP[j]) | ((out & _SWAP[j]) << s)
    return out


def _set_bits(index: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Positions ``64 * index[k] + bit`` of the set bits of ``words[k]``, lowest bit first per word."""
    nz = np.flatnonzero(words)
    w, base = words[nz], index[nz] << 6
    out = []
    while len(w):
        low = w & (~w + np.uint64(1))
        out.append(base + _popcount(low - np.uint64(1)))
        w ^= low
        keep = np.flatnonzero(w)
        w, base = w[keep], base[keep]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each ``s, c``."""
    total = int(count.sum())
    if total == len(count):  # all ones: the common case, skip the arithmetic
        return start.astype(np.int64, copy=False)
    ends = np.cumsum(count)
    return np.arange(total) + np.repeat(start - ends + count, count)


def _expand(left: np.ndarray, right: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs ``(left[k], s)`` for ``s`` in ``range(right[k, 0], right[k, 0] + right[k, 1])``, in batches.

    Batches hold about ``_BATCH`` pairs (at least one row), so one huge bucket cannot exhaust memory.
    """
    if not len(left):
        return
    start, count = right[:, 0], right[:, 1]
    if int(count.max()) == 1 and len(left) <= _BATCH:
        yield left, start
        return
    ends = np.cumsum(count)
    lo = 0
    while lo < len(left):
        done = int(ends[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, done + _BATCH, side="right")))
        c = count[lo:hi]
        yield np.repeat(left[lo:hi], c), _ranges(start[lo:hi], c)
        lo = hi


def _expand_groups(pairs: np.ndarray, inverse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pairs of original indices from pairs of distinct hashes plus the copies inside each group."""
    n = len(inverse)
    members = np.argsort(inverse, kind="stable")  # grouped by distinct hash, ascending in a group
    gstart = np.cumsum(counts) - counts
    # Copies of one hash: each member pairs with the later members of its group.
    later = _later_in_group(gstart, counts)
    rows = np.flatnonzero(later)
    copies = np.stack([rows + 1, later[rows]], axis=1)
    del later
    keys = [np.zeros(0, dtype=np.int64)]
    for a, b in _expand(rows, copies):
        keys.append(members[a] * n + members[b])
    # Distinct hashes a, b: every member of a with every member of b.
    a, b = pairs[:, 0], pairs[:, 1]
    left = _ranges(gstart[a], counts[a])
    right = np.stack([np.repeat(gstart[b], counts[a]), np.repeat(counts[b], counts[a])], axis=1)
    for x, y in _expand(left, right):
        i, j = members[x], members[y]
        keys.append(np.minimum(i, j) * n + np.maximum(i, j))
    key = np.sort(np.concatenate(keys))
    return np.stack(np.divmod(key, n), axis=1)


def _round(n: int) -> int:
    """``n`` to two significant bits, so that plans are cached across similar sizes."""
    shift = max(0, n.bit_length() - 2)
    return (n >> shift) << shift


def _ball(width: int, radius: int) -> int:
    return sum(comb(width, k) for k in range(radius + 1))


@lru_cache(maxsize=256)
def _plan(n: int, t: int, nbits: int) -> tuple[tuple[int, int, int], ...] | None:
    """Chunks ``(shift, width, radius)`` of least modelled cost, or None when brute force is cheaper.

    Dynamic programming over (bits left, errors left to cover), assuming random hashes: a chunk of
    ``w`` bits and radius ``r`` yields about ``pairs * ball(w, r) / 2**w`` candidates.
    """
    pairs = n * (n - 1) / 2

    @lru_cache(maxsize=None)
    def chunk_cost(w: int, r: int) -> float:
        if r and w > _MAX_PROBE_WIDTH:
            return inf
        masks = _ball(w, r) - 1
        return (_COST_SORT * n + masks * (_COST_MASK + _COST_WORD * 2 ** max(0, w - 7))
                + _COST_CAND * pairs * _ball(w, r) / 2**w)

    @lru_cache(maxsize=None)
    def best(bits: int, need: int) -> tuple[float, tuple[tuple[int, int], ...]]:
        if bits == 0:
            return (0.0, ()) if need <= 0 else (inf, ())
        options = [(inf, ())]
        for w in range(1, bits + 1):
            for r in range(min(_MAX_RADIUS, max(need - 1, 0)) + 1):
                cost, rest = best(bits - w, max(0, need - r - 1))
                options.append((cost + chunk_cost(w, r), ((w, r),) + rest))
        return min(options)

    cost, chunks = best(nbits, t + 1)
    if cost >= _COST_BRUTE * pairs:
        return None
    plan, shift = [], 0
    for w, r in chunks:
        plan.append((shift, w, r))
        shift += w
    return tuple(plan)
