"""The browser check's verdict: what a student would have seen, from an observation (no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.browser_verdict import BROWSER_CHECK, browser_check, problems, summary, verdict
from core.config import ConfigError, load_site
from core.models import DashboardObservation, FailedRequest

SITE = "http://127.0.0.1:8000"
PAGE = f"{SITE}/user/olab-health/voila/render/labs/lorenz.ipynb"


def seen(**changes) -> DashboardObservation:
    """A dashboard a student would find nothing wrong with; each test breaks one thing."""
    good = dict(
        requested=PAGE, landed=PAGE, title="lorenz", requests=80, typeset_formulas=31, widget_views=7,
        slider="σ", slider_values=("10.0", "10.5"), output_changed=True, seconds=12.5,
        screenshot=Path("/srv/olab/runtime/logs/health/20260101T000000Z-lorenz.png"),
    )
    return DashboardObservation(**{**good, **changes})


def test_a_working_dashboard_passes_and_says_what_was_looked_at():
    assert problems(seen()) == [] and verdict(seen()) is None
    assert summary(seen()) == ("labs/lorenz.ipynb: 31 formulas typeset, 7 widget views, slider σ 10.0 -> 10.5 "
                               "redrew the output, 80 requests, none failed or to other hosts")
    check = browser_check(seen())
    assert check.name == BROWSER_CHECK and check.ok and check.seconds == 12.5
    assert check.link == "/srv/olab/runtime/logs/health/20260101T000000Z-lorenz.png"


def test_failed_requests_are_named_by_their_path_and_status():
    page = seen(failed_requests=[
        FailedRequest(url=f"{SITE}/user/olab-health/files/labs/x.png", reason="404"),
        FailedRequest(url=f"{SITE}/user/olab-health/voila/static/" + "a" * 80 + ".js", reason="net::ERR_CONNECTION_RESET"),
    ])
    line = verdict(page)
    assert line is not None and line.startswith("2 requests failed: /user/olab-health/files/labs/x.png (404), ...")
    assert line.endswith("aaaa.js (net::ERR_CONNECTION_RESET)")
    assert not browser_check(page).ok and browser_check(page).detail == line


def test_requests_to_other_hosts_name_the_host_and_only_the_first_few():
    cdns = [f"https://cdn{i}.example.org/mathjax/es5/latest.min.js" for i in range(5)]
    assert verdict(seen(foreign_requests=cdns)) == (
        "5 requests to other hosts, which a classroom may not reach: cdn0.example.org/mathjax/es5/latest.min.js, "
        "cdn1.example.org/mathjax/es5/latest.min.js, cdn2.example.org/mathjax/es5/latest.min.js and 2 more"
    )


def test_raw_formulas_are_quoted_as_the_student_saw_them():
    page = seen(typeset_formulas=0, raw_formulas=["$\\dot x$", "$\\rho$"])
    assert verdict(page) == "formulas not typeset: raw `$\\dot x$` on the page and 1 more"
    long = "$$\n" + "x + " * 30 + "y\n$$"
    assert verdict(seen(raw_formulas=[long])) == "formulas not typeset: raw `$$ x + x + x + x + x + x + x + x + x...` on the page"


def test_a_slider_that_does_not_change_the_output_is_named():
    assert verdict(seen(output_changed=False)) == "slider σ moved (10.0 -> 10.5), output unchanged"
    assert verdict(seen(slider_values=("10.0", "10.0"), output_changed=False)) == "slider σ did not move with the keyboard"
    assert verdict(seen(slider=None, slider_values=None, output_changed=None)) == "no slider to move"
    assert verdict(seen(widget_views=0, slider=None, slider_values=None, output_changed=None)) == "no widget rendered"


def test_a_callback_that_raises_is_named_by_its_exception():
    page = seen(error_outputs=["ZeroDivisionError: float division by zero"])
    assert verdict(page) == "slider moved, the output shows an error: ZeroDivisionError: float division by zero"
    # An error shown without any slider having redrawn it: on the page from the start.
    assert verdict(seen(output_changed=False, error_outputs=["NameError: name 'x' is not defined"])) == (
        "slider σ moved (10.0 -> 10.5), output unchanged; the page shows an error: NameError: name 'x' is not defined"
    )


def test_console_errors_give_the_first_and_count_the_rest():
    page = seen(console_errors=["Uncaught TypeError: x is undefined", "second", "third"])
    assert verdict(page) == "console: Uncaught TypeError: x is undefined (and 2 more)"
    assert len(verdict(seen(console_errors=["e" * 500]))) == len("console: ") + 160


def test_a_page_that_did_not_open_or_asked_for_a_login_says_so_and_nothing_about_widgets():
    broken = seen(error="Timeout 120000ms exceeded.", widget_views=0, slider=None, slider_values=None, output_changed=None)
    assert verdict(broken) == "the page did not open: Timeout 120000ms exceeded."
    login = seen(landed=f"{SITE}/hub/login?next=%2Fuser%2Folab-health%2F", widget_views=0, slider=None,
                 slider_values=None, output_changed=None)
    assert verdict(login).startswith("sent to the hub's login page instead of labs/lorenz.ipynb; no widget rendered")


def test_the_lab_index_needs_no_widget_but_the_same_clean_page():
    index = seen(requested=f"{SITE}/user/u/", landed=f"{SITE}/user/u/voila/render/labs/index.ipynb",
                 widget_views=0, slider=None, slider_values=None, output_changed=None)
    assert verdict(index, dashboard=False) is None
    assert verdict(index) == "no widget rendered"
    assert verdict(index.model_copy(update={"raw_formulas": ["$x$"]}), dashboard=False) == "formulas not typeset: raw `$x$` on the page"


def test_several_problems_make_one_line_worst_first():
    page = seen(failed_requests=[FailedRequest(url=f"{SITE}/a.png", reason="404")], raw_formulas=["$x$"],
                output_changed=False, console_errors=["boom"])
    line = verdict(page)
    assert "\n" not in line
    assert line == ("1 request failed: /a.png (404); formulas not typeset: raw `$x$` on the page; "
                    "slider σ moved (10.0 -> 10.5), output unchanged; console: boom")


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("no", False), (0, False)])
def test_the_browser_check_setting_takes_only_true_or_false(tmp_path, value, ok):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "runtime_dir": str(tmp_path / "rt"), "labs": {"browser_check": value}}))
    if ok:
        assert load_site(str(path)).config.labs.browser_check is value
    else:
        with pytest.raises(ConfigError, match=r"labs\.browser_check: Input should be a valid boolean"):
            load_site(str(path))


def test_the_browser_check_is_on_unless_a_site_turns_it_off(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "runtime_dir": str(tmp_path / "rt")}))
    assert load_site(str(path)).config.labs.browser_check is True
