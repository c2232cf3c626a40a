"""The warm olab process: commands that run flows as thin clients of a process that has
already imported Prefect and olab.

Why: a no-op ``olab deploy --no-check`` on the running server took about 5.5 s on 2 cores, and
``import prefect`` alone 2.4-3 s of it; the flow run itself is about 1 s. So, like a build
daemon's pre-fork "zygote", one process per olab home imports Prefect and every olab module
once, starts no thread, and waits on a unix socket. A command that finds it sends its argv,
working folder, environment and umask, and its stdin, stdout and stderr themselves
(SCM_RIGHTS); the warm process forks a child that becomes that command (the folder, the
environment, the umask, the three descriptors on 0, 1 and 2) and runs ``olab.cli.main`` as
the command would have: the same in-process flow run, so the same logs on the same terminal,
the same artifacts and runs on the server. The command waits for the child's exit status and
exits with it. Asking a Prefect deployment to run the flow instead (``olab serve``'s runner)
is slower: the runner polls for runs and starts each in a new Python process
(``bench/README.md``, section 8).

For one command::

    olab (client) --socket--> warm process: imports done, no thread, runs no command itself
                                  fork: session (a session of its own): relays signals, reports the status
                                      fork: command (a process group of its own): olab.cli.main(argv)

- The command process is the one the site lock records (its pid in the holder record) and the
  one whose flow run sends heartbeats. It dies with its session (``PR_SET_PDEATHSIG``), and
  the session does not die with the warm process (``olab server stop`` stops only the latter).
- SIGINT (Ctrl-C), SIGTERM, SIGHUP and SIGQUIT that reach the client are sent to the command's
  process group, as a terminal sends them to a foreground job; the client still waits for the
  status (an interrupted flow exits 130, as in-process). One that comes before the command
  runs is held (by the client until the go, then blocked in the command until it calls
  ``olab.cli.main``), never lost.
- A client that dies (kill -9) closes its socket: the session kills the command's process group
  with SIGKILL, as the command would have died with it in-process, so its run is left and
  found as any killed run is (the next flow on the site marks it Crashed; the heartbeat
  automation does after 90 s).
- A command process killed by a signal: the client says so in one line and exits 128 + signal.

A warm process is started in the background by a command that ran a flow on olab's server,
as that command ends (``olab.prefect_server.start_warm``), and recorded as starting at once. A
command that finds it still importing waits for it (up to :data:`STARTING_SECONDS` after its
start): it began the same imports earlier, and the two would otherwise compete for the CPU.

The client runs the command in-process instead, as before, when ``OLAB_NO_WARM`` is set (to
anything but empty or 0), when no warm process answers (none runs or is starting, or no answer
within :data:`CONNECT_SECONDS` and :data:`READY_SECONDS`), when the warm process **refuses**
(olab's sources or the installed packages changed since it started: it exits, and the command,
run in-process, starts a new one as it ends) or **declines** (the client runs another Python
or another checkout of olab, or its start-up environment differs: ``PYTHONPATH``, the
locale...; the warm process stays).

Job control is not forwarded: the command is in a session of its own, not the terminal's, so
Ctrl-Z stops the client, not the command (no olab command reads stdin, which it gets all the
same). Resource limits (``ulimit``) are the warm process's, not the client's.

Before every fork the warm process checks that it runs no thread but its main one, as the
kernel counts them (``/proc/self/task``: a C library's too): a lock held by another thread at
a fork stays locked for ever in the child. Importing Prefect and olab starts none (checked when
they are imported and at each request; it refuses and exits if one ever does).

Security: the socket is 0600 in the 0700 ``$OLAB_HOME/prefect``; each end checks that the
other runs as the same user (SO_PEERCRED); the environment, which may hold secrets, crosses
only this socket; the warm process's log (``warm.log``) names commands and pids, never their
arguments or environment.

This module is both ends: the client part imports nothing beyond the standard library (the
``olab`` command imports it before anything else); the warm process imports the rest when it
starts (``python -m olab.warm``, started by :func:`olab.prefect_server.start_warm`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

NO_WARM_VARIABLE = "OLAB_NO_WARM"
SOCKET_NAME = "warm.sock"
LOCK_NAME = "warm.lock"
RECORD_NAME = "warm.json"
# A listening unix socket accepts at once (its backlog), even while the warm process is busy:
# this only bounds a socket file that no process listens on any more.
CONNECT_SECONDS = 0.5
# From the request to the warm process's answer: one fork and a stat of olab's sources. Past
# this (a warm process that hangs) the command runs in-process; it never ran in the warm one.
READY_SECONDS = 3.0
# A command waits this long after a warm process started for it to answer (its imports took
# 7-27 s on 2 busy cores), rather than import the same modules itself, competing for the CPU.
STARTING_SECONDS = 60.0
# How long a session waits for the client's go; a client that gave up never sends it.
GO_SECONDS = 10.0
# How often the warm process checks that its server and olab home are still there.
CHECK_SECONDS = 2.0
MAX_MESSAGE = 256 * 1024
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# The packages whose sources the warm process holds in memory ([tool.setuptools] packages).
PACKAGES = ("olab", "flows", "targets", "tasks", "core")
# Read once when a Python process starts: a client whose values differ is declined.
START_UP_VARIABLES = (
    "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONUTF8", "PYTHONIOENCODING", "PYTHONWARNINGS",
    "PYTHONDEVMODE", "PYTHONHASHSEED", "LANG", "LC_ALL", "LC_CTYPE",
)
# What a flow run imports on first use, beyond olab's modules (measured: the modules a no-op
# `olab deploy` in a child of the warm process imported; fastapi alone took 1.5 s, for the
# jsonable_encoder Prefect serialises flow parameters with).
RUN_MODULES = (
    "prefect.flow_engine", "prefect.task_engine", "prefect.client.orchestration", "prefect.automations",
    "prefect.utilities.visualization", "prefect.logging.configuration", "fastapi.encoders",
    "anyio._backends._asyncio", "anyio.streams.memory", "anyio.streams.stapled", "anyio.streams.tls",
    "opentelemetry.metrics", "opentelemetry._logs", "pydantic.color", "rich._emoji_codes",
)
_PR_SET_PDEATHSIG = 1
# The olab package this process runs: a client and the warm process must run the same one.
_OLAB = str(Path(__file__).resolve().parent)


def command_of(args: list[str]) -> str | None:
    """The command word of ``olab ARGS`` (after any --site before it), or None."""
    rest = list(args)
    while rest:
        word = rest.pop(0)
        if word == "--site":
            if not rest:
                return None
            rest.pop(0)
        elif word.startswith("--site="):
            continue
        elif word.startswith("-"):
            return None
        else:
            return word
    return None


def disabled() -> bool:
    return os.environ.get(NO_WARM_VARIABLE, "").strip() not in ("", "0")


def prefect_folder() -> Path:
    """``$OLAB_HOME/prefect`` (olab_home in core.config, prefect_server.folder), computed here
    without importing them: core.config imports pydantic, a fifth of a second the client saves."""
    return Path(os.environ.get("OLAB_HOME") or Path.home() / ".olab").expanduser().resolve() / "prefect"


def _encode(message: Mapping) -> bytes:
    return json.dumps(message).encode()


def _receive(sock: socket.socket, timeout: float | None) -> dict | None:
    """The next message, or None when the peer is gone, said nothing in time, or sent nonsense."""
    try:
        sock.settimeout(timeout)
        data = sock.recv(MAX_MESSAGE)
        message = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return message if isinstance(message, dict) else None


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def lock_held(folder: Path) -> bool:
    """Whether a warm process holds this olab home's warm lock (one is running, or starting)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases it if this took it
    return False


# --- the client --------------------------------------------------------------------------


def run(argv: list[str]) -> int | None:
    """Run the command ``argv`` (``argv[0]`` the program) in the warm process: its exit status,
    or None when no warm process takes it (then nothing ran; the caller runs it in-process)."""
    if disabled():
        return None
    folder = prefect_folder()
    sock = _connect(folder) or _connect_once_started(folder)
    if sock is None:
        return None
    with sock:
        if not _send_request(sock, argv):
            return None
        reply = _receive(sock, READY_SECONDS)
        if not reply or "ready" not in reply:
            return None
        return _follow(sock)


def _connect(folder: Path) -> socket.socket | None:
    path = str(folder / SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_SECONDS)
    folder_fd = None
    try:
        if len(path.encode()) > 100:
            # A unix socket's path holds at most 107 bytes; a deep olab home is reached
            # through a descriptor of its folder.
            folder_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            path = f"/proc/self/fd/{folder_fd}/{SOCKET_NAME}"
        sock.connect(path)
        if _peer(sock)[1] != os.getuid():
            raise PermissionError("the warm process runs as another user")
    except OSError:
        sock.close()
        return None
    finally:
        if folder_fd is not None:
            os.close(folder_fd)
    return sock


def _connect_once_started(folder: Path) -> socket.socket | None:
    """A connection to the warm process its record says is starting (still importing), once it
    answers; None when there is none, it ends, or STARTING_SECONDS after it started. Waiting
    costs less than running in-process: the warm process began the same imports earlier, and
    the two would compete for the CPU (a command right after the one that started it)."""
    while True:
        try:
            record = json.loads((folder / RECORD_NAME).read_text())
            pid, ready = int(record["pid"]), record["ready"] is True
            deadline = datetime.fromisoformat(record["started_at"]).timestamp() + STARTING_SECONDS
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if ready or time.time() > deadline or not _alive(pid):
            return _connect(folder) if ready else None
        time.sleep(0.1)
        if sock := _connect(folder):
            return sock


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which the process that started it has not reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _send_request(sock: socket.socket, argv: list[str]) -> bool:
    opened = []
    fds = []
    try:
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:  # a closed stdin (`<&-`): the command gets /dev/null, as Python would give
                opened.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
                fds.append(opened[-1])
        request = {
            "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
            "prefix": sys.prefix, "executable": sys.executable, "olab": _OLAB,
        }
        socket.send_fds(sock, [_encode(request)], fds)
        return True
    except OSError:  # no working folder any more, an environment too large for one message
        return False
    finally:
        for fd in opened:
            os.close(fd)


def _follow(sock: socket.socket) -> int:
    """Tell the session to start the command, forward signals to it, and return its status."""

    held: list[int] | None = []  # signals that came before the go; None once it is sent

    def forward(signum, _frame) -> None:
        if held is not None:
            held.append(signum)  # sent after the go: the session reads the go first
            return
        with contextlib.suppress(OSError):
            sock.send(_encode({"signal": signum}))

    # Before the go: a Ctrl-C from now on reaches the command (the session starts it on the
    # go), not this process, whose end would kill the command outright.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        try:
            sock.settimeout(None)
            sock.send(_encode({"go": True}))
        except OSError:
            pass  # the session is gone: said below
        early, held = held, None
        for signum in early:
            forward(signum, None)
        command = None
        while True:
            message = _receive(sock, None)
            if message is None:
                print(f"olab: lost the warm process that ran this command{f' (pid {command})' if command else ''}; "
                      f"see {prefect_folder() / 'warm.log'}", file=sys.stderr)
                return 1
            if "started" in message:
                command = message["started"]
            elif "exit" in message:
                return int(message["exit"])
            elif "killed" in message:
                number = int(message["killed"])
                print(f"olab: the command's process (pid {command}) was killed by {_signal_name(number)}", file=sys.stderr)
                return 128 + number
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- the warm process ------------------------------------------------------------------------


def _log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _package_folders() -> list[Path]:
    import importlib.util

    folders = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        folders += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return folders


def sources() -> dict[str, tuple[int, int]]:
    """What the warm process's code came from: every .py file of olab's packages (mtime, size),
    and each site-packages folder (its mtime changes when a package is installed or removed)."""
    found: dict[str, tuple[int, int]] = {}
    pending = _package_folders()
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                pending.append(Path(entry.path))
            elif entry.name.endswith(".py"):
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    found[entry.path] = (info.st_mtime_ns, info.st_size)
    import site

    for folder in {*site.getsitepackages(), site.getusersitepackages()}:
        with contextlib.suppress(OSError):
            found[folder] = (os.stat(folder).st_mtime_ns, 0)
    return found


def changed(before: Mapping[str, tuple[int, int]], now: Mapping[str, tuple[int, int]]) -> str | None:
    """Why the code on disk is not the code in memory any more, or None."""
    for path in sorted(before.keys() | now.keys()):
        if path not in now:
            return f"{path} was removed"
        if path not in before:
            return f"{path} is new"
        if before[path] != now[path]:
            return f"{path} changed"
    return None


def _module_names(package: str) -> list[str]:
    import importlib
    import pkgutil

    found = importlib.import_module(package)
    # Not this module again (it runs as __main__), nor the client's entry point.
    return [info.name for info in pkgutil.walk_packages(found.__path__, f"{package}.")
            if info.name not in ("olab.warm", "olab.__main__")]


def _first_modules() -> list[str]:
    """What the warm process imports before it answers: what a lifecycle command on a local
    site imports (the CLI, every flow, the local target), and what a flow run imports on first
    use. The rest of olab's modules (the gke target's, with Google's and Kubernetes' libraries:
    40 % more import time) follow once it answers (:func:`_import_one`), so that a command
    right after the one that started it, which waits for it, waits no longer than it would
    take to import what it needs itself."""
    return ["olab.cli", "olab.status", *_module_names("flows"), "targets.local", *RUN_MODULES]


def _import(names: list[str], defaults: dict[str, str]) -> None:
    """Import ``names``; ``defaults`` gets the environment variables importing them set (each
    command must get them too: its environment replaces this process's)."""
    import importlib

    before = set(os.environ)
    for name in names:
        importlib.import_module(name)
    defaults.update({key: value for key, value in os.environ.items() if key not in before})


def threads() -> list[str]:
    """This process's threads other than the main one, as the kernel counts them (a C library's
    thread, OpenBLAS's say, is not in ``threading.enumerate()``): named for the log. A process
    with threads must not fork: a lock another thread holds stays locked for ever in the child."""
    import threading

    known = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    try:
        ids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        ids = list(known)
    return [known.get(tid, f"thread {tid} (not Python's)") for tid in ids if tid != main]


def _import_one(rest: list[str], defaults: dict[str, str]) -> str | None:
    """Import the next of the modules left for when no command waits; why this process must
    exit, or None."""
    import gc

    name = rest.pop(0)
    try:
        _import([name], defaults)
    except Exception as exc:  # noqa: BLE001 - a command that needs it imports it and says what fails
        _log(f"pid {os.getpid()}: could not import {name}: {type(exc).__name__}: {exc}")
    if others := threads():
        return f"importing {name} started threads ({', '.join(others)}); a process with threads cannot fork safely"
    if not rest:
        gc.freeze()
        _log(f"pid {os.getpid()}: imported the rest of olab ({len(sys.modules)} modules)")
    return None


class _Stop(BaseException):
    """SIGTERM or SIGINT reached the warm process: it cleans up and exits (a BaseException,
    as SystemExit is, so that no ``except Exception`` on the way swallows it)."""


def _stop(_signum, _frame) -> None:
    raise _Stop


def serve() -> int:
    """The warm process: import, listen, fork a session per command, until it is stopped or
    stale. Started in ``$OLAB_HOME/prefect`` with its log as stdout and stderr."""
    from datetime import datetime, timezone

    from olab import prefect_server

    folder = prefect_server.folder()
    pid = os.getpid()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        lock = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"pid {pid}: another warm process runs for this olab home; exiting")
            return 0
        server = prefect_server.running()
        if server is None:
            _log(f"pid {pid}: olab's Prefect server is not running; exiting")
            return 0
        me = prefect_server.WarmProcess(pid=pid, started_at=datetime.now(timezone.utc), server_pid=server.pid, ready=False)
        prefect_server.write_warm_record(me)  # the lock's holder: `olab server stop` finds it while it imports
        started = time.monotonic()
        # Taken before the imports: a file edited while they run counts as changed.
        code = sources()
        defaults: dict[str, str] = {}
        _import(_first_modules(), defaults)
        import gc

        if others := threads():
            _log(f"pid {pid}: importing olab started threads ({', '.join(others)}); a process with threads cannot fork "
                 "safely; exiting")
            return 1
        gc.freeze()  # the imported objects stay in shared pages in every child
        return _listen(folder, lock, me, code, defaults, time.monotonic() - started)
    except _Stop:
        return 0
    finally:
        # The record its starter wrote, or its own: not one naming another warm process.
        if (record := prefect_server.read_warm_record()) and record.pid == pid:
            prefect_server.warm_record_file().unlink(missing_ok=True)


def _listen(folder: Path, lock: int, me, code: dict, defaults: dict[str, str], seconds: float) -> int:
    from dataclasses import replace

    from olab import prefect_server

    os.chdir(folder)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SOCKET_NAME)  # a killed one's: this process holds the lock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(SOCKET_NAME)  # relative: the folder may be deeper than a socket path can be
    finally:
        os.umask(old)
    os.chmod(SOCKET_NAME, 0o600)
    identity = os.stat(SOCKET_NAME).st_ino
    listener.listen(16)
    prefect_server.write_warm_record(replace(me, ready=True))
    _log(f"pid {me.pid}: ready in {seconds:.1f}s ({len(sys.modules)} modules) for olab's Prefect server pid {me.server_pid}")
    rest = [name for package in PACKAGES for name in _module_names(package) if name not in sys.modules]
    why = "stopped"  # unless it finds a reason of its own
    try:
        while True:
            _reap()
            if _readable(listener, 0 if rest else CHECK_SECONDS):
                reason = _accept(listener, lock, code, defaults)
            elif rest:
                reason = _import_one(rest, defaults)
            else:
                reason = _gone(folder, identity, me.server_pid)
            if reason:
                why = reason
                return 0
    finally:
        _log(f"pid {me.pid}: exiting: {why}")
        listener.close()
        with contextlib.suppress(OSError):
            if os.stat(folder / SOCKET_NAME).st_ino == identity:
                os.unlink(folder / SOCKET_NAME)


def _readable(sock: socket.socket, timeout: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout))


def _reap() -> None:
    """Collect the sessions that ended (each is this process's child)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _gone(folder: Path, identity: int, server_pid: int) -> str | None:
    """Why this warm process has nothing left to serve, or None."""
    from core.runner import pid_alive
    from olab import prefect_server

    try:
        if os.stat(folder / SOCKET_NAME).st_ino != identity:
            return f"its socket {folder / SOCKET_NAME} was replaced"
    except OSError:
        return f"its socket {folder / SOCKET_NAME} is gone (the olab home was removed?)"
    record = prefect_server.read_record()
    if record is None or record.pid != server_pid or not pid_alive(server_pid):
        return f"olab's Prefect server (pid {server_pid}) it was made for is gone"
    return None


def _accept(listener: socket.socket, lock: int, code: dict, defaults: dict[str, str]) -> str | None:
    """Take one request: refuse it (returns why this process must exit), decline it, or fork
    its session."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    fds: list[int] = []
    with conn:
        try:
            client, uid = _peer(conn)
            if uid != os.getuid():
                _log(f"refused a connection from pid {client}, uid {uid}: not this process's user")
                return None
            conn.settimeout(READY_SECONDS)
            data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
            request = json.loads(data) if data and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) else None
        except (OSError, ValueError):
            request = None
        try:
            if not isinstance(request, dict) or len(fds) != 3:
                _log("a request that could not be read; ignored")
                return None
            if why := changed(code, sources()):
                _log(f"refused olab {_command(request)} from pid {client}: {why}")
                _reply(conn, {"refused": why})
                return f"{why} since it started"
            if others := threads():  # none should run here: checked at every fork, not assumed
                why = f"threads run in it ({', '.join(others)}); a process with threads cannot fork safely"
                _log(f"refused olab {_command(request)} from pid {client}: {why}")
                _reply(conn, {"refused": why})
                return why
            if why := _declined(request):
                _log(f"declined olab {_command(request)} from pid {client}: {why}")
                _reply(conn, {"declined": why})
                return None
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                session = os.fork()
            except OSError as exc:  # out of processes or memory: the command runs in its own process
                _log(f"declined olab {_command(request)} from pid {client}: fork failed: {exc}")
                _reply(conn, {"declined": f"fork failed: {exc}"})
                return None
            if session == 0:
                status = 1
                try:
                    status = _session(conn, fds, request, defaults, close=[listener.fileno(), lock])
                finally:
                    os._exit(status)
            _log(f"olab {_command(request)} from pid {client}: session pid {session}")
        finally:
            for fd in fds:
                os.close(fd)
    return None


def _command(request: dict) -> str:
    """The command word, for the log (never its arguments: they may name what is private)."""
    argv = request.get("argv")
    words = [w for w in argv[1:] if isinstance(w, str)] if isinstance(argv, list) else []
    return command_of(words) or "?"


def _reply(conn: socket.socket, message: Mapping) -> None:
    with contextlib.suppress(OSError):
        conn.send(_encode(message))


def _declined(request: dict) -> str | None:
    if request.get("prefix") != sys.prefix:
        return f"the client runs Python from {request.get('prefix')}, this process from {sys.prefix}"
    if request.get("olab") != _OLAB:
        # `python -m olab` in a checkout other than the one installed, say.
        return f"the client runs olab from {request.get('olab')}, this process from {_OLAB}"
    env = request.get("env") if isinstance(request.get("env"), dict) else {}
    for name in START_UP_VARIABLES:
        if env.get(name) != os.environ.get(name):
            return f"the client's {name} differs from this process's (read when Python starts)"
    return None


def _session(conn: socket.socket, fds: list[int], request: dict, defaults: dict[str, str], *, close: list[int]) -> int:
    """A child of the warm process, for one command: waits for the client's go, forks the
    command process, forwards the client's signals to it and sends back its status."""
    os.setsid()  # `olab server stop` ends the warm process's process group, not the commands
    for fd in close:
        os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _reply(conn, {"ready": os.getpid()})
    go = _receive(conn, GO_SECONDS)
    if not go or go.get("go") is not True:
        return 0  # the client gave up waiting and runs the command itself
    me = os.getpid()
    # The client's signals are held from the fork until the command runs olab.cli.main with
    # its interpreter's handlers: a Ctrl-C forwarded at once is then a KeyboardInterrupt in
    # it, not lost (the kernel drops a signal whose action is "ignore", blocked or not).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    command = os.fork()
    if command == 0:
        status = 1
        try:
            status = _command_process(me, conn, fds, request, defaults, mask)
        finally:
            os._exit(status)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    with contextlib.suppress(OSError):
        os.setpgid(command, command)  # also here: a signal may come before the child sets it
    _reply(conn, {"started": command})
    return _relay(conn, command)


def _relay(conn: socket.socket, command: int) -> int:
    """Forward the client's signals to the command's process group until the command ends,
    then send its status; a client that is gone takes the command with it."""
    allowed = {int(s) for s in FORWARDED_SIGNALS}
    client = True
    with selectors.DefaultSelector() as selector:
        ended = os.pidfd_open(command)
        selector.register(conn, selectors.EVENT_READ, "client")
        selector.register(ended, selectors.EVENT_READ, "command")
        while True:
            for key, _ in selector.select():
                if key.data == "command":
                    _, status = os.waitpid(command, 0)
                    code = os.waitstatus_to_exitcode(status)
                    if client:
                        _reply(conn, {"exit": code} if code >= 0 else {"killed": -code})
                    os.close(ended)
                    return 0
                message = _receive(conn, 0)
                if message is None:  # the client is gone (killed): so is its command
                    selector.unregister(conn)
                    client = False
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(command, signal.SIGKILL)
                elif message.get("signal") in allowed:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(command, message["signal"])


def _die_with(parent: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the session died before the request took effect
        os._exit(1)


def _command_process(session: int, conn: socket.socket, fds: list[int], request: dict, defaults: dict[str, str],
                     mask: set) -> int:
    """Become the client's command and run it; returns its exit status."""
    os.setpgid(0, 0)
    _die_with(session)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    conn.close()
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    time.tzset()
    sys.argv = list(request["argv"])
    import tempfile

    tempfile.tempdir = None
    # Buffered as the command's own interpreter would buffer it: by line on a terminal or when
    # PYTHONUNBUFFERED asks (this process's stdout was made for its log file).
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=os.isatty(1) or unbuffered, write_through=unbuffered)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # Prefect read its settings and set up its console logging when the warm process imported
    # it: again, from this command's environment and for its terminal.
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()
    setup_logging(incremental=False)
    return _exit_status(request["argv"][1:], mask)


def _exit_status(args: list[str], mask: set) -> int:
    """olab.cli.main(args) as the interpreter would end it: its status, the threads it left
    joined, the atexit functions run (Prefect sends the last log lines there), stdio flushed."""
    import atexit
    import threading
    import traceback

    from olab.cli import main

    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal held since the fork arrives now
        status = main(args)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 130
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends the interpreter
        traceback.print_exc()
        status = 1
    threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return status if isinstance(status, int) else 1


if __name__ == "__main__":
    sys.exit(serve())
