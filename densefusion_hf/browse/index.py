"""The index behind filters and search: one SQLite file per dataset version, built once and cached.

    rows(id, key, category, words, has_ocr, width, height, short_side, long_side)   one per row, id = its
                                                                                   global index in file order
    boxes(row, label, expert)                                                     one per box of the priors
    fts(caption, alt_text, ocr)                                                   FTS5, contentless, rowid = id
    dropped(stage, reason, key, url, detail, dup_of, shard)                       a work directory's drops
    fetched(key, shard)                                                           where fetch kept each image
    meta(name, value)                                                             facet counts, the build's state

SQLite's FTS5 ships with Python, so the index needs nothing installed; the full-text table keeps no copy of
the text (``content=''``), only what matching needs, and the matches are highlighted in the rows a page
reads anyway.  The file is written under a temporary name and renamed when complete: a server stopped while
indexing leaves no half index, and the next start builds it again.  Its name carries the data's fingerprint
(file names, sizes and times, or the Hub commit) and, for a work directory, its done markers
(``source.build_state``), so a rebuilt dataset, or a build that moved on, gets a new index.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import sqlite3
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from densefusion_hf.browse.source import Source
from densefusion_hf.errors import UserError

INDEX_VERSION = 1
SEARCH_FIELDS = {"all": None, "caption": "caption", "alt": "alt_text", "ocr": "ocr"}
_REMEMBERED_FILTERS = 8

_SCHEMA = """
CREATE TABLE rows(id INTEGER PRIMARY KEY, key TEXT, category TEXT, words INTEGER, has_ocr INTEGER,
                  width INTEGER, height INTEGER, short_side INTEGER, long_side INTEGER);
CREATE TABLE boxes(row INTEGER, label TEXT, expert TEXT);
CREATE VIRTUAL TABLE fts USING fts5(caption, alt_text, ocr, content='', tokenize='unicode61 remove_diacritics 2');
CREATE TABLE dropped(id INTEGER PRIMARY KEY, stage TEXT, reason TEXT, key TEXT, url TEXT, detail TEXT,
                     dup_of TEXT, shard TEXT);
CREATE TABLE fetched(key TEXT PRIMARY KEY, shard TEXT) WITHOUT ROWID;
CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT);
"""
_INDEXES = """
CREATE INDEX rows_key ON rows(key);
CREATE INDEX rows_category ON rows(category, id);
CREATE INDEX rows_words ON rows(words, id);
CREATE INDEX boxes_label ON boxes(label, row);
CREATE INDEX boxes_expert ON boxes(expert, row);
CREATE INDEX dropped_reason ON dropped(stage, reason, id);
CREATE INDEX dropped_key ON dropped(key);
"""


# -- what a page asks for ----------------------------------------------------------------------------------

def _int(value) -> int | None:
    try:
        return int(str(value).strip()) if str(value).strip() else None
    except (TypeError, ValueError):
        return None


@dataclass
class Filters:
    """The filters and the query of a gallery page, as they travel in its URL."""

    q: str = ""
    fields: str = "all"          # all | caption | alt | ocr
    category: str = ""
    min_words: int | None = None
    max_words: int | None = None
    has_ocr: str = ""            # "" | yes | no
    label: str = ""
    expert: str = ""
    min_side: int | None = None  # short side at least
    max_side: int | None = None  # long side at most

    @classmethod
    def from_query(cls, query) -> "Filters":
        get = lambda name: (query.get(name) or "").strip()  # noqa: E731
        found = cls(q=get("q"), fields=get("in") or "all", category=get("category"),
                    min_words=_int(get("min_words")), max_words=_int(get("max_words")),
                    has_ocr=get("has_ocr") if get("has_ocr") in ("yes", "no") else "", label=get("label"),
                    expert=get("expert"), min_side=_int(get("min_side")), max_side=_int(get("max_side")))
        if found.fields not in SEARCH_FIELDS:
            found.fields = "all"
        return found

    def params(self) -> dict[str, str]:
        """The non-default values, named as in the URL."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            name = "in" if f.name == "fields" else f.name
            if value not in (None, "") and not (f.name == "fields" and value == "all"):
                out[name] = str(value)
        return out

    @property
    def active(self) -> bool:
        return bool(self.params())


_TERM = re.compile(r'"([^"]*)"|(\S+)')
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


#: FTS5's operators. Between words they are dropped (every word must match anyway); a query made only of
#: them searches them as the words they are, so ``AND`` alone finds the rows with "and", not every row.
OPERATORS = ("AND", "OR", "NOT", "NEAR")


def _terms(text: str) -> list[tuple[str, list[str], bool, bool]]:
    """(as typed, tokens, prefix, is an operator) of each term of a search box's text that holds a word."""
    terms = []
    for quoted, bare in _TERM.findall(text or ""):
        tokens = _TOKEN.findall(quoted or bare)
        if tokens:
            terms.append((quoted or bare, tokens, bool(bare) and bare.endswith("*"),
                          bool(bare) and bare.upper() in OPERATORS))
    return terms


def parse_query(text: str) -> list[tuple[list[str], bool]]:
    """A search box's text as FTS5 phrases: (tokens, prefix) each; every phrase must match (AND).
    ``"grand opening"`` is one phrase, ``coff*`` a prefix, other punctuation separates tokens
    (``2-for-1`` is the phrase "2 for 1", as the tokenizer reads the text)."""
    terms = _terms(text)
    words = [(tokens, prefix) for _, tokens, prefix, operator in terms if not operator]
    return words or [(tokens, False) for _, tokens, _, _ in terms]


def query_note(text: str) -> str | None:
    """What the page says when a query is not searched as its words read: None when it is."""
    if not (text or "").strip():
        return None
    terms = _terms(text)
    if not terms:
        return f"“{text.strip()}” holds no word to search for, so no search is applied."
    if all(operator for *_, operator in terms):
        words = ", ".join(f"“{typed}”" for typed, *_ in terms)
        return (f"Searched for {words} as {'a word' if len(terms) == 1 else 'words'}: the search box has no "
                f"operators (every word must match).")
    return None


def fts_expression(phrases: list[tuple[list[str], bool]], column: str | None) -> str:
    parts = ['"' + " ".join(tokens) + '"' + ("*" if prefix else "") for tokens, prefix in phrases]
    expression = " AND ".join(parts)
    return f"{{{column}}} : ({expression})" if column else expression


def highlight_pattern(phrases: list[tuple[list[str], bool]]) -> re.Pattern | None:
    """A regex finding what the FTS5 query matched in a text (case-insensitive, whole tokens)."""
    alternatives = []
    for tokens, prefix in phrases:
        body = r"[\W_]+".join(re.escape(t) for t in tokens)
        alternatives.append(r"(?<![^\W_])" + body + (r"[^\W_]*" if prefix else r"(?![^\W_])"))
    return re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None


# -- the index ----------------------------------------------------------------------------------------------

def _column(table: pa.Table, name: str, default=None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


def _list_field(array, list_name: str, item: str) -> tuple[list, list[int]]:
    """(the ``item`` field of every element of the list field ``list_name``, each element's row)."""
    if list_name not in [array.type.field(i).name for i in range(array.type.num_fields)]:
        return [], []
    lists = array.field(list_name)
    if not len(lists):
        return [], []
    parents = pc.list_parent_indices(lists).to_pylist()
    values = pc.list_flatten(lists)
    names = [values.type.field(i).name for i in range(values.type.num_fields)]
    if item not in names:
        return [], []
    return values.field(item).to_pylist(), parents


class Index:
    """The index of one Source: built in a thread at start, queried by every request once ready."""

    def __init__(self, source: Source):
        self.source = source
        self.path = Path(source.cache_dir) / f"index-v{INDEX_VERSION}-{source.index_fingerprint}.sqlite"
        self.ready = threading.Event()
        self.error: str | None = None
        self.done_rows = 0
        self.seconds: float | None = None
        self.meta: dict = {}
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._matches: OrderedDict = OrderedDict()
        self._pending: set = set()

    # building

    def start(self) -> "Index":
        if self.path.exists():
            self._loaded()
        else:
            self._thread = threading.Thread(target=self._build_safely, name="browse-index", daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def _build_safely(self) -> None:
        try:
            started = time.monotonic()
            self.build()
            self.seconds = round(time.monotonic() - started, 2)
            self._loaded()
        except Exception as exc:  # shown on the page; the unfiltered gallery still works without it
            self.error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            self.ready.set()

    def _loaded(self) -> None:
        with self._connect() as db:
            self.meta = {name: json.loads(value) for name, value in db.execute("SELECT name, value FROM meta")}
        self.done_rows = self.source.num_rows
        self.ready.set()

    def build(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        for leftover in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            leftover.unlink(missing_ok=True)
        db = sqlite3.connect(tmp)
        try:
            db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-200000;"
                             + _SCHEMA)
            self._index_rows(db)
            if self.source.workdir is not None:
                self._index_build(db)
            db.executescript(_INDEXES)
            self._facets(db)
            db.commit()
            db.execute("INSERT INTO fts(fts) VALUES('optimize')")
            db.commit()
        finally:
            db.close()
        os.replace(tmp, self.path)

    def _index_rows(self, db: sqlite3.Connection) -> None:
        wanted = {"key", "category", "caption", "caption_words", "priors", "text", "width", "height"}
        for data in self.source.files:
            columns = [c for c in data.columns if c in wanted]
            row = data.start
            for group in range(len(data.group_rows)):
                table = self.source._read(data.path, group, columns)
                self._insert(db, table, row)
                row += table.num_rows
                self.done_rows = row

    @staticmethod
    def _insert(db: sqlite3.Connection, table: pa.Table, first: int) -> None:
        n = table.num_rows
        ids = range(first, first + n)
        captions = [c or "" for c in _column(table, "caption", "")]
        texts = _column(table, "text", "")
        words = _column(table, "caption_words")
        words = [w if w is not None else len(c.split()) for w, c in zip(words, captions)]
        ocr_lines: list[list[str]] = [[] for _ in range(n)]
        boxes = []
        alts = [t or "" for t in texts]
        if "priors" in table.column_names:
            priors = table.column("priors").combine_chunks()
            names = [priors.type.field(i).name for i in range(priors.type.num_fields)]
            if "alt_text" in names:
                alts = [a if a else (t or "") for a, t in zip(priors.field("alt_text").to_pylist(), texts)]
            lines, parents = _list_field(priors, "ocr", "text")
            for text, parent in zip(lines, parents):
                if text:
                    ocr_lines[parent].append(text)
            labels, parents = _list_field(priors, "boxes", "label")
            experts, _ = _list_field(priors, "boxes", "expert")
            experts = experts or [None] * len(labels)
            boxes = [(first + p, label, expert) for label, expert, p in zip(labels, experts, parents)]
        keys = _column(table, "key")
        widths, heights = _column(table, "width"), _column(table, "height")
        categories = _column(table, "category")
        db.executemany("INSERT INTO rows VALUES (?,?,?,?,?,?,?,?,?)", [
            (i, key if key is not None else str(i), cat, w, int(bool(o)), wd, ht,
             min(wd, ht) if wd is not None and ht is not None else None,
             max(wd, ht) if wd is not None and ht is not None else None)
            for i, key, cat, w, o, wd, ht in zip(ids, keys, categories, words, ocr_lines, widths, heights)])
        db.executemany("INSERT INTO fts(rowid, caption, alt_text, ocr) VALUES (?,?,?,?)",
                       [(i, c, a, "\n".join(o)) for i, c, a, o in zip(ids, captions, alts, ocr_lines)])
        if boxes:
            db.executemany("INSERT INTO boxes VALUES (?,?,?)", boxes)

    def _index_build(self, db: sqlite3.Connection) -> None:
        """A work directory's dropped rows, by stage and reason, and where fetch kept each image."""
        from densefusion_hf.recipe import STAGE_ORDER

        workdir = self.source.workdir
        for stage in STAGE_ORDER:
            folder = workdir / stage
            if not folder.is_dir():
                continue
            for done in sorted(folder.glob("shard-*.done")):
                shard = done.name[len("shard-"):-len(".done")]
                dropped = folder / f"shard-{shard}.dropped.parquet"
                if dropped.exists():
                    table = pq.read_table(dropped)
                    db.executemany(
                        "INSERT INTO dropped(stage, reason, key, url, detail, dup_of, shard) VALUES (?,?,?,?,?,?,?)",
                        [(stage, r.get("reason"), r.get("key"), r.get("url"), r.get("detail"), r.get("dup_of"), shard)
                         for r in table.to_pylist()])
                if stage == "fetch":
                    path = folder / f"shard-{shard}.parquet"
                    if path.exists():
                        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
                        db.executemany("INSERT OR IGNORE INTO fetched VALUES (?,?)", [(k, shard) for k in keys])

    @staticmethod
    def _facets(db: sqlite3.Connection) -> None:
        facets = {
            "categories": db.execute("SELECT category, count(*) FROM rows WHERE category IS NOT NULL "
                                     "GROUP BY category ORDER BY 2 DESC, 1").fetchall(),
            "labels": db.execute("SELECT label, count(DISTINCT row) FROM boxes WHERE label IS NOT NULL "
                                 "GROUP BY label ORDER BY 2 DESC, 1 LIMIT 1000").fetchall(),
            "experts": db.execute("SELECT expert, count(DISTINCT row) FROM boxes WHERE expert IS NOT NULL "
                                  "GROUP BY expert ORDER BY 1").fetchall(),
            "with_ocr": db.execute("SELECT count(*) FROM rows WHERE has_ocr").fetchone()[0],
            "words": db.execute("SELECT min(words), max(words) FROM rows").fetchone(),
            "sides": db.execute("SELECT min(short_side), max(long_side) FROM rows").fetchone(),
        }
        db.executemany("INSERT INTO meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in facets.items()])

    # querying

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
            self._local.db = db
        return db

    def where(self, filters: Filters) -> tuple[str, list]:
        clauses, args = [], []
        if filters.q:
            phrases = parse_query(filters.q)
            if phrases:
                clauses.append("id IN (SELECT rowid FROM fts WHERE fts MATCH ?)")
                args.append(fts_expression(phrases, SEARCH_FIELDS[filters.fields]))
        if filters.category:
            clauses.append("category = ?")
            args.append(filters.category)
        if filters.min_words is not None:
            clauses.append("words >= ?")
            args.append(filters.min_words)
        if filters.max_words is not None:
            clauses.append("words <= ?")
            args.append(filters.max_words)
        if filters.has_ocr:
            clauses.append("has_ocr = ?")
            args.append(1 if filters.has_ocr == "yes" else 0)
        if filters.label:
            clauses.append("id IN (SELECT row FROM boxes WHERE label = ?)")
            args.append(filters.label)
        if filters.expert:
            if filters.expert == "ocr":
                clauses.append("has_ocr = 1")
            else:
                clauses.append("id IN (SELECT row FROM boxes WHERE expert = ?)")
                args.append(filters.expert)
        if filters.min_side is not None:
            clauses.append("short_side >= ?")
            args.append(filters.min_side)
        if filters.max_side is not None:
            clauses.append("long_side <= ?")
            args.append(filters.max_side)
        return (" AND ".join(clauses) or "1"), args

    def _remembered(self, key: tuple) -> array | None:
        with self._lock:
            ids = self._matches.get(key)
            if ids is not None:
                self._matches.move_to_end(key)
            return ids

    def _read_ids(self, where: str, args: list, db: sqlite3.Connection | None = None) -> array:
        key = (where, tuple(args))
        own = db is None
        db = db or sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            ids = array("q", [r[0] for r in db.execute(f"SELECT id FROM rows WHERE {where} ORDER BY id", args)])
        finally:
            if own:
                db.close()
        with self._lock:
            self._matches[key] = ids
            while len(self._matches) > _REMEMBERED_FILTERS:
                self._matches.popitem(last=False)
        return ids

    def _remember(self, where: str, args: list) -> None:
        """Read the ids matching a filter set in the background (the last few sets are kept): its next pages
        and row views are then slices and bisections."""
        key = (where, tuple(args))
        with self._lock:
            if key in self._matches or key in self._pending:
                return
            self._pending.add(key)

        def read():
            try:
                self._read_ids(where, args)
            finally:
                with self._lock:
                    self._pending.discard(key)

        threading.Thread(target=read, name="browse-matches", daemon=True).start()

    def matches(self, filters: Filters) -> array:
        """The ids of the rows matching ``filters``, in order."""
        where, args = self.where(filters)
        ids = self._remembered((where, tuple(args)))
        return ids if ids is not None else self._read_ids(where, args, self._connect())

    def page(self, filters: Filters, offset: int, limit: int) -> tuple[int, list[int]]:
        """(rows matching, the ids of rows offset .. offset + limit).  A search or a box filter (a subquery,
        usually selective) reads the matching ids at once; plain column filters, which may match most rows,
        count and read one page, and the ids follow in the background."""
        where, args = self.where(filters)
        ids = self._remembered((where, tuple(args)))
        if ids is None and "SELECT" in where:
            ids = self._read_ids(where, args, self._connect())
        if ids is not None:
            return len(ids), list(ids[offset:offset + limit])
        db = self._connect()
        total = db.execute(f"SELECT count(*) FROM rows WHERE {where}", args).fetchone()[0]
        page = [r[0] for r in db.execute(f"SELECT id FROM rows WHERE {where} ORDER BY id LIMIT ? OFFSET ?",
                                         [*args, limit, offset])]
        self._remember(where, args)
        return total, page

    def neighbours(self, filters: Filters, row: int) -> tuple[int, int | None, int | None, int]:
        """(position of ``row`` among the matching rows, the previous id, the next id, rows matching)."""
        ids = self.matches(filters)
        position = bisect.bisect_left(ids, row)
        here = position < len(ids) and ids[position] == row
        before = ids[position - 1] if position > 0 else None
        after_at = position + 1 if here else position
        after = ids[after_at] if after_at < len(ids) else None
        return position, before, after, len(ids)

    def find_key(self, key: str) -> int | None:
        found = self._connect().execute("SELECT id FROM rows WHERE key = ? ORDER BY id LIMIT 1", [key]).fetchone()
        return found[0] if found else None

    def dropped(self, stage: str, reason: str, offset: int, limit: int) -> tuple[int, list[dict]]:
        db = self._connect()
        clauses, args = [], []
        if stage:
            clauses.append("stage = ?")
            args.append(stage)
        if reason:
            clauses.append("reason = ?")
            args.append(reason)
        where = " AND ".join(clauses) or "1"
        total = db.execute(f"SELECT count(*) FROM dropped WHERE {where}", args).fetchone()[0]
        cursor = db.execute(f"SELECT stage, reason, key, url, detail, dup_of, shard FROM dropped WHERE {where} "
                            f"ORDER BY id LIMIT ? OFFSET ?", [*args, limit, offset])
        names = [d[0] for d in cursor.description]
        return total, [dict(zip(names, r)) for r in cursor]

    def fetch_shard_of(self, key: str) -> str | None:
        found = self._connect().execute("SELECT shard FROM fetched WHERE key = ?", [key]).fetchone()
        return found[0] if found else None

    def dropped_record(self, key: str) -> dict | None:
        cursor = self._connect().execute("SELECT stage, reason, key, url, detail, dup_of, shard FROM dropped "
                                         "WHERE key = ? ORDER BY id DESC LIMIT 1", [key])
        row = cursor.fetchone()
        return dict(zip([d[0] for d in cursor.description], row)) if row else None
