"""The idle culler as the local hub runs it (``python -m core.culler``): jupyterhub_idle_culler,
ended with its hub, with its token kept out of its log.

JupyterHub starts a managed service in a session of its own and stops it in its own clean-up.
A hub killed outright (kill -9, the OOM killer) therefore left its culler running for ever,
polling a hub that was gone, and every failed poll wrote the culler's API token into the hub's
log: tornado logs "Exception in callback functools.partial(<function cull_idle>, ...,
api_token='...')". Here:

- the kernel sends the culler SIGTERM when its parent, the hub, dies (``PR_SET_PDEATHSIG``;
  JupyterHub starts services from its event loop's thread, the hub's main one, which lives as
  long as the hub); a hub gone before that was set up is noticed by the parent having changed;
- every log record the culler makes, and any traceback it prints, has the token masked.

Standard library and core.runner's masking only, besides the culler itself.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback

from core.runner import mask

PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the hub died before the kernel was told
        sys.exit(0)


def _mask_logs(secret: str) -> None:
    """Every log record made from now on, message and traceback, without ``secret``."""
    make = logging.getLogRecordFactory()

    def record_factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text, [secret])
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: kept as words, masked
            text = f"{record.msg} {record.args!r}"
        record.msg, record.args = mask(text, [secret]), None
        return record

    logging.setLogRecordFactory(record_factory)

    def excepthook(kind, value, tb) -> None:
        sys.stderr.write(mask("".join(traceback.format_exception(kind, value, tb)), [secret]))

    sys.excepthook = excepthook


def main() -> None:
    _end_with_parent()
    _mask_logs(os.environ.get("JUPYTERHUB_API_TOKEN", ""))
    from jupyterhub_idle_culler import main as cull

    sys.argv[0] = "jupyterhub-idle-culler"
    cull()


if __name__ == "__main__":
    main()
