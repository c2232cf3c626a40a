"""provision-cluster: what the hub runs on. For the local target: this machine."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows._common import artifact_key, open_site
from olab.guard import site_guard
from olab.models import ProvisionReport
from olab.state import load_state
from tasks.host import prepare_local_host


class ProvisionFailed(RuntimeError):
    pass


@flow(name="provision-cluster")
def provision_cluster(site: str = "local") -> ProvisionReport:
    """Prepare the site's runtime folders and secret store; check ports and tools."""
    the_site = open_site(site)
    with site_guard(the_site):
        checks = prepare_local_host(the_site, load_state(the_site).hub)
        report = ProvisionReport(site=the_site.name, target=the_site.config.target.value, checks=checks)
        create_markdown_artifact(
            key=artifact_key(the_site, "provision-cluster"),
            description=f"provision-cluster on {the_site.name}",
            markdown="\n".join(
                [f"# provision-cluster: {the_site.name} (local machine)", "", "| check | ok | detail |", "|---|---|---|"]
                + [f"| {c.name} | {'yes' if c.ok else 'NO'} | {c.detail} |" for c in checks]
            ),
        )
        failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
        if failed:
            raise ProvisionFailed("; ".join(failed))
        return report
