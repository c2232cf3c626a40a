"""A student's browser: Debian's Chromium driven by Playwright, looking at a user's server.

Why a browser and not HTTP: a dashboard can answer 200 and still show raw ``$...$``
formulas, ask a CDN a classroom cannot reach for its fonts and MathJax, log errors, or
carry a slider whose callback is broken. Only a page that runs its JavaScript, connects
its kernel and is moved by a keyboard shows that.

Playwright drives Debian's ``chromium`` (``./setup.sh`` installs it), never a browser of
its own: its download cannot work offline. The user's short-lived token travels only in
the browser context's request headers (through Playwright's pipe to the browser, never
argv), the kernel's WebSocket handshake included (Chromium applies them there too: no
cookie is ever set, and the kernel answers), and only to the site's own origin: every
request to another host is aborted and listed, as a classroom network would drop it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.browser_verdict import origin
from core.logs import task_logger
from core.models import DashboardObservation, FailedRequest, UserLogin

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home (updates, sync,
# safe browsing), which on a closed network is a stream of failing requests.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
SCREENSHOTS_KEPT = 10
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# Runs in the page: what the student sees of formulas, widgets, errors and links.
_LOOK = r"""() => {
  const hidden = 'mjx-container, .MathJax, .MathJax_CHTML, .MathJax_SVG, .MathJax_Preview, code, pre, script, style';
  const raw = [];
  for (const el of document.querySelectorAll('.jp-RenderedMarkdown, .jp-RenderedHTMLCommon')) {
    if (el.parentElement && el.parentElement.closest('.jp-RenderedMarkdown, .jp-RenderedHTMLCommon')) continue;
    // Its text outside typeset math and code (walked, not cloned: a cloned <img> loads again).
    let text = '';
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
      if (!walker.currentNode.parentElement.closest(hidden)) text += walker.currentNode.nodeValue;
    }
    for (const m of text.matchAll(/\$\$[\s\S]+?\$\$|\$[^$\s](?:[^$\n]*?[^$\s])?\$/g)) raw.push(m[0]);
  }
  // Tracebacks, not every stderr output (a library's warning is no error).
  const errors = [];
  for (const el of document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]')) {
    if (!el.textContent.includes('Traceback')) continue;
    const lines = el.textContent.split('\n').map(l => l.trim()).filter(l => l);
    errors.push(lines[lines.length - 1]);
  }
  const here = location.href.split('#')[0];
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href.split('#')[0])
    .filter(h => h.includes('/voila/render/') && h !== here);
  return {
    title: document.title,
    typeset: document.querySelectorAll('mjx-container, .MathJax_CHTML, .MathJax_SVG').length,
    raw: raw,
    widgets: document.querySelectorAll('.jupyter-widgets').length,
    errors: errors,
    links: [...new Set(links)],
  };
}"""

# A short fingerprint of every output area's content (plots included), to see it change.
_OUTPUTS = r"""() => {
  let outputs = [...document.querySelectorAll('.widget-output')];
  if (!outputs.length) outputs = [...document.querySelectorAll('.jp-OutputArea-output')];
  let text = '';
  for (const o of outputs) {
    text += '|' + o.textContent;
    for (const img of o.querySelectorAll('img')) text += '|' + img.src;
    for (const svg of o.querySelectorAll('svg')) text += '|' + svg.outerHTML;
  }
  let h = 2166136261;
  for (let i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 16777619); }
  return outputs.length + ':' + text.length + ':' + (h >>> 0);
}"""


class BrowserMissing(RuntimeError):
    """No browser to look with; the message says how to get one (or to turn the check off)."""


def chromium() -> Path:
    """Debian's Chromium, or BrowserMissing in one line."""
    found = shutil.which("chromium") or (str(CHROMIUM) if CHROMIUM.exists() else None)
    if not found:
        raise BrowserMissing(
            "the browser health check needs Debian's chromium, which is not installed: run ./setup.sh as root "
            "(it installs it), or set labs.browser_check: false in the site file"
        )
    return Path(found)


class StudentBrowser:
    """One browser session as one user: every page it opens is observed the same way."""

    def __init__(self, login: UserLogin, *, timeout: float, react_seconds: float = 30.0):
        self.login = login
        self.origin = origin(login.hub_url)
        self.timeout_ms = timeout * 1000
        self.react_seconds = react_seconds
        self.context = None  # the browser context, while a session is open
        self._foreign: list[str] = []

    @contextmanager
    def session(self) -> Iterator[StudentBrowser]:
        from playwright.sync_api import sync_playwright

        args = CHROMIUM_ARGS + (["--no-sandbox"] if os.geteuid() == 0 else [])  # Chromium's sandbox refuses root
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(chromium()), args=args)
            try:
                self.context = browser.new_context(
                    extra_http_headers={"Authorization": f"token {self.login.token.get_secret_value()}"},
                    viewport={"width": 1280, "height": 900},
                )
                self.context.route("**/*", self._only_own_origin)
                yield self
            finally:
                self.context = None
                browser.close()

    def _only_own_origin(self, route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or origin(url) == self.origin:
            route.fallback()
        else:
            self._foreign.append(url)
            route.abort("blockedbyclient")

    def view(self, url: str, *, move_slider: bool = True, screenshot: Path | None = None) -> DashboardObservation:
        """Open a page, let it settle, look at it; on a dashboard move its first slider."""
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        started = time.monotonic()
        page = self.context.new_page()
        self._foreign.clear()
        requests: list[str] = []
        failed: list[FailedRequest] = []
        console: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("response", lambda response: response.status >= 400 and _add(
            failed, FailedRequest(url=response.url, reason=str(response.status))))
        page.on("requestfailed", lambda request: self._failed(request, failed))
        page.on("console", lambda message: message.type == "error" and _worth_reporting(message.text)
                and console.append(message.text))
        page.on("pageerror", lambda error: console.append(f"uncaught {error.name}: {error.message}"))
        error = None
        slider = values = changed = None
        try:
            page.goto(url, wait_until="load", timeout=self.timeout_ms)
            page.wait_for_load_state("networkidle", timeout=self.timeout_ms)
            if WIDGET_MIME in page.content():
                try:
                    page.wait_for_selector(".jupyter-widgets", timeout=self.timeout_ms)
                except PlaywrightError:
                    pass  # the observation says no widget rendered
            self._settle_formulas(page)
            if move_slider:
                slider, values, changed = self._move_slider(page)
        except PlaywrightTimeout:
            error = f"not loaded after {self.timeout_ms / 1000:.0f}s"
        except PlaywrightError as exc:
            error = exc.message.splitlines()[0] if exc.message else type(exc).__name__
        try:
            seen = page.evaluate(_LOOK)
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
        except PlaywrightError as exc:  # a page that crashed: what was seen so far still counts
            seen = {"title": "", "typeset": 0, "raw": [], "widgets": 0, "errors": [], "links": []}
            error = error or exc.message.splitlines()[0]
            screenshot = screenshot if screenshot is not None and screenshot.exists() else None
        try:
            return DashboardObservation(
                requested=url,
                landed=page.url,
                error=error,
                title=seen["title"],
                requests=len(requests),
                failed_requests=failed,
                foreign_requests=list(self._foreign),
                console_errors=console,
                typeset_formulas=seen["typeset"],
                raw_formulas=seen["raw"],
                widget_views=seen["widgets"],
                error_outputs=seen["errors"],
                links=seen["links"],
                slider=slider,
                slider_values=values,
                output_changed=changed,
                screenshot=screenshot,
                seconds=time.monotonic() - started,
            )
        finally:
            page.close()

    def _failed(self, request, failed: list[FailedRequest]) -> None:
        reason = request.failure or "failed"
        if "ERR_BLOCKED_BY_CLIENT" in reason and request.url in self._foreign:
            return  # listed as foreign, not as failed
        _add(failed, FailedRequest(url=request.url, reason=reason))

    def _settle_formulas(self, page) -> None:
        """MathJax typesets after the page has loaded: wait until no raw formula is left or
        it has had its time (a MathJax that never loaded leaves them raw)."""
        deadline = time.monotonic() + min(15.0, self.react_seconds)
        while time.monotonic() < deadline and page.evaluate(_LOOK)["raw"]:
            page.wait_for_timeout(250)

    def _move_slider(self, page) -> tuple[str | None, tuple[str, str] | None, bool | None]:
        """Move the first slider by keyboard (its handle is focusable, as for a student
        without a mouse) and wait for the outputs to change and settle."""
        handle = page.locator('.jupyter-widgets [role="slider"]').first
        if handle.count() == 0:
            return None, None, None
        label = handle.evaluate(
            "h => (h.closest('.widget-slider, .widget-hslider, .widget-vslider')"
            "?.querySelector('.widget-label')?.textContent || h.getAttribute('aria-label') || 'slider').trim()"
        )
        handle.scroll_into_view_if_needed()
        before_value = _value(handle)
        before = page.evaluate(_OUTPUTS)
        handle.focus()
        page.keyboard.press("ArrowRight")
        after_value = _value(handle)
        if after_value == before_value:  # at its maximum
            page.keyboard.press("ArrowLeft")
            after_value = _value(handle)
        if after_value == before_value:
            return label, (before_value, after_value), False
        deadline = time.monotonic() + self.react_seconds
        current = before
        while time.monotonic() < deadline:
            page.wait_for_timeout(250)
            current = page.evaluate(_OUTPUTS)
            if current != before:
                break
        if current == before:
            return label, (before_value, after_value), False
        # Interactive outputs are cleared, then drawn: wait until they hold still.
        stable_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - stable_since < 1.5:
            page.wait_for_timeout(250)
            now = page.evaluate(_OUTPUTS)
            if now != current:
                current, stable_since = now, time.monotonic()
        return label, (before_value, after_value), True


def _add(failed: list[FailedRequest], request: FailedRequest) -> None:
    # A page that asks twice for a missing file (an image drawn again) shows one problem.
    if request not in failed:
        failed.append(request)


def _value(handle) -> str:
    # The text a student reads beside the slider when there is one (an IntSlider's "2", not "2.0").
    return handle.get_attribute("aria-valuetext") or handle.get_attribute("aria-valuenow") or ""


def _worth_reporting(text: str) -> bool:
    # "Failed to load resource" repeats a failed or blocked request, which is listed with its URL.
    return not text.startswith("Failed to load resource")


def screenshot_path(folder: Path, lab: str) -> Path:
    """Where the next screenshot of a lab goes: named by UTC time and lab, nothing else."""
    return folder / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{lab}.png"


def prune_screenshots(folder: Path, keep: int = SCREENSHOTS_KEPT) -> None:
    shots = sorted(folder.glob("*.png"))
    for old in shots[: max(0, len(shots) - keep)]:
        old.unlink(missing_ok=True)


@task(name="dashboard-in-browser", cache_policy=NO_CACHE)
def view_dashboard(login: UserLogin, path: str, screenshot: Path, timeout: float) -> DashboardObservation:
    """Open one page of the user's server as they would (``path`` under /user/<name>/),
    move its first slider, save a screenshot; older screenshots beyond the last few go."""
    logger = task_logger()
    logger.info("opening %s in Chromium as %s (a slider moved, a screenshot)", path, login.user)
    with StudentBrowser(login, timeout=timeout).session() as browser:
        seen = browser.view(login.server_url(path), screenshot=screenshot)
    prune_screenshots(screenshot.parent)
    logger.info(
        "%s: %d requests (%d failed, %d to other hosts), %d formulas typeset, %d raw, %d widget views, slider %s: %s",
        path, seen.requests, len(seen.failed_requests), len(seen.foreign_requests), seen.typeset_formulas,
        len(seen.raw_formulas), seen.widget_views, seen.slider, "output changed" if seen.output_changed else "no change",
    )
    return seen
