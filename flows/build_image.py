"""build-image: the user environment from images/, built only when its inputs change."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows._common import artifact_key, open_site
from olab.guard import site_guard
from olab.models import BuildResult, ImageRef
from olab.planning import plan_build
from olab.state import update_state
from tasks.python_env import build_environment, find_environment, venv_tag


@flow(name="build-image")
def build_image(site: str = "local") -> ImageRef:
    """Build the site's user environment from its lock file, keyed by content hash."""
    the_site = open_site(site)
    logger = get_run_logger()
    with site_guard(the_site):
        settings = the_site.config.image
        context = the_site.image_context
        tag = venv_tag(context)
        existing = find_environment(the_site.paths.envs, settings.name, tag)
        plan = plan_build(tag, existing)
        logger.info(plan.reason)
        if plan.build:
            result = build_environment(settings.name, context, the_site.paths.envs, tag)
        else:
            result = BuildResult(image=existing, built=False, seconds=0.0)
        update_state(the_site, image=result.image)
        create_markdown_artifact(
            key=artifact_key(the_site, "build-image"),
            description=f"build-image on {the_site.name}",
            markdown="\n".join(
                [
                    f"# build-image: {the_site.name}",
                    "",
                    f"- image: `{result.image.pinned}`",
                    f"- builder: {result.image.builder}, context `{context}`",
                    f"- {'built' if result.built else 'unchanged, nothing built'} ({result.seconds:.1f}s)",
                    f"- location: `{result.image.location}`",
                ]
            ),
        )
        return result.image
