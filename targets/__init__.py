"""The targets a site's hub can run on, each filling the seam of ``core.platform``.

A site's platform is chosen here, and only here, from ``site.target``.
"""

from __future__ import annotations

from collections.abc import Callable

from core.config import Site, Target
from core.platform import Platform
from targets.gke import GkePlatform
from targets.local import LocalPlatform

PLATFORMS: dict[Target, Callable[[Site], Platform]] = {
    Target.local: LocalPlatform,
    Target.gke: GkePlatform,
}


def platform_for(site: Site) -> Platform:
    return PLATFORMS[site.config.target](site)
