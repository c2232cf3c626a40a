"""The one choke point for external commands.

Every command olab runs goes through :func:`run` (or :func:`start_background`
for long-lived servers), which gives masking of secrets in what is logged,
timeouts that kill the whole process group, streamed output, and typed errors.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("olab.runner")


# Every value of a secret store this process has opened: masked in whatever the
# runner logs or raises, whether or not a caller names it.
_known_secrets: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Mask these values in everything the runner logs or raises from now on."""
    _known_secrets.update(v for v in values if v and len(v) >= 4)


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted({*secrets, *_known_secrets}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "****")
    return text


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    output: str
    seconds: float


class CommandError(RuntimeError):
    """A command that failed; ``output_tail`` holds its last lines, masked."""

    def __init__(self, argv: Sequence[str], returncode: int | None, output_tail: str, *, timed_out: bool = False):
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output_tail = output_tail
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited {returncode}"
        last = output_tail.strip().splitlines()[-1] if output_tail.strip() else ""
        super().__init__(f"{Path(argv[0]).name} {what}" + (f": {last}" if last else ""))


class ToolMissing(RuntimeError):
    """A required program is not installed; the message says what to install."""


def run(
    argv: Sequence[str | os.PathLike],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    secrets: Iterable[str] = (),
    on_line: Callable[[str], None] | None = None,
    check: bool = True,
    tail_lines: int = 40,
    output_file: Path | None = None,
) -> CommandResult:
    """Run a command to completion, streaming its merged output line by line.

    Secrets must reach a command through ``env`` or files, never ``argv``;
    they are masked in everything logged or raised.

    With ``output_file`` (made 0600) the command writes there and is followed from it: it
    has no pipe to this process, so it outlives this process's death (a kill -9) and
    finishes what it began, where a pipe would break and kill it halfway (terraform, killed
    so, never releases its state lock).
    """
    args = [os.fspath(a) for a in argv]
    secrets = [s for s in secrets if s]
    log.debug("run: %s", mask(shlex.join(args), secrets))
    started = time.monotonic()
    sink = None
    if output_file is not None:
        output_file.parent.mkdir(parents=True, exist_ok=True)
        sink = open(os.open(output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        os.fchmod(sink.fileno(), 0o600)
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=sink if sink is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except FileNotFoundError:
        raise ToolMissing(f"{args[0]} is not installed or not on PATH") from None
    finally:
        if sink is not None:
            sink.close()
    lines: deque[str] = deque(maxlen=tail_lines)
    collected: list[str] = []
    timed_out = threading.Event()

    def _kill() -> None:
        timed_out.set()
        _signal_group(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, _kill) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        for raw in _followed(proc, output_file) if output_file is not None else proc.stdout:
            line = mask(raw.rstrip("\n"), secrets)
            lines.append(line)
            collected.append(line)
            if on_line:
                on_line(line)
        proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    result = CommandResult(tuple(args), proc.returncode, "\n".join(collected), time.monotonic() - started)
    if timed_out.is_set():
        raise CommandError([mask(a, secrets) for a in args], proc.returncode, "\n".join(lines), timed_out=True)
    if check and proc.returncode != 0:
        raise CommandError([mask(a, secrets) for a in args], proc.returncode, "\n".join(lines))
    return result


def _followed(proc: subprocess.Popen, path: Path):
    """The lines a running process writes to ``path``, as they come, until it ends."""
    with open(path, encoding="utf-8", errors="replace") as f:
        pending = ""
        while True:
            ended = proc.poll() is not None
            chunk = f.read()
            pending += chunk
            *complete, pending = pending.split("\n")
            for line in complete:
                yield line + "\n"
            if ended and not chunk:
                break
            if not chunk:
                time.sleep(0.05)
        if pending:
            yield pending


def start_background(
    argv: Sequence[str | os.PathLike],
    *,
    cwd: Path,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    umask: int = 0o077,
) -> int:
    """Start a server that outlives this process; returns its pid.

    It leads its own session, so that stopping it can reach every child, and
    runs with a private umask: what it writes (a database, pid files, logs)
    is readable by its owner only.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("start: %s", mask(shlex.join(args)))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        try:
            proc = subprocess.Popen(
                args,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=umask,
            )
        except FileNotFoundError:
            raise ToolMissing(f"{args[0]} is not installed or not on PATH") from None
    os.chmod(log_file, 0o600)
    return proc.pid


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        # Our own child: alive until waitpid reaps it. A process whose first thread has
        # ended shows as a zombie while its other threads still exit (and may still hold
        # its ports); waitpid tells the difference, /proc does not.
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        pass  # another process's child: look at it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    if fields is None:  # gone while we looked, or there but not ours to read
        return os.path.exists(f"/proc/{pid}")
    return fields[0] != "Z"


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command's name: [state, ppid, pgrp, ...]; None when it
    cannot be read (gone while we looked, or not ours to read)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` still running (zombies left out: they are gone
    but for their parent's reaping, which for an orphan is init's)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) is not None:
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_process(pid: int, *, grace_seconds: float = 20.0) -> bool:
    """SIGTERM a server (it cleans up its children), then SIGKILL its group; returns
    once the server and every process left in its group are gone (or after 5 s more).

    Returns True if it was running.
    """
    if not pid_alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    # What the server started and left behind in its group goes with it. Not by pid
    # alone once it is gone: its pid may be another process's by now.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # no group left (or a server that did not lead its own)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended just now
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (pid_alive(pid) or group_members(pid)):
        time.sleep(0.05)
    return True


class ServerDidNotStart(RuntimeError):
    """A background server that exited or never answered; the message carries its log's tail."""


def log_tail(log_file: Path, lines: int = 15) -> str:
    if not log_file.exists():
        return ""
    return mask("\n".join(log_file.read_text(errors="replace").splitlines()[-lines:]))


def start_server(
    argv: Sequence[str | os.PathLike],
    *,
    cwd: Path,
    log_file: Path,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    env: Mapping[str, str] | None = None,
    pid_file: Path | None = None,
    poll: float = 0.2,
) -> int:
    """Start a background server and poll ``ready`` until it answers.

    A server that exits, or does not answer within ``timeout``, is stopped and
    reported with the last lines of its log. With ``pid_file``, its pid is
    recorded there (for :func:`stop_pid_file`) once it answers.
    """
    pid = start_background(argv, cwd=cwd, log_file=log_file, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise ServerDidNotStart(f"{what} exited while starting; last lines of {log_file}:\n{log_tail(log_file)}")
        try:
            answered = ready()
        except Exception:  # noqa: BLE001 - a server still starting may refuse or reset
            answered = False
        if answered:
            if pid_file is not None:
                pid_file.parent.mkdir(parents=True, exist_ok=True)
                pid_file.write_text(str(pid))
            return pid
        time.sleep(poll)
    stop_process(pid)
    raise ServerDidNotStart(f"{what} did not answer within {timeout:.0f}s; last lines of {log_file}:\n{log_tail(log_file)}")


def http_answers(url: str, statuses: tuple[int, ...] = (200,), timeout: float = 2.0) -> bool:
    """Whether an HTTP server answers ``url`` with one of ``statuses`` (False if it cannot be reached)."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code in statuses
    except httpx.TransportError:
        return False


def read_pid_file(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def stop_pid_file(pid_file: Path, *, grace_seconds: float = 20.0) -> bool:
    """Stop the server a pid file names (if it runs) and remove the file.
    Returns True if it was running."""
    pid = read_pid_file(pid_file)
    stopped = stop_process(pid, grace_seconds=grace_seconds) if pid else False
    pid_file.unlink(missing_ok=True)
    return stopped
