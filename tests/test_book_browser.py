"""Open the built book in headless Chromium, the way a reader's browser shows it.

For every chapter page (each notebook in ``_toc.yml``): the page loads, every figure in its
cell outputs is an image the browser decoded (``naturalWidth > 0``), no cell shows an error or
traceback, and its Colab launch link points at the chapter's ``.ipynb`` on ``main``.

``make test`` builds the book in smoke mode and sets ``TCMLIB_BOOK_DIR`` to it; then a missing
build is a failure.  Run by hand without it, the test uses ``_build/html`` and skips if that
does not exist.  Chromium comes from Debian's ``chromium`` package (the Makefile installs it
where it can); where it cannot be installed the test skips and says so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


def _chapter_stems() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    return [Path(f).name for f in files if f.startswith("notebooks/")]


def _book_dir() -> Path:
    explicit = os.environ.get("TCMLIB_BOOK_DIR")
    path = (ROOT / explicit).resolve() if explicit else ROOT / "_build" / "html"
    if not (path / "index.html").exists():
        if explicit:
            pytest.fail(f"TCMLIB_BOOK_DIR={explicit} holds no built book (index.html missing)")
        pytest.skip("the book is not built (no _build/html/index.html): run `make book` or `make test`")
    return path


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed and could not be (apt-get install chromium); browser test skipped")
    return exe


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    exe = _chromium()
    with tempfile.TemporaryDirectory() as profile, playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=exe, headless=True, args=CHROMIUM_FLAGS
        )
        yield context
        context.close()


@pytest.mark.parametrize("stem", _chapter_stems())
def test_chapter_page_renders(browser, stem: str) -> None:
    book = _book_dir()
    page_file = book / "notebooks" / f"{stem}.html"
    assert page_file.exists(), f"{page_file} was not built"
    page = browser.new_page()
    try:
        response = page.goto(page_file.as_uri(), wait_until="load")
        assert response is None or response.ok
        assert page.title(), f"{stem}: empty <title>"

        # Figures: every image in a cell output decoded by the browser, and at least one.
        sizes = page.eval_on_selector_all(
            ".cell_output img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        assert sizes, f"{stem}: no figure in any cell output"
        broken = [src for src, complete, width in sizes if not complete or width == 0]
        assert not broken, f"{stem}: figures that did not load: {broken}"

        # No error output in any cell.
        outputs = page.eval_on_selector_all(".cell_output", "els => els.map(e => e.innerText)")
        bad = [o[:200] for o in outputs if "Traceback (most recent call last)" in o]
        assert not bad, f"{stem}: error output on the page: {bad}"
        assert page.locator(".output.traceback, .output.error").count() == 0

        # Colab launch link: the chapter's .ipynb on main.
        hrefs = page.eval_on_selector_all("a[href*='colab.research.google.com']", "as => as.map(a => a.href)")
        expected = f"/blob/main/notebooks/{stem}.ipynb"
        assert any(h.endswith(expected) for h in hrefs), f"{stem}: no Colab link ending in {expected}: {hrefs}"
    finally:
        page.close()


def test_index_redirects_to_the_introduction(browser) -> None:
    book = _book_dir()
    page = browser.new_page()
    try:
        page.goto((book / "index.html").as_uri())
        page.wait_for_url("**/book/intro.html")
        page.wait_for_load_state("load")
        assert "Threshold-consistent deep metric learning" in page.title()
        chapters = page.eval_on_selector_all("nav a.reference.internal", "as => as.map(a => a.href)")
        assert sum("/notebooks/" in h for h in chapters) == len(_chapter_stems()), chapters
    finally:
        page.close()
