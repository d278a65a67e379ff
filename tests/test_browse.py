"""`df-hf browse` in a real headless Chromium (Debian's, driven by Playwright), on the demo build.

The server runs as a user runs it: `df-hf browse PATH` in a child process, stopped with SIGINT. The
screenshot of a row view is saved under `$DF_HF_ARTIFACTS` when set, else under the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pyarrow.parquet as pq
import pytest

from densefusion_hf.browse.index import Filters, highlight_pattern, parse_query
from tests.conftest import REPO, run_cli
from tests.hub_fixtures import run_python

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
CONFIG = "densefusion-demo"


# -- a server in a child process ------------------------------------------------------------------------------

class Served:
    def __init__(self, process: subprocess.Popen, url: str, banner: str):
        self.process, self.url, self.banner = process, url, banner

    def get(self, path: str):
        with urlopen(self.url.rstrip("/") + path, timeout=30) as response:
            return response.status, response.headers, response.read()

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
            raise AssertionError(f"df-hf browse did not stop on SIGINT:\n{self.banner}{out}")
        return self.process.returncode, self.banner + out


def start_browse(*args: str, env: dict | None = None, timeout: float = 120) -> Served:
    process = subprocess.Popen([sys.executable, "-m", "densefusion_hf", "browse", *args], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=dict(env or os.environ, PYTHONUNBUFFERED="1"))
    banner, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner += line
        found = re.search(r"Serving on (http://127\.0\.0\.1:\d+/)", line)
        if found:
            return Served(process, found.group(1), banner)
    process.kill()
    raise AssertionError(f"df-hf browse did not start:\n{banner}{process.stdout.read()}")


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo_tree(demo_build) -> dict:
    """The work directory's files before any server ran (the last test checks nothing else changed)."""
    shutil.rmtree(demo_build / "browse-cache", ignore_errors=True)
    return tree(demo_build)


@pytest.fixture(scope="module")
def server(demo_build, demo_tree):
    served = start_browse(str(demo_build))
    yield served
    code, output = served.stop()
    assert code == 0 and "Stopped." in output, output


@pytest.fixture(scope="session")
def chromium():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI needs /usr/bin/chromium for the browse tests (.ci/run installs Debian's chromium)")
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    failed = []

    def loopback_only(route):  # no CDN: the page asks nothing of any other host, and none is ever reached
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            failed.append(f"asked for {route.request.url}, not served by df-hf browse")
            route.abort()

    context.route("**/*", loopback_only)
    page = context.new_page()
    # a navigation cancels the thumbnails still loading (net::ERR_ABORTED); anything else is a failure
    page.on("requestfailed", lambda request: None if "ERR_ABORTED" in (request.failure or "")
            else failed.append(f"{request.url}: {request.failure}"))
    page.on("pageerror", lambda error: failed.append(f"script error: {error}"))
    yield page
    context.close()
    assert not failed, failed  # every script, style and image came from the server, and no script failed


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ["DF_HF_ARTIFACTS"]) if os.environ.get("DF_HF_ARTIFACTS") \
        else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def published(workdir: Path) -> list[dict]:
    files = sorted((workdir / "dataset" / CONFIG).glob("*.parquet"))
    columns = ["key", "url", "caption", "text", "priors", "category", "caption_words", "caption_model",
               "prompt_version", "sha256", "width", "height"]
    return [r for f in files for r in pq.read_table(f, columns=columns).to_pylist()]


def gallery_keys(page) -> list[str]:
    return page.eval_on_selector_all("#gallery .card", "cards => cards.map(c => c.dataset.key)")


def match_count(page) -> int:
    return int(page.get_attribute("#match-count", "data-total"))


# -- the page ---------------------------------------------------------------------------------------------------

def test_overview_renders_the_card_and_the_stage_counts(server, demo_build, page):
    page.goto(server.url)
    assert page.locator("#card h1").inner_text() == "DenseFusion demo (embedded sample)"
    assert page.locator("#card table").count() >= 2                      # the card's Markdown tables
    charts = page.locator("#card img")
    assert charts.count() >= 1
    assert all(page.evaluate("imgs => imgs.map(i => i.naturalWidth > 0)", charts.element_handles()))
    status = json.loads(run_cli("status", str(demo_build), "--json").stdout)
    for stage in status["stages"]:
        row = page.locator(f'#stage-counts tr[data-stage="{stage["name"]}"] td')
        assert row.nth(1).inner_text().replace(",", "") == str(stage["rows_in"])
        assert row.nth(2).inner_text().replace(",", "") == str(stage["rows_out"])


def test_gallery_shows_every_row_as_thumbnails(server, demo_build, page):
    rows = published(demo_build)
    page.goto(server.url + "rows")
    page.wait_for_load_state("networkidle")
    assert gallery_keys(page) == [r["key"] for r in rows] and len(rows) == 18
    assert match_count(page) == 18
    sources = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => [i.getAttribute('src'), "
                                                        "i.naturalWidth, i.naturalHeight])")
    assert all(src.startswith("/thumb/") and 0 < max(w, h) <= 320 for src, w, h in sources), sources
    first = page.locator("#gallery .card").first
    assert rows[0]["caption"][:30] in first.locator(".caption").inner_text()
    # the thumbnails are cached in the work directory's cache folder
    assert len(list((demo_build / "browse-cache").glob("thumbs-*/*/*.jpg"))) == 18


def test_a_text_image_shows_its_ocr_words_and_boxes_as_svg(server, demo_build, page, artifacts):
    sign = next(r for r in published(demo_build) if r["url"].endswith("grand-opening.jpg"))
    lines = [line["text"] for line in sign["priors"]["ocr"]]
    assert lines == ["GRAND OPENING", "SALE"]
    page.goto(server.url + f"row/{sign['key']}")
    page.wait_for_load_state("networkidle")
    assert page.locator("#ocr-lines li .text").all_inner_texts() == lines
    boxes = page.locator("#boxes g.box")
    assert boxes.count() == len(lines)
    for i, text in enumerate(lines):
        box = boxes.nth(i)
        assert box.get_attribute("data-label") == text and box.get_attribute("data-expert") == "ocr"
        assert box.locator("text").text_content().startswith(text)
        assert box.locator("rect").bounding_box()["width"] > 20
    assert page.evaluate("document.getElementById('full-image').naturalWidth") == 800
    assert page.locator("#caption").inner_text() == sign["caption"]
    facts = page.locator(".facts").inner_text()
    assert f"model {sign['caption_model']}" in facts and f"prompt {sign['prompt_version']}" in facts
    shown_tags = page.locator("#tags .tag").all_inner_texts()
    assert [t.split()[0] for t in shown_tags] == [t["label"].split()[0] for t in sign["priors"]["tags"]]
    columns = dict(zip(page.locator("#columns th").all_inner_texts(), page.locator("#columns td").all_inner_texts()))
    assert columns["sha256"] == sign["sha256"] and columns["url"] == sign["url"]
    page.screenshot(path=str(artifacts / "browse-row-view.png"), full_page=True)
    assert (artifacts / "browse-row-view.png").stat().st_size > 10_000
    # an expert switched off hides its boxes, and the URL keeps it
    page.locator('[data-expert-toggle="ocr"]').uncheck()
    assert not boxes.first.is_visible() and "hide=ocr" in page.url
    page.reload()
    assert not page.locator('[data-expert-toggle="ocr"]').is_checked() and not boxes.first.is_visible()
    page.keyboard.press("b")
    assert boxes.first.is_visible()


def _contains(row: dict, word: str) -> bool:
    texts = [row["caption"] or "", row["priors"]["alt_text"] or row["text"] or ""]
    texts += [line["text"] for line in row["priors"]["ocr"]]
    return any(re.search(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", t, re.IGNORECASE) for t in texts)


@pytest.mark.parametrize("word", ["parking", "SALE"])
def test_search_for_a_word_rapidocr_read_finds_exactly_its_rows(server, demo_build, page, word):
    rows = published(demo_build)
    assert any(word.lower() in line["text"].lower() for r in rows for line in r["priors"]["ocr"])
    expected = [r["key"] for r in rows if _contains(r, word)]
    page.goto(server.url + "rows")
    page.fill("#q", word)
    page.press("#q", "Enter")
    page.wait_for_url(re.compile(r"q=" + word))
    assert gallery_keys(page) == expected and match_count(page) == len(expected)
    marks = page.locator("#gallery mark").all_inner_texts()
    assert marks and all(m.lower() == word.lower() for m in marks)
    ocr_only = [r["key"] for r in rows if any(word.lower() in line["text"].lower().split()
                                                  for line in r["priors"]["ocr"])]
    page.goto(server.url + f"rows?q={word}&in=ocr")
    assert gallery_keys(page) == ocr_only


def test_category_and_caption_length_filters_give_the_right_counts(server, demo_build, page):
    rows = published(demo_build)
    category = rows[0]["category"]
    page.goto(server.url + "rows")
    page.select_option("#category", category)
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile("category="))
    assert match_count(page) == sum(r["category"] == category for r in rows)
    words = sorted(r["caption_words"] for r in rows)
    low, high = words[len(words) // 4], words[len(words) // 2]
    page.fill('input[name="min_words"]', str(low))
    page.fill('input[name="max_words"]', str(high))
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile("max_words="))
    expected = [r["key"] for r in rows if r["category"] == category and low <= r["caption_words"] <= high]
    assert match_count(page) == len(expected) and gallery_keys(page) == expected
    page.goto(server.url + "rows?has_ocr=yes")
    assert match_count(page) == sum(bool(r["priors"]["ocr"]) for r in rows) == 3
    page.goto(server.url + "rows?expert=ocr&min_side=400&max_side=800")
    assert match_count(page) == 3
    # the image size filters, at thresholds that split the rows
    short = sorted(min(r["width"], r["height"]) for r in rows)
    long = sorted(max(r["width"], r["height"]) for r in rows)
    at_least, at_most = short[len(short) // 2], long[len(long) // 3]
    page.goto(server.url + f"rows?min_side={at_least}")
    assert match_count(page) == sum(min(r["width"], r["height"]) >= at_least for r in rows) < len(rows)
    page.goto(server.url + f"rows?max_side={at_most}")
    assert match_count(page) == sum(max(r["width"], r["height"]) <= at_most for r in rows) < len(rows)


def test_a_deep_link_opens_the_same_view_and_keys_move_between_rows(server, demo_build, page, chromium):
    rows = published(demo_build)
    matching = [r["key"] for r in rows if _contains(r, "texture")]
    assert len(matching) >= 2
    page.goto(server.url + "rows?q=texture&per_page=1&page=2")
    assert gallery_keys(page) == [matching[1]]
    page.keyboard.press("ArrowRight")  # select the card, then open it
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/row/"))
    link = page.url
    assert f"/row/{matching[1]}?" in link and "q=texture" in link
    other = chromium.new_context().new_page()  # a link opens the same view
    other.goto(link)
    assert other.locator("#row-key").inner_text() == matching[1]
    assert f"row 2 of {len(matching)}" in other.locator("#position").inner_text().replace("\n", " ")
    assert other.locator("#caption mark").count() >= 1
    other.context.close()
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(f"/row/{matching[0]}"))
    page.keyboard.press("j")
    page.wait_for_url(re.compile(f"/row/{matching[1]}"))
    page.keyboard.press("Escape")
    page.wait_for_url(re.compile(r"/rows\?"))
    assert "q=texture" in page.url and "page=2" in page.url and gallery_keys(page) == [matching[1]]


def test_the_dropped_rows_page_lists_each_reason_with_its_status_count(server, demo_build, page):
    status = json.loads(run_cli("status", str(demo_build), "--json").stdout)
    expected = {(s["name"], reason): count for s in status["stages"] for reason, count in s["dropped"].items()}
    page.goto(server.url + "dropped")
    shown = page.eval_on_selector_all("#drop-table tr[data-stage]", "rows => rows.map(r => [r.dataset.stage, "
                                                                      "r.dataset.reason, r.cells[2].innerText])")
    assert {(stage, reason): int(count.replace(",", "")) for stage, reason, count in shown} == expected
    page.click('#reasons a[data-stage="dedup"][data-reason="near_dup"]')
    page.wait_for_url(re.compile("reason=near_dup"))
    page.wait_for_load_state("networkidle")
    assert match_count(page) == expected[("dedup", "near_dup")]
    drop = page.locator("#drops .drop").first
    images = drop.locator("img")
    assert images.count() == 2  # the duplicate beside the image kept in its place
    assert all(page.evaluate("imgs => imgs.map(i => i.naturalWidth > 0)", images.element_handles()))
    dropped = pq.read_table(demo_build / "dedup" / "shard-00001.dropped.parquet").to_pylist() + \
        [r for s in ("00000", "00002") for r in pq.read_table(demo_build / "dedup" /
                                                             f"shard-{s}.dropped.parquet").to_pylist()]
    near = next(r for r in dropped if r["reason"] == "near_dup")
    assert drop.get_attribute("data-key") == near["key"] and near["dup_of"] in drop.inner_text()
    for stage, reason in expected:  # every reason's list holds its count of rows
        page.goto(server.url + f"dropped?stage={stage}&reason={reason}")
        assert match_count(page) == expected[(stage, reason)] == page.locator("#drops .drop").count()


def test_the_server_wrote_only_its_cache_folder(server, demo_build, demo_tree):
    assert server.get("/rows?q=coffee")[0] == 200
    after = tree(demo_build)
    changed = {p for p in set(after) | set(demo_tree) if after.get(p) != demo_tree.get(p)}
    assert changed and all(p.startswith("browse-cache/") for p in changed), sorted(changed)[:10]


# -- bad input, a stop, other sources -----------------------------------------------------------------------

def test_bad_paths_get_a_clear_message(tmp_path):
    missing = run_cli("browse", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr, missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("browse", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "neither a work directory" in empty.stderr and "Traceback" not in empty.stderr


def test_an_undecodable_image_is_shown_as_such_and_ctrl_c_stops_cleanly(tmp_path, page):
    from densefusion_hf.testing.synthetic import write_synthetic

    folder = write_synthetic(tmp_path / "synthetic", rows=250, bad_rows=(3,))
    served = start_browse(str(folder), "--port", "0", "--cache-dir", str(tmp_path / "cache"))
    try:
        page.goto(served.url + "rows")
        page.wait_for_load_state("networkidle")
        assert len(gallery_keys(page)) == 48 and match_count(page) == 250
        status, headers, body = served.get("/thumb/3")
        assert headers["Content-Type"].startswith("image/svg") and b"does not decode" in body
        page.goto(served.url + f"row/{3:024x}")
        assert "does not decode" in page.locator("#image-problem").inner_text()
        assert page.locator("#caption").inner_text().startswith("A photo of")  # the rest of the row is there
        page.goto(served.url + "rows?label=dog&expert=open_set")
        assert match_count(page) > 0 and page.locator("#gallery .card").count() > 0
        page.goto(served.url + "rows?page=6")  # the last page: rows 240..249
        assert gallery_keys(page) == [f"{i:024x}" for i in range(240, 250)]
        page.goto("about:blank")  # no thumbnail still loading when the server stops
    finally:
        code, output = served.stop()
    assert code == 0 and "Stopped." in output and "Traceback" not in output, output


def test_browsing_a_repo_pushed_to_the_fake_hub_by_id(demo_build, fake_hub, hub_env, page, tmp_path):
    repo = "tester/browse-demo"
    pushed = run_cli("publish", str(demo_build), "--repo", repo, "--no-progress", env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    missing = run_cli("browse", "tester/no-such-repo", env=hub_env)
    assert missing.returncode == 1 and "no such dataset repo" in missing.stderr
    no_revision = run_cli("browse", repo, "--revision", "v9.9.9", env=hub_env)
    assert no_revision.returncode == 1 and "no revision" in no_revision.stderr
    served = start_browse(repo, "--revision", "v0.1.0", "--cache-dir", str(tmp_path / "cache"), env=hub_env)
    try:
        assert "Hub dataset tester/browse-demo@v0.1.0" in served.banner
        rows = published(demo_build)
        page.goto(served.url + "rows")
        page.wait_for_load_state("networkidle")
        assert gallery_keys(page) == [r["key"] for r in rows]
        page.goto(served.url + "rows?q=parking")
        assert gallery_keys(page) == [r["key"] for r in rows if _contains(r, "parking")]
        sign = next(r for r in rows if r["url"].endswith("no-parking.jpg"))
        page.goto(served.url + f"row/{sign['key']}")
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.getElementById('full-image').naturalWidth") == 800
        assert page.locator("#boxes g.box").count() == 2
        page.goto(served.url)
        assert page.locator("#card h1").count() == 1
        log = fake_hub.request_log()["requests"]
        assert any("/resolve/" in r for r in log)
    finally:
        code, output = served.stop()
    assert code == 0, output
    # nothing was downloaded into the Hub's cache: the Parquet files were read with ranged requests
    assert not list((tmp_path / "hf-home").rglob("*.parquet"))


# -- the index's query language ----------------------------------------------------------------------------

def test_queries_phrases_prefixes_and_highlights():
    phrases = parse_query('grand "no parking" coff* AND 2-for-1')
    assert phrases == [(["grand"], False), (["no", "parking"], False), (["coff"], True), (["2", "for", "1"], False)]
    pattern = highlight_pattern(phrases)
    assert pattern.findall("Grand coffee, NO  PARKING, grandma, 2 for 1") == ["Grand", "coffee", "NO  PARKING",
                                                                             "2 for 1"]
    filters = Filters.from_query({"q": "sale", "in": "ocr", "min_words": "3", "has_ocr": "maybe", "max_side": "x"})
    assert filters.params() == {"q": "sale", "in": "ocr", "min_words": "3"}
    assert Filters.from_query(filters.params()) == filters


def test_open_hands_the_address_to_the_users_browser(tmp_path):
    from densefusion_hf.testing.synthetic import write_synthetic

    folder = write_synthetic(tmp_path / "synthetic", rows=20)
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"  # what $BROWSER names is what webbrowser runs, with the address
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    browser.chmod(0o755)
    served = start_browse(str(folder), "--open", "--cache-dir", str(tmp_path / "cache"),
                          env=dict(os.environ, BROWSER=f"{browser} %s"))
    try:
        deadline = time.monotonic() + 30
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert opened.exists() and opened.read_text().strip() == served.url
    finally:
        code, output = served.stop()
    assert code == 0, output


def test_a_thumbnail_asked_for_before_its_bytes_can_be_had_is_made_later(tmp_path):
    from densefusion_hf.browse.images import ThumbnailCache
    from densefusion_hf.testing.synthetic import write_synthetic

    cache = ThumbnailCache(tmp_path / "thumbs")
    assert cache.get("k", lambda: None) == (None, "no image bytes")  # e.g. the index is still being built
    data = next(p for p in sorted((write_synthetic(tmp_path / "s", rows=2)).rglob("*.parquet")))
    import pyarrow.parquet as pq

    image = pq.read_table(data).column("image")[0].as_py()["bytes"]
    thumb, problem = cache.get("k", lambda: image)
    assert problem is None and thumb[:2] == b"\xff\xd8"
    assert cache.get("bad", lambda: b"not an image")[0] is None and cache.get("bad", lambda: image)[0] is None
    assert cache._locks == {}
