"""What a student would have seen of a page, from a browser's observation: pass, or one line.

Pure: the browser (``tasks/browser.py``) observes, this judges, so every way a dashboard
can look broken is tested without a browser.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from core.models import Check, DashboardObservation

BROWSER_CHECK = "dashboard in a browser"
SHOWN = 3  # examples named per problem; the rest are counted


def _short(url: str, site: str) -> str:
    """A request as a line can hold it: on the site's own origin its path (the tail kept,
    where the file's name is); on another host that host and the start of the path."""
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}" == site:
        text = parts.path + (f"?{parts.query}" if parts.query else "")
        return text if len(text) <= 70 else "..." + text[-67:]
    text = parts.netloc + parts.path
    return text if len(text) <= 70 else text[:67] + "..."


def origin(url: str) -> str:
    """scheme://host:port: what a browser counts as one site."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _listed(items: list[str]) -> str:
    more = len(items) - SHOWN
    return ", ".join(items[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def page_name(seen: DashboardObservation) -> str:
    path = urlsplit(seen.requested).path
    return path.split("/voila/render/", 1)[1] if "/voila/render/" in path else path


def problems(seen: DashboardObservation, *, dashboard: bool = True) -> list[str]:
    """Each thing a student would have noticed, worst first. ``dashboard``: the page is a lab
    whose widgets must render and whose first slider must redraw its output (not the index)."""
    site = origin(seen.requested)
    found: list[str] = []
    if seen.error:
        found.append(f"the page did not open: {seen.error}")
    if "/hub/login" in urlsplit(seen.landed).path:
        found.append(f"sent to the hub's login page instead of {page_name(seen)}")
    if seen.failed_requests:
        shown = [f"{_short(r.url, site)} ({r.reason})" for r in seen.failed_requests]
        found.append(f"{_plural(len(shown), 'request')} failed: {_listed(shown)}")
    if seen.foreign_requests:
        shown = [_short(url, site) for url in seen.foreign_requests]
        found.append(f"{_plural(len(shown), 'request')} to other hosts, which a classroom may not reach: {_listed(shown)}")
    if seen.raw_formulas:
        first = " ".join(seen.raw_formulas[0].split())
        first = first if len(first) <= 40 else first[:37].rstrip() + "..."
        more = len(seen.raw_formulas) - 1
        found.append(f"formulas not typeset: raw `{first}` on the page" + (f" and {more} more" if more else ""))
    moved = seen.slider_values is not None and seen.slider_values[0] != seen.slider_values[1]
    if dashboard and not seen.error:
        if seen.widget_views == 0:
            found.append("no widget rendered")
        elif seen.slider is None:
            found.append("no slider to move")
        elif not moved:
            found.append(f"slider {seen.slider} did not move with the keyboard")
        elif seen.output_changed is False:
            before, after = seen.slider_values
            found.append(f"slider {seen.slider} moved ({before} -> {after}), output unchanged")
    if seen.error_outputs:
        what = "slider moved, the output shows" if dashboard and moved and seen.output_changed else "the page shows"
        found.append(f"{what} an error: {_listed(seen.error_outputs)}")
    if seen.console_errors:
        first = seen.console_errors[0]
        first = first if len(first) <= 160 else first[:157] + "..."
        more = len(seen.console_errors) - 1
        found.append(f"console: {first}" + (f" (and {more} more)" if more else ""))
    return found


def verdict(seen: DashboardObservation, *, dashboard: bool = True) -> str | None:
    """None when a student would have seen nothing wrong; else one line saying what they saw."""
    found = problems(seen, dashboard=dashboard)
    return "; ".join(found) if found else None


def summary(seen: DashboardObservation) -> str:
    """A passed page in one line: what was looked at."""
    parts = [f"{page_name(seen)}: {_plural(seen.typeset_formulas, 'formula')} typeset",
             _plural(seen.widget_views, "widget view")]
    if seen.slider is not None and seen.slider_values is not None:
        before, after = seen.slider_values
        parts.append(f"slider {seen.slider} {before} -> {after} redrew the output")
    parts.append(f"{_plural(seen.requests, 'request')}, none failed or to other hosts")
    return ", ".join(parts)


def browser_check(seen: DashboardObservation) -> Check:
    """The health check's browser step: a lab's dashboard as a student sees it."""
    problem = verdict(seen)
    return Check(
        name=BROWSER_CHECK,
        ok=problem is None,
        detail=problem or summary(seen),
        seconds=seen.seconds,
        link=str(seen.screenshot) if seen.screenshot else None,
    )
