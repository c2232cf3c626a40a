"""test-notebooks: every lab executed in the user environment, in parallel, each in a kernel of its own."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from core.guard import site_guard
from core.models import FlowPlan, ImageRef, LabReport, LabResult, LabSource, PlannedStep
from core.planning import lab_cache_key, plan_labs
from flows._common import open_site, publish, publish_plan
from flows.build_image import image_for, plan_image
from tasks.oci import engine_for
from tasks.notebooks import cached_result, discover_labs, run_labs, stage_lab, store_result


class LabsFailed(RuntimeError):
    def __init__(self, report: LabReport):
        self.report = report
        lines = [r.describe() for r in report.failures]
        super().__init__(f"{len(lines)} of {len(report.results)} labs failed: " + "; ".join(lines))


def lab_steps(image: ImageRef | None, sources: list[LabSource], reused: list[LabResult]) -> list[PlannedStep]:
    """What a test run would do with each lab: rerun it, or reuse its pass in this image."""
    passed = {r.lab for r in reused}
    where = image.pinned if image else "the image build-image would make"
    return [
        PlannedStep(verb="skip", subject=f"lab {lab.name}", detail=f"unchanged since it passed in {where}")
        if lab.name in passed
        else PlannedStep(verb="run", subject=f"lab {lab.name}", detail=f"in {where}")
        for lab in sources
    ]


def plan_lab_run(site, image: ImageRef | None, only: list[str] | None):
    settings = site.config.labs
    sources = discover_labs(site.labs_dir, only)
    if image is None:
        return sources, {}, plan_labs(sources, {})
    keys = {lab.name: lab_cache_key(image, lab, settings.cell_timeout_seconds) for lab in sources}
    cached = {name: hit for name, key in keys.items() if (hit := cached_result(site.paths.lab_cache, key))}
    return sources, keys, plan_labs(sources, cached)


@flow(name="test-notebooks")
def test_notebooks(
    site: str = "local", image: ImageRef | None = None, labs: list[str] | None = None, dry_run: bool = False
) -> LabReport | FlowPlan:
    """Run the labs (all, or those named) in the image; any failure fails the flow.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        image: the image to test in (default: build-image's, built if its inputs changed).
        labs: lab names to run (default: every lab in the site's labs folder).
        dry_run: only say which labs would run and which passed before in this image; change nothing.
    """
    the_site, platform = open_site(site, "test-notebooks")
    logger = get_run_logger()
    started = time.monotonic()
    with site_guard(the_site):
        if dry_run:
            steps: list[PlannedStep] = []
            if image is None:
                built = plan_image(the_site, platform)
                steps, image = built.steps, built.existing
            sources, _, plan = plan_lab_run(the_site, image, labs)
            return publish_plan(the_site, "test-notebooks", steps + lab_steps(image, sources, plan.reused))
        if image is None:
            image, _ = image_for(site, the_site, platform)
        settings = the_site.config.labs
        cache = the_site.paths.lab_cache
        sources, keys, plan = plan_lab_run(the_site, image, labs)
        for hit in plan.reused:
            logger.info("%s: unchanged since it passed in %s; not rerun", hit.lab, image.tag)
        results: list[LabResult] = list(plan.reused)
        if plan.to_run:
            workers = settings.parallelism or os.cpu_count() or 2
            logger.info("running %d labs, %d at a time, in %s%s", len(plan.to_run), workers, image.pinned,
                        " (one container for all)" if image.is_oci else "")
            engine = None
            if image.is_oci:
                access = platform.image_registry(prepare=False)
                engine = engine_for(image.builder, the_site.paths.containers, [access.host] if access.insecure else [])
                engine.ensure_local(image.pinned, access.login)
            with tempfile.TemporaryDirectory(prefix="olab-labs-") as staging:
                # Read-only for the image's non-root user too.
                os.chmod(staging, 0o755)
                notebooks = [stage_lab(lab, Path(staging)) for lab in plan.to_run]
                fresh = run_labs(image, notebooks, settings.cell_timeout_seconds, workers, engine)
            for result in fresh:
                if result.passed:
                    store_result(cache, keys[result.lab], result)
            results.extend(fresh)
        order = {lab.name: i for i, lab in enumerate(sources)}
        results.sort(key=lambda r: order[r.lab])
        report = LabReport(image=image, results=results, seconds=time.monotonic() - started)
        publish(the_site, "test-notebooks", [report.markdown(the_site.name)],
                f"labs in {image.pinned}: {'all passed' if report.passed else 'FAILED'}")
        if not report.passed:
            raise LabsFailed(report)
        logger.info("all %d labs passed in %.1fs", len(results), report.seconds)
        return report


# The flow's name is the product's; keep pytest from collecting it as a test.
test_notebooks.__test__ = False
