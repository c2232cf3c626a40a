"""build-image: the user image from images/, built only when its inputs change.

OCI builders (buildah, podman, docker) push to the site's registry and pin the
image by digest; when the registry already holds the content-hash tag, nothing
is built. Where no container tool exists, a venv from the same lock file is
the fallback.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows._common import artifact_key, open_site
from olab.config import Site
from olab.guard import site_guard
from olab.models import BuildResult, ImageRef
from olab.planning import image_tag, plan_build
from olab.state import update_state
from tasks.oci import build_and_push, containerfile_base, engine_for, ensure_debootstrap_base, insecure_registries, resolve_builder
from tasks.python_env import build_environment, find_environment, read_context, venv_tag
from tasks.registry import Registry, ensure_local_registry


def _build_venv(site: Site) -> BuildResult:
    settings = site.config.image
    context = site.image_context
    tag = venv_tag(context)
    existing = find_environment(site.paths.envs, settings.name, tag)
    plan = plan_build(tag, existing)
    get_run_logger().info(plan.reason)
    if plan.build:
        return build_environment(settings.name, context, site.paths.envs, tag)
    return BuildResult(image=existing, built=False, seconds=0.0)


def _build_oci(site: Site, builder: str) -> BuildResult:
    logger = get_run_logger()
    settings = site.config.image
    context = site.image_context
    engine = engine_for(builder, site.paths.containers, insecure_registries(site))
    registry = (
        ensure_local_registry(site.paths.containers, settings.registry)
        if settings.local_registry
        else Registry(settings.registry, insecure=False)
    )
    files = read_context(context)
    base = settings.base_image or containerfile_base(context)
    if base is None:
        raise ValueError(f"{context / 'Containerfile'}: no ARG BASE_IMAGE default and no image.base_image in {site.source}")
    if base.startswith("debootstrap:"):
        base = ensure_debootstrap_base(engine, base.split(":", 1)[1], site.paths.containers)
    # The base's own content is an input: a new base under the same name is a new image.
    base_id = engine.ensure_local(base)
    tag = image_tag({**files, "\0base": f"{base}@{base_id}".encode()}, "any", "oci")
    short = tag[:20]
    repository = registry.repository(settings.name)
    existing = registry.manifest_digest(settings.name, short)
    if existing:
        logger.info("registry %s already has %s:%s; nothing to build", settings.registry, settings.name, short)
        image = ImageRef(name=settings.name, tag=short, digest=existing, builder=builder, location=f"{repository}:{short}", repository=repository)
        return BuildResult(image=image, built=False, seconds=0.0)
    digest, seconds = build_and_push(engine, context, repository, short, base)
    image = ImageRef(name=settings.name, tag=short, digest=digest, builder=builder, location=f"{repository}:{short}", repository=repository)
    return BuildResult(image=image, built=True, seconds=seconds)


@flow(name="build-image")
def build_image(site: str = "local") -> ImageRef:
    """Build the site's user image from its lock file, keyed by content hash."""
    the_site = open_site(site)
    with site_guard(the_site):
        builder = resolve_builder(the_site.config.image.builder)
        get_run_logger().info("builder: %s", builder)
        result = _build_venv(the_site) if builder == "venv" else _build_oci(the_site, builder)
        update_state(the_site, image=result.image)
        create_markdown_artifact(
            key=artifact_key(the_site, "build-image"),
            description=f"build-image on {the_site.name}",
            markdown="\n".join(
                [
                    f"# build-image: {the_site.name}",
                    "",
                    f"- image: `{result.image.pinned}`",
                    f"- builder: {result.image.builder}, context `{the_site.image_context}`",
                    f"- {'built' if result.built else 'unchanged, nothing built'} ({result.seconds:.1f}s)",
                    f"- location: `{result.image.location}`",
                ]
            ),
        )
        return result.image
