"""What every lifecycle flow does first: load its site, refuse what it cannot do."""

from __future__ import annotations

from prefect.logging import get_run_logger

from olab.config import ConfigError, Site, Target, load_site


class UnsupportedTarget(RuntimeError):
    pass


def open_site(ref: str, *, supported: tuple[Target, ...] = (Target.local,)) -> Site:
    try:
        site = load_site(ref)
    except ConfigError as exc:
        raise ConfigError(exc.problems) from None
    if site.config.target not in supported:
        raise UnsupportedTarget(
            f"site {site.name}: target {site.config.target.value} is not supported by this flow yet "
            f"(supported: {', '.join(t.value for t in supported)})"
        )
    get_run_logger().info("site %s (%s), from %s", site.name, site.config.target.value, site.source)
    return site


def artifact_key(site: Site, what: str) -> str:
    return f"{site.name}-{what}".lower()
