"""configurable-http-proxy, the Python port the local hub runs in front of itself, started
with room for a class.

It proxies through tornado's ``AsyncHTTPClient``, whose default lets 10 requests be in flight
and queues the rest, answering 503 "Timeout in request queue" to a request still queued after
20 s. Thirty students logging in at once make thirty slow requests (each waits while the hub
starts that student's server): ten students got that 503. ``python -m tasks.proxy ARGS`` runs
the same proxy, with the same arguments, with room for ``MAX_CLIENTS`` requests in flight.
"""

from __future__ import annotations

import sys

# Far above a class (each student's browser keeps a few connections: page, kernel, widgets).
MAX_CLIENTS = 1024


def command() -> list[str]:
    """The proxy command for JupyterHub's ConfigurableHTTPProxy.command."""
    return [sys.executable, "-m", "tasks.proxy"]


def main() -> None:
    from tornado.httpclient import AsyncHTTPClient

    AsyncHTTPClient.configure(None, max_clients=MAX_CLIENTS)
    from configurable_http_proxy.cli import main as proxy

    proxy()


if __name__ == "__main__":
    main()
