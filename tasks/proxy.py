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


def _kernel_websockets_whole() -> None:
    """Two faults of the port's WebSocket proxying (configurable-http-proxy 0.4.0), which every
    kernel connection meets: JupyterLab and Voilà ask for the binary subprotocol
    v1.kernel.websocket.jupyter.org and the server accepts it, but the proxy answers the
    browser's handshake without it, which the browser takes as a failed handshake (a console
    error; JupyterLab then reconnects with the legacy text protocol); and it sends the
    browser's binary frames on as text frames, which the server cannot read."""
    from configurable_http_proxy.handlers import ProxyHandler

    def select_subprotocol(self, subprotocols):
        chosen = self.ws_client.selected_subprotocol if self.ws_client else None
        return chosen if chosen in subprotocols else None

    def on_message(self, message):
        if self.ws_client:
            prefix = self.target["prefix"] if self.target else ""
            if prefix:
                self.proxy.update_last_activity(prefix)
            self.ws_client.write_message(message, binary=isinstance(message, bytes))

    ProxyHandler.select_subprotocol = select_subprotocol
    ProxyHandler.on_message = on_message


def main() -> None:
    from tornado.httpclient import AsyncHTTPClient

    AsyncHTTPClient.configure(None, max_clients=MAX_CLIENTS)
    _kernel_websockets_whole()
    from configurable_http_proxy.cli import main as proxy

    proxy()


if __name__ == "__main__":
    main()
