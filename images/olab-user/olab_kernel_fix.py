"""Loaded at start-up of every Python in the user environment (olab-kernel-fix.pth).

Works around a lost wake-up in jupyter_client's async ZMQ channel (upstream
jupyter/nbclient#312): after a widget cell, a kernel's reply could go unseen
until the cell timeout (or forever, with none), which hangs Voilà dashboards
and lab tests at random. Polling in short slices turns a missed wake-up into
a 50 ms delay. Remove when upstream fixes it.
"""

import time
from queue import Empty

try:
    from jupyter_client import channels as _channels
except ImportError:  # an environment without jupyter_client needs no fix
    _channels = None

if _channels is not None and hasattr(_channels, "AsyncZMQSocketChannel"):

    async def _get_msg(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if await self.socket.poll(50):
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty

    _channels.AsyncZMQSocketChannel.get_msg = _get_msg
