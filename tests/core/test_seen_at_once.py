"""core/seen_at_once.py: a spawner's start returns once its server listens, on both hubs."""

from __future__ import annotations

import asyncio
import socket

from traitlets.config import Config

from core.hub_values import seen_at_once_code, z2jh_values
from core.planning import hub_spec
from core.seen_at_once import seen_at_once
from tests.core.test_hub_values import gke_site, oci_image


class Starting:
    """A spawner's start as JupyterHub sees it: it returns where the server will listen,
    before the server does (a (host, port) pair, or a URL as KubeSpawner's does); ``poll``
    says whether its process still runs."""

    start_timeout = 120
    as_url = False

    def __init__(self, listen_after: float | None, exit_code: int | None = None):
        self.listen_after, self.exit_code, self.polls, self.listener = listen_after, exit_code, 0, None

    async def start(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        async def listen_later():
            await asyncio.sleep(self.listen_after)
            self.listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)

        if self.listen_after is not None:
            self.later = asyncio.ensure_future(listen_later())
        return f"http://127.0.0.1:{port}" if self.as_url else ("127.0.0.1", port)

    def poll(self):
        self.polls += 1
        return self.exit_code


class StartingAsAPod(Starting):
    as_url = True


async def _listening_when_started(spawner) -> bool:
    where = await spawner.start()
    host, port = where if isinstance(where, tuple) else where.removeprefix("http://").split(":")
    try:
        # Listening when start returned: a connection is taken at once.
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1)
        writer.close()
        return True
    except OSError:
        return False
    finally:
        if spawner.listener is not None:
            spawner.listener.close()


def test_a_started_server_is_seen_as_soon_as_it_listens():
    """The start returns once the server's port takes a connection, so JupyterHub's first
    look (not one up to 5 s later) finds it; a server that has exited is not waited for."""
    assert not asyncio.run(_listening_when_started(Starting(listen_after=0.5))), "the plain start returns before"
    assert asyncio.run(_listening_when_started(seen_at_once(Starting)(listen_after=0.5)))
    assert asyncio.run(_listening_when_started(seen_at_once(StartingAsAPod)(listen_after=0.5))), "a URL, as KubeSpawner's"
    # A server that exited without listening: the start returns when poll says so (well
    # before its 30 s of looking), and JupyterHub reports the failure as it would.
    gone = seen_at_once(Starting)(listen_after=None, exit_code=1)
    assert not asyncio.run(asyncio.wait_for(_listening_when_started(gone), 10)) and gone.polls == 1


def test_the_gke_hub_runs_the_same_code_around_the_charts_spawner(tmp_path):
    """Zero-to-JupyterHub names its spawner by import name, then runs hub.extraConfig in the
    config's namespace: the values' code, run that way, wraps the named class."""
    site = gke_site(tmp_path)
    values = z2jh_values(site, hub_spec(site, oci_image(site), []))
    code = values["hub"]["extraConfig"]["olab-seen-at-once"]
    assert code == seen_at_once_code()
    config = Config()
    config.JupyterHub.spawner_class = f"{__name__}.StartingAsAPod"  # as the chart's "kubespawner.KubeSpawner"
    exec(code, {"c": config})
    wrapped = config.JupyterHub.spawner_class
    assert wrapped.__name__ == "SeenAtOnceStartingAsAPod" and issubclass(wrapped, StartingAsAPod)
    assert asyncio.run(_listening_when_started(wrapped(listen_after=0.5)))
