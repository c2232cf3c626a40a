"""The per-site lock: lifecycle flows on one site never interleave."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow

from core.config import load_site
from core.guard import site_guard

pytestmark = pytest.mark.slow  # a Prefect server holds the lock


# Prefect copies flow parameters, so the flows report through this module-level log.
LOG: list = []
# Flows on different sites meet here while both hold their own site's lock.
MEETING = threading.Barrier(2, timeout=60)


@flow(name="guarded-step")
def guarded_step(site: str, seconds: float, meet: bool = False) -> None:
    the_site = load_site(site)
    with site_guard(the_site):
        LOG.append(("start", site, time.monotonic()))
        if meet:
            MEETING.wait()
        with site_guard(the_site):  # re-entrant, as release -> deploy-hub needs
            time.sleep(seconds)
        LOG.append(("end", site, time.monotonic()))


def _run_together(*sites: str, meet: bool = False) -> list:
    LOG.clear()
    log = LOG
    threads = [threading.Thread(target=guarded_step, args=(s, 3.0, meet)) for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return log


def spans(log: list, site: str) -> list[tuple[float, float]]:
    starts = [t for kind, s, t in log if kind == "start" and s == site]
    ends = [t for kind, s, t in log if kind == "end" and s == site]
    return list(zip(sorted(starts), sorted(ends)))


def test_two_flows_on_one_site_run_one_after_the_other(make_site):
    path = str(make_site("guard"))
    log = _run_together(path, path)
    (a_start, a_end), (b_start, b_end) = spans(log, path)
    assert a_end <= b_start, f"flows interleaved: {log}"


def test_flows_on_different_sites_may_overlap(make_site):
    one, two = str(make_site("g1")), str(make_site("g2"))
    MEETING.reset()
    log = _run_together(one, two, meet=True)
    # Both reached the end only if each was inside its lock while the other was.
    assert len(spans(log, one)) == 1 and len(spans(log, two)) == 1, f"different sites were serialised: {log}"
