"""The machine's olab Prefect server: one per olab home, started in the background by the
first command that runs a flow, then used by every later command, `olab serve` and the UI.

Prefect's own default gives each command a temporary server (7-11 s to start, gone with the
command, so its runs vanish from any UI) that answers anyone on loopback. This one stays up,
keeps its SQLite under ``$OLAB_HOME/prefect/home``, listens on 127.0.0.1 only and requires
olab's credential (HTTP basic ``olab:<random>``, one per olab home, in a 0600 file; it reaches
the server through its environment, never argv). Everything lives in ``$OLAB_HOME/prefect``:

- ``credential``: the login (``olab credentials`` shows it);
- ``server.json``: the record (url, pid, port, started_at) of the running server;
- ``server.log``: its log; ``home/``: its PREFECT_HOME; ``start.lock``: taken while starting
  or stopping it, so two commands at once never start two servers;
- ``warm.json``, ``warm.log``, ``warm.sock``, ``warm.lock``: the warm process (``olab.warm``),
  started in the background when a command that ran a flow on this server ends, so that the
  next commands are fast; stopped with the server.

A record whose pid is gone, is not our server (pid reuse: checked by its command line and
working folder), or does not answer ``/api/health`` is stale: it is replaced, and only a
process that is our server is ever stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.config import olab_home
from core.files import write_json
from core.runner import ToolMissing, pid_alive, register_secrets, start_background, stop_process

DEFAULT_PORT = 4200
START_ATTEMPTS = 3  # ports tried when another process takes the chosen one as the server starts
START_TIMEOUT_SECONDS = 120.0
# A waiter outlasts a starter that uses its whole timeout and then stops what it started.
LOCK_WAIT_SECONDS = START_TIMEOUT_SECONDS + 60.0
USER = "olab"


class PrefectServerError(RuntimeError):
    """olab's Prefect server could not be started, reached or stopped; one line says why."""


@dataclass(frozen=True)
class PrefectServer:
    url: str  # the API's URL, http://127.0.0.1:<port>/api
    pid: int
    port: int
    started_at: datetime

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")


def folder() -> Path:
    return olab_home() / "prefect"


def _made_folder() -> Path:
    path = folder()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def record_file() -> Path:
    return folder() / "server.json"


def log_file() -> Path:
    return folder() / "server.log"


def _credential_file() -> Path:
    return folder() / "credential"


def credential(*, create: bool = False) -> str | None:
    """The login the server requires (``olab:<random>``); made once (0600, never replaced)
    when ``create``, else None while there is none."""
    path = _credential_file()
    try:
        return _read_credential(path)
    except FileNotFoundError:
        if not create:
            return None
    # Written whole into a private temporary file, then linked in: a reader never sees half
    # of it, and of two commands making it at once, the first link wins and both use it.
    fd, tmp = tempfile.mkstemp(dir=_made_folder(), prefix=".credential.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{USER}:{secrets.token_urlsafe(24)}\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _read_credential(path)


def _read_credential(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise PrefectServerError(f"{path}: the Prefect server's credential has mode {mode:04o}; run chmod 600 on it")
        value = handle.read().strip()
    if not value.startswith(f"{USER}:") or len(value) < len(USER) + 17:
        raise PrefectServerError(f"{path}: not an olab credential; remove it and the next command makes a new one")
    register_secrets([value, value.partition(":")[2]])
    return value


def read_record() -> PrefectServer | None:
    try:
        data = json.loads(record_file().read_text())
        server = PrefectServer(
            url=str(data["url"]), pid=int(data["pid"]), port=int(data["port"]),
            started_at=datetime.fromisoformat(data["started_at"]),
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return server if server.url == _api_url(server.port) else None


def _api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def is_ours(pid: int, port: int) -> bool:
    """Whether ``pid`` is the Prefect server this olab home started on ``port``, and not a
    process that got its pid later: by its command line and its working folder."""
    return _runs_here(pid, ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)])


def _runs_here(pid: int, wanted: list[str]) -> bool:
    """Whether ``pid``'s command line holds ``wanted`` and it works in this olab home's folder."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return _contains([a.decode(errors="replace") for a in argv], wanted) and cwd == folder()


def _contains(words: list[str], wanted: list[str]) -> bool:
    return any(words[i:i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


def answers(server: PrefectServer) -> bool:
    """Whether the server at ``server.url`` answers and takes this olab home's credential:
    its health probe needs none, so another olab home's server on the same port (two starts
    racing for 4200) would otherwise pass for ours."""
    import httpx

    login = credential()
    if login is None:
        return False
    user, _, password = login.partition(":")
    try:
        return httpx.get(f"{server.url}/admin/version", auth=(user, password), timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def running() -> PrefectServer | None:
    """The recorded server if it is ours, alive and answering; else None (starts nothing)."""
    server = read_record()
    if server and pid_alive(server.pid) and is_ours(server.pid, server.port) and answers(server):
        return server
    return None


@contextmanager
def _start_lock() -> Iterator[None]:
    """Held while the server is started or stopped; the kernel frees it if its holder dies."""
    fd = os.open(_made_folder() / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PrefectServerError(
                        f"another olab command has been starting or stopping the Prefect server for over "
                        f"{LOCK_WAIT_SECONDS:.0f}s (lock {folder() / 'start.lock'}); see {log_file()}"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def _port_free(port: int) -> bool:
    # As the server binds (SO_REUSEADDR): a port left in TIME_WAIT by a stopped server is free.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_answering(server: PrefectServer) -> bool:
    """Whether our recorded server answers before its start timeout (from ``started_at``)
    runs out: a command killed while starting it leaves it starting, and the next one waits
    for it rather than start another."""
    deadline = server.started_at.timestamp() + START_TIMEOUT_SECONDS
    while True:
        if not (pid_alive(server.pid) and is_ours(server.pid, server.port)):
            return False
        if answers(server):
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.25)


def _write_record(server: PrefectServer) -> None:
    write_json(record_file(), {"url": server.url, "pid": server.pid, "port": server.port,
                               "started_at": server.started_at.isoformat()}, mode=0o600)


def ensure_started(port: int | None = None) -> tuple[PrefectServer, bool]:
    """The running server, started first if there is none: (server, whether it was started now).

    ``port`` is the one to start it on (default 4200); when that one is taken by something
    else, any free port (the record says which)."""
    global _used
    found = running()
    if found:
        _used = found
        return found, False
    with _start_lock():
        # Another command may have started it while this one waited, or been killed while
        # starting it (the record is written as soon as its pid is known).
        recorded = read_record()
        if recorded and _wait_until_answering(recorded):
            return recorded, False
        if recorded and pid_alive(recorded.pid) and is_ours(recorded.pid, recorded.port):
            stop_process(recorded.pid, grace_seconds=10)  # ours, but hung: never a pid's new owner
        record_file().unlink(missing_ok=True)
        _used = _start(port or DEFAULT_PORT)
        return _used, True


def _start(wanted: int) -> PrefectServer:
    auth = credential(create=True)
    port = wanted if _port_free(wanted) else _free_port()
    for _ in range(START_ATTEMPTS - 1):
        try:
            return _start_on(port, auth)
        except _PortTaken:
            port = _free_port()  # another process bound it between the probe and the start
    return _start_on(port, auth)


class _PortTaken(PrefectServerError):
    pass


def _start_on(port: int, auth: str) -> PrefectServer:
    url = _api_url(port)
    # Only its own Prefect settings: none of the caller's (a profile, an API URL) leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(folder() / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "PREFECT_UI_API_URL": url,
        # The credential reaches the server through its environment, never argv.
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_API_AUTH_STRING": auth,
    }
    # Its own session (start_background): a command's crash or Ctrl-C does not reach it.
    pid = start_background(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder(), log_file=log_file(), env=env,
    )
    server = PrefectServer(url=url, pid=pid, port=port, started_at=datetime.now(timezone.utc))
    _write_record(server)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not answers(server):
            if not pid_alive(pid):
                if not _port_free(port):
                    raise _PortTaken(f"port {port} was taken while olab's Prefect server started; see {log_file()}")
                raise PrefectServerError(f"olab's Prefect server on {url} exited while starting; see {log_file()}")
            if time.monotonic() > deadline:
                raise PrefectServerError(
                    f"olab's Prefect server on {url} did not answer within {START_TIMEOUT_SECONDS:.0f}s; see {log_file()}")
            time.sleep(0.25)
    except BaseException:
        stop_process(pid, grace_seconds=10)
        record_file().unlink(missing_ok=True)
        raise
    return server


@dataclass(frozen=True)
class Stopped:
    server: PrefectServer | None  # the record there was, if any
    stopped: bool  # whether a server of ours was running and is stopped now
    warm: WarmProcess | None = None  # the warm process's record there was, if any
    warm_stopped: bool = False  # whether it was running and is stopped now


def stop() -> Stopped:
    """Stop the recorded server and warm process by their pids if they are ours; the records
    go either way. Commands running in the warm process go on (each in a session of its own)."""
    if not folder().is_dir():
        return Stopped(server=None, stopped=False)
    with _start_lock():
        warm, warm_was = _stop_warm()
        server = read_record()
        was = bool(server and pid_alive(server.pid) and is_ours(server.pid, server.port))
        if was:
            stop_process(server.pid)
        record_file().unlink(missing_ok=True)
        return Stopped(server=server, stopped=was, warm=warm, warm_stopped=warm_was)


# --- the warm process (olab.warm) ------------------------------------------------------------

WARM_ARGV = ["-P", "-m", "olab.warm"]
# olab's server, when this process's command used it (ensure_started): as the command ends,
# start_warm starts a warm process for it (which checks for itself that the server runs).
_used: PrefectServer | None = None


@dataclass(frozen=True)
class WarmProcess:
    pid: int
    started_at: datetime
    server_pid: int  # the Prefect server it was made for: it exits when that one is gone
    ready: bool  # False while it imports (its record is written first, so that stop finds it)


def warm_record_file() -> Path:
    from olab import warm

    return folder() / warm.RECORD_NAME


def warm_log_file() -> Path:
    return folder() / "warm.log"


def read_warm_record() -> WarmProcess | None:
    try:
        data = json.loads(warm_record_file().read_text())
        return WarmProcess(pid=int(data["pid"]), started_at=datetime.fromisoformat(data["started_at"]),
                           server_pid=int(data["server_pid"]), ready=data["ready"] is True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_warm_record(process: WarmProcess) -> None:
    write_json(warm_record_file(), {"pid": process.pid, "started_at": process.started_at.isoformat(),
                                    "server_pid": process.server_pid, "ready": process.ready}, mode=0o600)


def warm_is_ours(pid: int) -> bool:
    """Whether ``pid`` is this olab home's warm process (not a process that got its pid later)."""
    return _runs_here(pid, WARM_ARGV)


def warm_running() -> WarmProcess | None:
    """The recorded warm process if it is alive and ours; else None."""
    found = read_warm_record()
    return found if found and pid_alive(found.pid) and warm_is_ours(found.pid) else None


def start_warm() -> int | None:
    """Start the warm process in the background, made for the server this process's command
    used, unless there was none, one runs (or is starting), or OLAB_NO_WARM is set: its pid,
    else None. It never waits for it: the warm process takes seconds to import, and a command
    that started it does not wait, nor compete with it, since it starts as the command ends."""
    from olab import warm

    global _used
    used, _used = _used, None  # once per use: a later command in this process starts its own
    if used is None or warm.disabled() or not folder().is_dir() or warm.lock_held(folder()):
        return None
    # Its own session and a 0077 umask (start_background): what it writes is private. It
    # takes the lock itself; of two started at once, the second finds it taken and exits.
    try:
        pid = start_background([sys.executable, *WARM_ARGV], cwd=folder(), log_file=warm_log_file())
        # Recorded now, not only once it has taken its lock: a command right after this one
        # then finds it starting and waits for it (olab.warm).
        write_warm_record(WarmProcess(pid=pid, started_at=datetime.now(timezone.utc), server_pid=used.pid, ready=False))
    except (OSError, ToolMissing) as exc:  # the next command runs in-process: slower, not wrong
        print(f"olab: could not start the warm process: {exc}", file=sys.stderr)
        return None
    return pid


def _stop_warm() -> tuple[WarmProcess | None, bool]:
    found = read_warm_record()
    was = bool(found and pid_alive(found.pid) and warm_is_ours(found.pid))
    if was:
        stop_process(found.pid, grace_seconds=10)
    warm_record_file().unlink(missing_ok=True)
    return found, was


def configured_api() -> str | None:
    """A Prefect API the caller configured (PREFECT_API_URL in the environment, the active
    profile, or settings in force, such as a test harness's): olab then uses it and starts nothing."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def using(server: PrefectServer | None) -> Iterator[None]:
    """Prefect settings for the block: ``server``'s URL and credential when given, and never a
    temporary server (a missing API is an error, not a silent throwaway server)."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        temporary_settings,
    )

    from olab import crash_detection

    # Flow runs send heartbeats often enough for a dead one to show Crashed within minutes.
    updates: dict = {PREFECT_SERVER_EPHEMERAL_ENABLED: False, **crash_detection.settings()}
    if server is not None:
        updates |= {PREFECT_API_URL: server.url, PREFECT_API_AUTH_STRING: credential()}
    with temporary_settings(updates):
        if server is not None:
            _ensure_crash_detection(server)
        yield


_automation_checked: set[int] = set()


def _ensure_crash_detection(server: PrefectServer) -> None:
    """olab's server has the automation that marks runs without heartbeats Crashed (made once,
    checked once per process); a failure is one line on stderr, never the command's end."""
    from olab import crash_detection

    if server.pid in _automation_checked:
        return
    try:
        crash_detection.ensure_automation()
        _automation_checked.add(server.pid)
    except Exception as exc:  # noqa: BLE001 - the UI's bookkeeping must not stop a command
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"olab: could not set up crash detection on {server.ui}: {reason}", file=sys.stderr)
