"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package) driven by
Playwright, background networking off.

Checks: the page loads with no console error (a CSP violation, a broken image or a script
error would be one); it requests nothing beyond its own file (every request is intercepted
and recorded, data: URIs aside); every chart is visible with a non-zero size and a decoded
image; a hostile account id is shown as text and runs nothing (no dialog); the tables sort
when a header is clicked. The night-over-night diff.html gets the same load checks.

Skips, with the reason shown, only where no ``chromium`` binary exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import stress
from stress import report

from .test_report import IMG, explicit_scenarios, hostile_snapshot, with_random

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH: install Debian's chromium package (.ci/run does)")

# No update checks, no component downloads, nothing the browser would fetch on its own.
ARGS = ["--disable-background-networking", "--disable-component-update", "--disable-default-apps",
        "--disable-sync", "--disable-extensions", "--no-first-run", "--disable-features=Translate"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A report with every chart (random scenarios, exposure), a breached limit and an account
    named ``<img src=x onerror=alert(1)>``; and a diff of it against an earlier report."""
    root = tmp_path_factory.mktemp("browser")
    snap = stress.load_snapshot(hostile_snapshot(root / "snap", ids=(IMG, "alice", "bob", "carol")))
    scen = with_random(explicit_scenarios(root, snap), snap, m=100)
    res = stress.run(snap, scen)
    exposure = pd.DataFrame({"account_id": [IMG, "alice", "b"], "underlying": ["BTC", "BTC", "BTC"],
                             "delta": [1.0, 2.0, -3.5], "delta_usd": [90_000.0, 180_000.0, -315_000.0],
                             "gamma": [0.0, 0.0, 0.0], "vega": [0.0, 0.0, 0.0]})
    new = report.write(res, root / "new", ["worst bad debt 1 USD (x) > max_bad_debt 0"], exposure=exposure)
    # yesterday: one account fewer, and b held more USDC (its worst loss, a depeg, was larger)
    old_snap = stress.load_snapshot(hostile_snapshot(root / "old_snap", ids=(IMG, "alice", "bob"), extra_b=4e6))
    old = report.write(stress.run(old_snap, explicit_scenarios(root, old_snap)), root / "old")
    report.write_diff(report.diff(report.load(new), report.load(old)), new)
    return new


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


class Visit:
    """A page opened on one local file, with every request, console error and dialog recorded."""

    def __init__(self, browser, path: Path):
        self.url = path.resolve().as_uri()
        self.context = browser.new_context(java_script_enabled=True)
        self.page = self.context.new_page()
        self.foreign, self.requests, self.errors, self.dialogs = [], [], [], []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.context.route("**/*", self._route)
        self.page.goto(self.url, wait_until="load")
        self.page.wait_for_timeout(300)  # let any late handler (onerror, timers) fire

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _route(self, route):
        url = route.request.url
        if url == self.url or url.startswith("data:"):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def close(self):
        self.context.close()


@pytest.fixture
def visit(browser):
    opened = []

    def open_(path: Path) -> Visit:
        v = Visit(browser, path)
        opened.append(v)
        return v

    yield open_
    for v in opened:
        v.close()


@pytest.mark.parametrize("name", ["report.html", "diff.html"])
def test_page_loads_without_errors_or_requests_beyond_its_file(folders, visit, name):
    v = visit(folders / name)
    assert v.foreign == []
    assert v.errors == []
    assert [u for u in v.requests if not u.startswith("data:")] == [v.url]
    assert v.page.title()


@pytest.mark.parametrize("name, charts", [("report.html", 6), ("diff.html", 2)])
def test_every_chart_is_visible_with_a_size(folders, visit, name, charts):
    v = visit(folders / name)
    images = v.page.locator("figure img")
    assert images.count() == charts
    for i in range(charts):
        img = images.nth(i)
        img.scroll_into_view_if_needed()
        assert img.is_visible()
        box = img.bounding_box()
        assert box is not None and box["width"] > 50 and box["height"] > 50, box
        assert img.evaluate("el => el.complete && el.naturalWidth > 0 && el.naturalHeight > 0")


def test_hostile_account_id_is_text_and_runs_nothing(folders, visit):
    v = visit(folders / "report.html")
    cells = v.page.locator("td").filter(has_text=IMG)
    assert cells.count() >= 1
    assert IMG in cells.first.inner_text()
    assert v.page.locator('img[src="x"]').count() == 0
    assert v.dialogs == []
    assert v.errors == []


def test_breached_limit_is_shown_in_red(folders, visit):
    v = visit(folders / "report.html")
    row = v.page.locator("tr.breached").first
    assert "Worst bad debt" in row.inner_text()
    assert row.locator("td").evaluate("el => getComputedStyle(el).color") == "rgb(176, 58, 46)"
    assert v.page.locator(".breach").is_visible()


def test_clicking_a_header_sorts_the_table(folders, visit):
    v = visit(folders / "report.html")
    table = v.page.locator("h2#accounts ~ table.sortable").first
    header = table.locator("thead th", has_text="Worst shortfall (USD)")
    col = header.evaluate("el => el.cellIndex")

    def values():
        return table.evaluate(
            f"t => Array.from(t.tBodies[0].rows, r => parseFloat(r.cells[{col}].getAttribute('data-v')))")

    before = values()
    assert before == sorted(before, reverse=True)  # as written: largest shortfall first
    header.click()
    assert values() == sorted(before)
    header.click()
    assert values() == sorted(before, reverse=True)
    assert v.errors == []
