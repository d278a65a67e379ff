"""The Starlette application behind ``df-hf browse``: server-rendered pages, so every view is a URL.

    /                       the dataset card rendered, the build's per-stage counts
    /rows?page=&q=&...      the gallery: filters and search (the index), or plain pages (row groups only)
    /row/KEY?<gallery>      one row: the image with its boxes as SVG, tags, OCR lines, every column
    /dropped?stage=&reason= a work directory's dropped rows; a duplicate beside the image kept in its place
    /thumb/ROW, /image/ROW  a row's thumbnail (made on demand, cached) and its full image
    /fetched/KEY/thumb|image   an image fetch kept (dropped rows, the rows kept in their place)
    /assets/...             the card's charts; /static/... the page's script and styles (no CDN)
    /api/status             the index's progress, polled by the page while it is built
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from markupsafe import Markup, escape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from densefusion_hf import __version__
from densefusion_hf.browse.images import ThumbnailCache, check_image, for_browser, placeholder_svg
from densefusion_hf.browse.index import Filters, Index, highlight_pattern, parse_query, query_note
from densefusion_hf.browse.server import INDEX_FIRST_ROWS, INDEX_HEAD_START
from densefusion_hf.browse.source import Source
from densefusion_hf.errors import UserError

HERE = Path(__file__).parent
PER_PAGE = 48
LOOK_EVERY = 1.0  # seconds between two looks at a work directory's done markers
DROPPED_PER_PAGE = 40
EXPERT_COLOURS = {"detector": "#ff9f1c", "open_set": "#2ec4b6", "ocr": "#e71d73"}
_OTHER_COLOURS = ["#a78bfa", "#60a5fa", "#facc15", "#f87171", "#34d399"]
_SHOWN_ELSEWHERE = {"image", "caption", "priors"}
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
                ".gif": "image/gif", ".webp": "image/webp", ".json": "application/json"}


def expert_colour(expert: str) -> str:
    if expert in EXPERT_COLOURS:
        return EXPERT_COLOURS[expert]
    return _OTHER_COLOURS[sum(map(ord, expert or "")) % len(_OTHER_COLOURS)]


def render_markdown(text: str) -> Markup:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")
    return Markup(md.render(text))


def highlighter(query: str):
    pattern = highlight_pattern(parse_query(query)) if query else None

    def highlight(text) -> Markup:
        text = "" if text is None else str(text)
        if pattern is None:
            return escape(text)
        out, last = [], 0
        for match in pattern.finditer(text):
            out.append(escape(text[last:match.start()]))
            out.append(Markup("<mark>") + escape(match.group(0)) + Markup("</mark>"))
            last = match.end()
        out.append(escape(text[last:]))
        return Markup("").join(out)

    return highlight


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bytes):
        return f"<{len(value):,} bytes>"
    return "" if value is None else str(value)


def _int_param(request: Request, name: str, default: int, low: int = 1) -> int:
    try:
        return max(low, int(request.query_params.get(name, default)))
    except (TypeError, ValueError):
        return default


class Browser:
    """The state of one ``df-hf browse``: its source, index and thumbnail cache; for a work directory whose
    build moves on, the next ones, swapped in when their index is ready."""

    def __init__(self, source: Source, index: Index):
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                 trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        env.globals.update(version=__version__, colour=expert_colour,
                           number=lambda n: f"{n:,}" if isinstance(n, int) else n, cell=_cell,
                           without=lambda params, name: {k: v for k, v in params.items() if k != name})
        env.filters["query"] = lambda params: urlencode({k: v for k, v in params.items() if v not in (None, "")})
        self.env = env
        self.source: Source | None = None
        self._lock = threading.Lock()
        self._pending: tuple[Source, Index] | None = None
        self._next_look = time.monotonic() + LOOK_EVERY
        self._use(source, index)

    def _use(self, source: Source, index: Index) -> None:
        old = self.source
        if old is None or old.fingerprint != source.fingerprint:  # thumbnails are named by row
            self.thumbs = ThumbnailCache(Path(source.cache_dir) / f"thumbs-{source.fingerprint}")
        if old is not None and self.index.path != index.path:  # an index of a state that is gone for good
            self.index.path.unlink(missing_ok=True)
        self.source, self.index = source, index
        meta, body = source.card()
        self.card_meta, self.card_html = meta, render_markdown(body) if body else None

    def current(self) -> tuple[Source, Index]:
        """The source and index a page is made from. A work directory whose build moved on (a shard finished)
        is opened again and indexed in the background; its new index is used once ready (a small one is waited
        for a few seconds, as at start), the old one meanwhile."""
        self._look_for_changes()
        pending = self._pending
        if pending is not None:
            fresh, index = pending
            if fresh.num_rows <= INDEX_FIRST_ROWS:
                index.wait(INDEX_HEAD_START)
            if index.ready.is_set():
                with self._lock:
                    if self._pending is pending:
                        self._pending = None
                        self._use(fresh, index)
        return self.source, self.index

    def _look_for_changes(self) -> None:
        now = time.monotonic()
        with self._lock:  # at most one look a second, however many pages and thumbnails ask
            if self._pending is not None or now < self._next_look or self.source.opened_with is None:
                return
            self._next_look = now + LOOK_EVERY
            source = self.source
        if not source.changed():
            return
        try:
            fresh = source.reopen()
        except UserError:  # caught mid-change (a stage cleared for a redo): the next look tries again
            return
        with self._lock:
            if self._pending is None and self.source is source:
                self._pending = (fresh, Index(fresh).start())

    def page(self, name: str, request: Request, status: int = 200, **context) -> HTMLResponse:
        context.setdefault("title", self.source.config or self.source.label)
        context.setdefault("source", self.source)
        context.setdefault("index", self.index)
        html = self.env.get_template(name).render(request=request, path=request.url.path, **context)
        return HTMLResponse(html, status_code=status)

    def message(self, request: Request, title: str, text: str, status: int) -> HTMLResponse:
        return self.page("message.html", request, status=status, title=title, heading=title, text=text)

    # -- helpers ------------------------------------------------------------------------------------------

    def index_ready(self) -> bool:
        return self.index.ready.is_set() and self.index.error is None

    def find_row(self, key: str, at: int | None = None) -> int | None:
        """The global row of ``key``: through the index; while it is built, at ``at`` (the row a link names,
        checked against its key: one row group read), else by reading the key columns."""
        if self.index_ready():
            return self.index.find_key(key)
        if at is not None and 0 <= at < self.source.num_rows:
            data, group, offset = self.source.locate(at)
            if "key" not in data.columns:
                return at if key == str(at) else None  # rows without keys are linked by their index
            if self.source.group(data, group).column("key")[offset].as_py() == key:
                return at
        import pyarrow.compute as pc

        for data in self.source.files:
            if "key" not in data.columns:
                return None
            for group in range(len(data.group_rows)):
                keys = self.source.group(data, group).column("key")
                hits = pc.index(keys, key).as_py()
                if hits != -1:
                    return data.start + data.group_starts[group] + hits
        return None

    def shaped(self, record: dict) -> dict:
        """A row as the templates show it: alt text, tags, OCR lines and every box, with plain fallbacks."""
        priors = record.get("priors") if isinstance(record.get("priors"), dict) else {}
        boxes = []
        for box in priors.get("boxes") or []:
            if box and box.get("box") and len(box["box"]) == 4:
                boxes.append({"label": box.get("label") or "", "score": box.get("score"),
                              "expert": box.get("expert") or "box", "box": box["box"]})
        ocr = []
        for number, line in enumerate(priors.get("ocr") or []):
            ocr.append({"n": number, "text": line.get("text") or "", "score": line.get("score"),
                        "box": line.get("box")})
            if line.get("box") and len(line["box"]) == 4:
                boxes.append({"label": line.get("text") or "", "score": line.get("score"), "expert": "ocr",
                              "box": line["box"], "line": number})
        return {
            "record": record, "row": record["_row"], "key": record.get("key") or str(record["_row"]),
            "caption": record.get("caption") or "", "alt_text": priors.get("alt_text") or record.get("text") or "",
            "category": record.get("category"), "width": record.get("width"), "height": record.get("height"),
            "tags": priors.get("tags") or [], "ocr": ocr, "boxes": boxes, "failures": priors.get("failures") or [],
            "words": record.get("caption_words") if record.get("caption_words") is not None
            else len((record.get("caption") or "").split()),
        }


def create_app(source: Source, index: Index) -> Starlette:
    return _application(Browser(source, index))


def _application(browser: Browser) -> Starlette:
    """The routes; each page takes the source and index it is made from from ``browser.current()``."""

    def overview(request: Request):
        source, index = browser.current()
        stages = source.stages
        return browser.page("overview.html", request, stages=stages, card=browser.card_html,
                            card_meta=browser.card_meta)

    def rows(request: Request):
        source, index = browser.current()
        filters = Filters.from_query(request.query_params)
        per_page = min(_int_param(request, "per_page", PER_PAGE), 500)
        page = _int_param(request, "page", 1)
        waiting = False
        if filters.active:
            if not browser.index_ready():
                waiting = True
                total, ids = 0, []
            else:
                total, ids = index.page(filters, (page - 1) * per_page, per_page)
        else:
            total = source.num_rows
            start = (page - 1) * per_page
            ids = list(range(start, min(start + per_page, total)))
        pages = max(1, math.ceil(total / per_page))
        note = query_note(filters.q)
        if note is None and filters.q and not waiting and total == source.num_rows > 1 \
                and filters.params().keys() <= {"q", "in"}:  # a search this broad looks like a search ignored
            note = f"Every row holds “{filters.q}”: the search matches all {total:,} rows."
        records = [browser.shaped(r) for r in source.rows(ids)]
        state = filters.params()
        if per_page != PER_PAGE:
            state["per_page"] = str(per_page)
        return browser.page("rows.html", request, filters=filters, state=state, rows=records, total=total,
                            page=page, pages=pages, per_page=per_page, waiting=waiting, note=note,
                            highlight=highlighter(filters.q), facets=index.meta if browser.index_ready() else {})

    def row(request: Request):
        source, index = browser.current()
        key = request.path_params["key"]
        filters = Filters.from_query(request.query_params)
        found = browser.find_row(key, _int_param(request, "at", -1, low=-1))
        if found is None:
            return browser.message(request, "No such row", f"No row has the key {key!r} in {source.describe()}.",
                                   404)
        record = browser.shaped(source.rows([found])[0])
        data = source.image_bytes(found)
        problem = check_image(data)
        width, height = record["width"], record["height"]
        if problem is None and not (width and height):
            import io

            from PIL import Image
            width, height = Image.open(io.BytesIO(data)).size
        per_page = min(_int_param(request, "per_page", PER_PAGE), 500)
        state = filters.params()
        if per_page != PER_PAGE:
            state["per_page"] = str(per_page)
        if filters.active and browser.index_ready():
            position, before, after, total = index.neighbours(filters, found)
        else:
            position, total = found, source.num_rows
            before = found - 1 if found > 0 else None
            after = found + 1 if found + 1 < total else None
        neighbours = {name: {"key": source.rows([r])[0].get("key") or str(r), "at": r} if r is not None else None
                      for name, r in (("prev", before), ("next", after))}
        experts = sorted({b["expert"] for b in record["boxes"]}, key=lambda e: (e != "detector", e != "open_set", e))
        back = dict(state, page=str(position // per_page + 1))
        others = [(name, value) for name, value in record["record"].items()
                  if name not in _SHOWN_ELSEWHERE and not name.startswith("_")]
        return browser.page("row.html", request, title=f"{record['key']} · {source.config or source.label}",
                            r=record, problem=problem, width=width or 1, height=height or 1, state=state,
                            position=position, total=total, neighbours=neighbours, experts=experts, back=back,
                            chips=filters.params(),
                            others=others, highlight=highlighter(filters.q), hidden=request.query_params.get(
                                "hide", ""))

    def dropped(request: Request):
        source, index = browser.current()
        if source.workdir is None:
            return browser.message(request, "No build here", "Dropped rows are shown for a work directory: "
                                   "pass the folder given to `df-hf build --workdir`.", 404)
        stage = request.query_params.get("stage", "")
        reason = request.query_params.get("reason", "")
        page = _int_param(request, "page", 1)
        total, records = 0, []
        if browser.index_ready() and (stage or reason):
            total, records = index.dropped(stage, reason, (page - 1) * DROPPED_PER_PAGE, DROPPED_PER_PAGE)
            for record in records:
                record["has_image"] = index.fetch_shard_of(record["key"]) is not None
                if record.get("dup_of"):
                    kept = record["dup_of"]
                    record["kept_image"] = index.fetch_shard_of(kept) is not None
                    record["kept_row"] = index.find_key(kept)
                    record["kept_dropped"] = index.dropped_record(kept)
        return browser.page("dropped.html", request, stages=source.stages, stage=stage, reason=reason,
                            records=records, total=total, page=page,
                            pages=max(1, math.ceil(total / DROPPED_PER_PAGE)), waiting=not browser.index_ready())

    def _thumb_response(name: str, load) -> Response:
        thumb, problem = browser.thumbs.get(name, load)
        headers = {"Cache-Control": "public, max-age=31536000, immutable"}
        if thumb is None:
            return Response(placeholder_svg(problem or ""), media_type="image/svg+xml",
                            headers={**headers, "X-Image-Problem": re.sub(r"[^\x20-\x7e]", "?", problem or "")[:200]})
        return Response(thumb, media_type="image/jpeg", headers=headers)

    def thumb(request: Request):
        source = browser.source
        row_id = request.path_params["row"]
        if not 0 <= row_id < source.num_rows:
            return PlainTextResponse("no such row", status_code=404)
        return _thumb_response(f"row-{row_id}", lambda: source.image_bytes(row_id))

    def _image_response(data: bytes | None) -> Response:
        problem = check_image(data)
        if problem is not None:
            return Response(placeholder_svg(problem, 640), media_type="image/svg+xml", status_code=200)
        body, media = for_browser(data)
        return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=31536000, immutable"})

    def image(request: Request):
        source = browser.source
        row_id = request.path_params["row"]
        if not 0 <= row_id < source.num_rows:
            return PlainTextResponse("no such row", status_code=404)
        return _image_response(source.image_bytes(row_id))

    def _fetched(key: str) -> bytes | None:
        source, index = browser.source, browser.index
        if not browser.index_ready():
            return None
        return source.fetched_image(key, index.fetch_shard_of(key))

    def fetched_thumb(request: Request):
        key = request.path_params["key"]
        return _thumb_response(f"fetched-{key}", lambda: _fetched(key))

    def fetched_image(request: Request):
        return _image_response(_fetched(request.path_params["key"]))

    def asset(request: Request):
        relative = "assets/" + request.path_params["path"]
        data = browser.source.read_bytes(relative)
        if data is None:
            return PlainTextResponse("not found", status_code=404)
        return Response(data, media_type=_MEDIA_TYPES.get(Path(relative).suffix.lower(), "application/octet-stream"))

    def status(request: Request):
        source, index = browser.current()
        return JSONResponse({"ready": index.ready.is_set(), "error": index.error, "rows_indexed": index.done_rows,
                             "rows": source.num_rows, "seconds": index.seconds})

    def favicon(request: Request):
        return Response(status_code=204)

    async def not_found(request: Request, exc):
        return browser.message(request, "Not found", f"Nothing at {request.url.path}.", 404)

    async def server_error(request: Request, exc):
        return browser.message(request, "Something went wrong",
                               f"{type(exc).__name__}: {exc}. The rest of the dataset can still be browsed.", 500)

    async def user_error(request: Request, exc: UserError):
        """What went wrong, said as it is (a Hub that cannot be read says what to do), on the page and in one
        line on the server's terminal, without a traceback."""
        print(f"df-hf browse: {request.url.path}: {exc}", file=sys.stderr, flush=True)
        return browser.message(request, "Something went wrong",
                               f"{exc} The rest of the dataset can still be browsed.", 500)

    routes = [
        Route("/", overview),
        Route("/rows", rows),
        Route("/row/{key:path}", row),
        Route("/dropped", dropped),
        Route("/thumb/{row:int}", thumb),
        Route("/image/{row:int}", image),
        Route("/fetched/{key}/thumb", fetched_thumb),
        Route("/fetched/{key}/image", fetched_image),
        Route("/assets/{path:path}", asset),
        Route("/api/status", status),
        Route("/favicon.ico", favicon),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(LocalHostOnly)],
                     exception_handlers={404: not_found, 500: server_error, UserError: user_error})


class LocalHostOnly:
    """Answer only requests addressed to this machine's loopback names, so a page of another site cannot
    reach the server through DNS rebinding."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if name not in ("127.0.0.1", "localhost", "[::1]"):
                response = PlainTextResponse("df-hf browse answers only requests to 127.0.0.1", status_code=421)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
