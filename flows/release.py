"""release: build-image -> test-notebooks -> deploy-hub -> health check (what CI runs)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows._common import artifact_key, open_site
from flows.build_image import build_image
from flows.deploy_hub import check_hub, deploy_hub, health_markdown
from flows.test_notebooks import test_notebooks
from olab.guard import site_guard
from olab.models import ReleaseResult


@flow(name="release")
def release(site: str = "local") -> ReleaseResult:
    """Ship the labs: a failing lab stops the release before anything is deployed."""
    the_site = open_site(site)
    with site_guard(the_site):
        image = build_image(site=site)
        labs = test_notebooks(site=site, image=image)
        hub = deploy_hub(site=site, image=image, check=False)
        health = check_hub(the_site)
        create_markdown_artifact(
            key=artifact_key(the_site, "release"),
            description=f"release on {the_site.name}",
            markdown="\n".join(
                [
                    f"# release: {the_site.name}",
                    "",
                    f"- image `{image.pinned}`",
                    f"- labs: {len(labs.results)} passed ({sum(r.cached for r in labs.results)} unchanged, not rerun)",
                    f"- hub: {hub.url} ({hub.action})",
                    "",
                    *health_markdown(health),
                ]
            ),
        )
        return ReleaseResult(image=image, labs=labs, hub=hub, health=health)
