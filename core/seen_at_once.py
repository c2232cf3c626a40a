"""A spawner whose start returns once its server listens: hub code, the same on both targets.

JupyterHub looks for a started server with random waits that grow to 5 s
(``jupyterhub.utils.exponential_backoff``): in a hub log of bench_release, a server that
listened 5.4 s after its start was seen 2.1 s later, 2.1 s a student would have waited on the
spawn page. The start wrapped here returns when the server's port takes a connection, tried 20
times a second, so JupyterHub's first look finds it. It gives up looking, and leaves the rest
to JupyterHub's own wait, when the server has exited (``poll``, asked once a second: for a
container or a pod that is an API call), after 30 s, or 5 s before the spawner's
``start_timeout``.

Both hubs run this module's source: the local hub from its settings (as it runs
core/bridges.py), wrapping its process or Docker spawner; the gke hub from Zero-to-JupyterHub's
``hub.extraConfig``, wrapping KubeSpawner (whose start returns the pod's URL once the pod
runs; the hub reaches the pod's port, as it must to proxy it). Standard library at import;
JupyterHub's own helpers are imported where the hub calls :func:`seen_at_once`.
"""

import asyncio
from urllib.parse import urlsplit

LOOK_SECONDS = 30.0
LOOK_EVERY = 0.05


def _where(started) -> tuple[str, int]:
    """(host, port) of a start's answer: a (host, port) pair or a URL."""
    if isinstance(started, tuple):
        host, port = started
    else:
        parts = urlsplit(started)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    return ("127.0.0.1" if host in ("", "0.0.0.0", None) else host), int(port)


def seen_at_once(spawner_class):
    """``spawner_class`` (a class, or its import name as JupyterHub's config takes it) with a
    start that returns once the server listens."""
    from jupyterhub.utils import maybe_future
    from traitlets.utils.importstring import import_item

    base = import_item(spawner_class) if isinstance(spawner_class, str) else spawner_class

    class SeenAtOnce(base):
        async def start(self):
            loop = asyncio.get_running_loop()
            began = loop.time()
            started = await maybe_future(super().start())
            host, port = _where(started)
            deadline = min(loop.time() + LOOK_SECONDS, began + self.start_timeout - 5)
            next_poll = loop.time()
            while loop.time() < deadline:
                try:
                    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
                except (OSError, asyncio.TimeoutError):
                    if loop.time() >= next_poll:
                        if await maybe_future(self.poll()) is not None:
                            break  # it has exited: JupyterHub reports it as it would
                        next_poll = loop.time() + 1
                    await asyncio.sleep(LOOK_EVERY)
                    continue
                writer.close()
                break
            return started

    SeenAtOnce.__name__ = SeenAtOnce.__qualname__ = f"SeenAtOnce{base.__name__}"
    return SeenAtOnce
