"""deploy-hub: the site's JupyterHub, started or reconfigured in place, then checked."""

from __future__ import annotations

import os

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows._common import artifact_key, open_site
from olab.config import Site
from olab.files import content_hash
from olab.guard import site_guard
from olab.models import HealthReport, HubDeployment, ImageRef
from olab.planning import hub_config_hash, hub_settings, hub_template, plan_hub
from olab.secrets import SecretStore
from olab.state import load_state, read_mark, update_state
from tasks.jupyterhub import apply_hub, health_check, is_running, proxy_command
from tasks.notebooks import discover_labs, stage_lab
from tasks.oci import engine_for, insecure_registries


class NothingToDeploy(RuntimeError):
    pass


class SiteTornDown(RuntimeError):
    pass


def health_markdown(report: HealthReport) -> list[str]:
    lines = ["| check | ok | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {'yes' if c.ok else 'NO'} | {c.seconds:.1f} | {c.detail} |" for c in report.checks]
    return lines


def check_hub(site: Site) -> HealthReport:
    """The health check on the live hub, recorded in the site's state."""
    report = health_check(site, site.config.labs.health_check_lab)
    update_state(site, health=report)
    return report


@flow(name="deploy-hub")
def deploy_hub(site: str = "local", image: ImageRef | None = None, check: bool = True) -> HubDeployment:
    """Run the hub on the given image (default: the last one built), then check it."""
    the_site = open_site(site)
    logger = get_run_logger()
    with site_guard(the_site):
        mark = read_mark(the_site)
        if mark is not None:
            raise SiteTornDown(
                f"site {the_site.name} is torn down (restore point {mark.restore_point}); run `olab restore`, not deploy"
            )
        state = load_state(the_site)
        image = image or state.image
        if image is None:
            raise NothingToDeploy(f"site {the_site.name}: no image built yet; run `olab build` (or `olab up`) first")
        paths = the_site.paths
        SecretStore(paths.secrets).load_or_create()
        labs = discover_labs(the_site.labs_dir)
        for lab in labs:
            stage_lab(lab, paths.labs)
        socket = None
        if image.is_oci:
            engine = engine_for(image.builder, paths.containers, insecure_registries(the_site))
            engine.ensure_local(image.pinned)
            socket = engine.ensure_api_socket()
        settings = hub_settings(
            the_site, image, proxy_command=proxy_command(), run_as_root=os.geteuid() == 0, docker_socket=socket
        )
        template = hub_template()
        config_hash = hub_config_hash(settings, template, content_hash((l.name, l.content_hash.encode()) for l in labs))
        action = plan_hub(config_hash, state.hub, is_running(state.hub))
        logger.info("hub plan: %s", action)
        deployment = apply_hub(the_site, image, settings, template, config_hash, action, state.hub)
        update_state(the_site, hub=deployment)
        report = check_hub(the_site) if check else None
        create_markdown_artifact(
            key=artifact_key(the_site, "deploy-hub"),
            description=f"deploy-hub on {the_site.name}: {action}",
            markdown="\n".join(
                [
                    f"# deploy-hub: {the_site.name}",
                    "",
                    f"- hub: {deployment.url} (pid {deployment.pid}), action: **{action}**",
                    f"- image: `{image.pinned}`",
                    f"- config: `{config_hash[:16]}`, labs: {', '.join(l.name for l in labs)}",
                    f"- admins: {', '.join(the_site.config.hub.admins)}; passwords in `{paths.secrets}` (0600)",
                    "",
                    *(health_markdown(report) if report else ["health check skipped"]),
                ]
            ),
        )
        return deployment
