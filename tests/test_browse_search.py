"""`df-hf browse`'s search as plain HTTP against a running server: queries that are not searched as typed
say so on the page."""

from __future__ import annotations

import html
import re

import pyarrow.parquet as pq
import pytest

from tests.test_browse import start_browse

ROWS = 300


#: Rows whose captions hold FTS5's operator words as plain words.
CAPTIONS = {5: "A cat and a dog.", 6: "A cat or a dog, not a bird.", 7: "A dog and a bird, not a cat."}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A dataset folder of synthetic rows, a few of them with the operator words in their captions."""
    import pyarrow as pa

    from densefusion_hf.testing import synthetic as rows

    images = rows._images()
    table = [dict(rows.synthetic_row(i, images), **({"caption": CAPTIONS[i]} if i in CAPTIONS else {}))
             for i in range(ROWS)]
    folder = tmp_path_factory.mktemp("search") / "dataset"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(table, schema=rows.schema()), folder / "train.parquet", row_group_size=100)
    return folder


@pytest.fixture(scope="module")
def served(synthetic, tmp_path_factory):
    server = start_browse(str(synthetic), "--cache-dir", str(tmp_path_factory.mktemp("search-cache")))
    yield server
    code, output = server.stop()
    assert code == 0, output


def texts(folder) -> dict[str, list[str]]:
    """key -> the texts the search reads (caption, alt text, OCR lines)."""
    found = {}
    for path in sorted(folder.rglob("*.parquet")):
        for row in pq.read_table(path, columns=["key", "caption", "text", "priors"]).to_pylist():
            found[row["key"]] = [row["caption"], row["priors"]["alt_text"] or row["text"]] + \
                [line["text"] for line in row["priors"]["ocr"]]
    return found


def holding(folder, word: str) -> list[str]:
    pattern = re.compile(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", re.IGNORECASE)
    return [key for key, found in texts(folder).items() if any(pattern.search(t or "") for t in found)]


def gallery(served, query: str) -> tuple[int, list[str], str | None]:
    """(rows matching, the keys on the page, the page's note on the query)."""
    status, _, body = served.get(f"/rows?per_page=500&{query}")
    page = body.decode()
    assert status == 200
    total = int(re.search(r'id="match-count" data-total="(\d+)"', page).group(1))
    keys = re.findall(r'<li class="card" data-key="([0-9a-f]+)"', page)
    note = re.search(r'<div class="notice" id="query-note">(.*?)</div>', page, re.S)
    return total, keys, html.unescape(note.group(1)) if note else None


@pytest.mark.parametrize("query, rows", [("AND", [5, 7]), ("or", [6]), ("AND NOT", [7]), ("NEAR", [])])
def test_a_query_of_operator_words_only_searches_them_as_words(served, synthetic, query, rows):
    total, keys, note = gallery(served, f"q={query.replace(' ', '+')}")
    assert sorted(set.intersection(*(set(holding(synthetic, w)) for w in query.split()))) == \
        [f"{i:024x}" for i in rows]
    assert total == len(rows) and keys == [f"{i:024x}" for i in rows]
    assert note and ("as a word" in note or "as words" in note), note
    assert all(f"“{word}”" in note for word in query.split())
    # between other words they are no operators either: every word must match
    assert gallery(served, "q=cat+AND+bird")[:2] == (2, [f"{i:024x}" for i in (6, 7)])


def test_a_common_word_is_searched_as_it_is(served, synthetic):
    expected = holding(synthetic, "the")
    assert 0 < len(expected) < ROWS
    total, keys, note = gallery(served, "q=the")
    assert total == len(expected) and keys == expected and note is None
    # a word every row holds matches every row, and the page says why
    total, keys, note = gallery(served, "q=photo")
    assert total == ROWS and note == f"Every row holds “photo”: the search matches all {ROWS:,} rows."


def test_a_query_without_words_is_no_search_and_says_so(served):
    total, keys, note = gallery(served, "q=%3F%21+%2A")
    assert total == ROWS and len(keys) == ROWS
    assert note == "“?! *” holds no word to search for, so no search is applied."
