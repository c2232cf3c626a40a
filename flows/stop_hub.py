"""stop-hub: stop the site's hub and every user server; all data stays."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from flows._common import open_site
from olab.guard import site_guard
from olab.state import load_state
from tasks.jupyterhub import stop_hub as stop_hub_process


@flow(name="stop-hub")
def stop_hub(site: str = "local") -> bool:
    """Returns whether a hub was running."""
    the_site = open_site(site)
    with site_guard(the_site):
        hub = load_state(the_site).hub
        stopped = stop_hub_process(hub)
        get_run_logger().info(
            "stopped hub pid %d" % hub.pid if stopped else "no hub was running for site %s" % the_site.name
        )
        return stopped
