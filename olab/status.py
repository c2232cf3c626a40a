"""`olab status`: what is deployed on a site and how its last runs went."""

from __future__ import annotations

from core.config import Site
from core.state import load_state

LIFECYCLE_FLOWS = (
    "release", "build-image", "test-notebooks", "deploy-hub", "provision-cluster", "stop-hub", "teardown", "restore",
)


def last_runs(site: Site, limit: int = 8) -> list[str]:
    """The site's most recent lifecycle flow runs, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flows = client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(LIFECYCLE_FLOWS))))
        names = {f.id: f.name for f in flows}
        if not names:
            return []
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(LIFECYCLE_FLOWS))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=100,
        )
    lines = []
    for run in runs:
        if run.parameters.get("site", "local") != site.name and str(site.source) != run.parameters.get("site"):
            continue
        when = (run.start_time or run.expected_start_time)
        stamp = when.strftime("%Y-%m-%d %H:%M:%S") if when else "-"
        state = run.state.name if run.state else "?"
        seconds = f"{run.total_run_time.total_seconds():.1f}s" if run.total_run_time else ""
        lines.append(f"    {stamp}  {names.get(run.flow_id, '?'):18} {state:10} {seconds:>8}  {run.name}")
        if len(lines) >= limit:
            break
    return lines


def site_status(site: Site, runs: bool = True) -> list[str]:
    from core.platform import TargetNotReady
    from targets import platform_for

    out = [f"site {site.name} ({site.config.target.value}) from {site.source}", f"  runtime  {site.paths.runtime}"]
    try:
        platform = platform_for(site)
    except TargetNotReady as exc:
        out.append(f"  target   {exc}")
        return out + (_runs(site) if runs else [])
    if reason := platform.not_ready("deploy-hub"):
        out.append(f"  target   {reason}")
        return out + (_runs(site) if runs else [])
    state = load_state(site)
    mark = platform.read_mark()
    if state.image:
        out.append(f"  image    {state.image.pinned}")
    elif mark:
        # The runtime (and its state) is inside the restore point, which names the image.
        try:
            kept = platform.restore_point_image(mark.restore_point)
            image = kept.pinned if kept else "none recorded"
        except (OSError, ValueError):
            image = "unknown (restore point unreadable)"
        out.append(f"  image    {image} (kept in restore point {mark.restore_point})")
    else:
        out.append("  image    none built yet (olab build)")
    hub = platform.hub_state()
    if state.hub is None and mark:
        out.append("  hub      torn down (olab restore brings it back)")
    elif state.hub is None and not hub.running:
        out.append("  hub      never deployed (olab deploy)")
    else:
        if hub.running and hub.version:
            out.append(f"  hub      {hub.url} running ({hub.detail}, JupyterHub {hub.version})")
        elif hub.running:
            out.append(f"  hub      {hub.url} {hub.detail}: alive but not answering")
        else:
            out.append(f"  hub      {hub.url} stopped (data kept; olab deploy starts it)")
        if state.hub:
            out.append(f"  serving  {state.hub.image.pinned}, since {state.hub.started_at:%Y-%m-%d %H:%M:%S}")
    if state.health:
        failed = [c.name for c in state.health.checks if not c.ok]
        out.append(f"  health   {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} ({len(state.health.checks)} checks)")
    complete = [p.id for p in platform.restore_points() if p.complete]
    if mark:
        out.append(f"  TORN DOWN ({mark.phase} since {mark.since:%Y-%m-%d %H:%M}); restore point {mark.restore_point}: olab restore")
    out.append(f"  backups  {len(complete)} complete restore points in {site.paths.backups}" + (f", newest {complete[-1]}" if complete else ""))
    return out + (_runs(site) if runs else [])


def _runs(site: Site) -> list[str]:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # status starts no Prefect server, and no temporary one
        return ["  last runs: unknown: olab's Prefect server is not running (the next flow command starts it)"]
    try:
        found = last_runs(site)
    except Exception as exc:  # status must answer even when Prefect does not
        found = [f"    (Prefect API not reachable: {exc})"]
    return ["  last runs:" if found else "  last runs: none recorded", *found]
