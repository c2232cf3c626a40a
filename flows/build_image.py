"""build-image: the user image from images/, built only when its inputs change.

OCI builders (buildah, podman, docker) push to the site's registry and pin the
image by digest; when the registry already holds the content-hash tag, nothing
is built. Where no container tool exists, a venv from the same lock file is
the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from prefect.logging import get_run_logger

from core.config import Site
from core.guard import site_guard
from core.models import BuildResult, FlowPlan, ImageRef, PlannedStep, RegistryAccess
from core.planning import image_tag, plan_build
from core.platform import Platform
from core.state import update_state
from flows._common import open_site, publish, publish_plan, subflow
from tasks.oci import (
    build_and_push,
    containerfile_base,
    debootstrap_ref,
    engine_for,
    ensure_debootstrap_base,
    resolve_builder,
)
from tasks.python_env import build_environment, find_environment, read_context, venv_tag
from tasks.registry import Registry


@dataclass(frozen=True)
class ImagePlan:
    """The image a build would produce: ``existing`` when its inputs are unchanged."""

    existing: ImageRef | None
    steps: list[PlannedStep]


def _plan_venv(site: Site) -> ImagePlan:
    settings = site.config.image
    tag = venv_tag(site.image_context)
    existing = find_environment(site.paths.envs, settings.name, tag)
    plan = plan_build(tag, existing)
    verb = "build" if plan.build else "reuse"
    return ImagePlan(existing if not plan.build else None, [PlannedStep(verb=verb, subject=f"venv {settings.name}:{tag[:16]}", detail=plan.reason)])


def _oci_inputs(site: Site, builder: str, access: RegistryAccess, *, dry_run: bool):
    """(engine, base, content tag (None while the base is missing), steps so far). Only a real run
    makes a missing base image; a dry run says it would."""
    settings = site.config.image
    context = site.image_context
    engine = engine_for(builder, site.paths.containers, [access.host] if access.insecure else [])
    files = read_context(context)
    base = settings.base_image or containerfile_base(context)
    if base is None:
        raise ValueError(f"{context / 'Containerfile'}: no ARG BASE_IMAGE default and no image.base_image in {site.source}")
    steps: list[PlannedStep] = []
    if base.startswith("debootstrap:"):
        suite = base.split(":", 1)[1]
        if dry_run:
            base = debootstrap_ref(suite)
            if engine.image_id(base) is None:
                steps.append(PlannedStep(verb="build", subject=f"base image {base}", detail="with debootstrap"))
        else:
            base = ensure_debootstrap_base(engine, suite, site.paths.containers)
    # The base's own content is an input: a new base under the same name is a new image.
    base_id = engine.image_id(base) if dry_run else engine.ensure_local(base)
    tag = image_tag({**files, "\0base": f"{base}@{base_id}".encode()}, "any", "oci")[:20] if base_id else None
    return engine, base, tag, steps


def _registry(access: RegistryAccess) -> Registry:
    return Registry(access.address, insecure=access.insecure, login=access.login)


def _image(site: Site, builder: str, access: RegistryAccess, tag: str, digest: str) -> ImageRef:
    repository = _registry(access).repository(site.config.image.name)
    return ImageRef(name=site.config.image.name, tag=tag, digest=digest, builder=builder, location=f"{repository}:{tag}", repository=repository)


def _plan_oci(site: Site, platform: Platform, builder: str) -> ImagePlan:
    settings = site.config.image
    access = platform.image_registry(prepare=False)
    _, base, tag, steps = _oci_inputs(site, builder, access, dry_run=True)
    registry = _registry(access)
    target = f"{registry.repository(settings.name)}:{tag or '<new content tag>'}"
    existing = registry.manifest_digest(settings.name, tag) if tag and registry.answers() else None
    if existing and platform.image_known(registry.repository(settings.name), existing):
        image = _image(site, builder, access, tag, existing)
        return ImagePlan(image, [PlannedStep(verb="reuse", subject=image.pinned, detail=f"{access.address} already has it")])
    if not registry.answers():
        steps.append(PlannedStep(verb="start", subject=f"registry {access.address}", detail="it does not answer"))
    steps.append(PlannedStep(verb="build", subject=target, detail=f"with {builder} on {base}, then push and pin by digest"))
    return ImagePlan(None, steps)


def plan_image(site: Site, platform: Platform) -> ImagePlan:
    """What build-image would do, changing nothing."""
    builder = resolve_builder(site.config.image.builder)
    return _plan_venv(site) if builder == "venv" else _plan_oci(site, platform, builder)


def _build_venv(site: Site) -> BuildResult:
    plan = _plan_venv(site)
    get_run_logger().info(plan.steps[0].detail)
    if plan.existing is not None:
        return BuildResult(image=plan.existing, built=False, seconds=0.0)
    return build_environment(site.config.image.name, site.image_context, site.paths.envs, venv_tag(site.image_context))


def _build_oci(site: Site, platform: Platform, builder: str) -> BuildResult:
    logger = get_run_logger()
    settings = site.config.image
    access = platform.image_registry()
    registry = _registry(access)
    engine, base, tag, _ = _oci_inputs(site, builder, access, dry_run=False)
    repository = registry.repository(settings.name)
    existing = registry.manifest_digest(settings.name, tag)
    if existing and not platform.image_known(repository, existing):
        # Never reused: built again and pushed over it, so what is pinned is olab's own build.
        logger.warning("registry %s has %s:%s at %s, which olab did not push there: building it again instead of using it",
                       access.address, settings.name, tag, existing)
    elif existing:
        logger.info("registry %s already has %s:%s; nothing to build", access.address, settings.name, tag)
        return BuildResult(image=_image(site, builder, access, tag, existing), built=False, seconds=0.0)
    digest, seconds = build_and_push(engine, site.image_context, repository, tag, base, access.login)
    platform.image_pushed(repository, digest)
    return BuildResult(image=_image(site, builder, access, tag, digest), built=True, seconds=seconds)


def image_for(site: str, the_site: Site, platform: Platform) -> tuple[ImageRef, str]:
    """The site's image for a flow that needs one (release, test-notebooks), and how it came:
    when its plan says the image exists (inputs unchanged), it is reused as is, with no
    build-image run; otherwise build-image runs as a subflow. Same image either way, recorded
    in the site's state; the caller's run log (and release's artifact) says which it was.

    A build-image run costs about 1 s even when it builds nothing (its flow run, its
    artifact, Prefect's heartbeat join): the price of every unchanged release and test.
    """
    planned = plan_image(the_site, platform)
    if planned.existing is None:
        return subflow(build_image, site=site), "from build-image"
    step = planned.steps[-1]
    get_run_logger().info("image %s unchanged (%s): reused, no build-image run", planned.existing.pinned, step.detail)
    update_state(the_site, image=planned.existing)
    return planned.existing, f"unchanged, reused ({step.detail}; no build-image run)"


@flow(name="build-image")
def build_image(site: str = "local", dry_run: bool = False) -> ImageRef | FlowPlan:
    """Build the site's user image from its lock file, keyed by content hash.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        dry_run: only say whether the image would be built or reused; change nothing.
    """
    the_site, platform = open_site(site, "build-image")
    with site_guard(the_site):
        if dry_run:
            return publish_plan(the_site, "build-image", plan_image(the_site, platform).steps)
        builder = resolve_builder(the_site.config.image.builder)
        get_run_logger().info("builder: %s", builder)
        result = _build_venv(the_site) if builder == "venv" else _build_oci(the_site, platform, builder)
        update_state(the_site, image=result.image)
        publish(
            the_site,
            "build-image",
            [
                f"# build-image: {the_site.name}",
                "",
                f"- image: `{result.image.pinned}`",
                f"- builder: {result.image.builder}, context `{the_site.image_context}`",
                f"- {'built' if result.built else 'unchanged, nothing built'} ({result.seconds:.1f}s)",
                f"- location: `{result.image.location}`",
            ],
            f"build-image on {the_site.name}",
        )
        return result.image
