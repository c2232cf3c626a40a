"""The warm process (olab.warm): a command that runs a flow goes to it through `python -m olab`
(the console script's entry point) and answers exactly as it would in its own process.

Fast tests: where the client looks, which commands go, when it must not send anything.
Slow tests: one real olab Prefect server and warm process for the module (a private
OLAB_HOME), real `olab` commands in subprocesses with an operator's environment: exit codes,
output on the client's own stdout and stderr, runs, logs and artifacts on the server, the
same warm process reused, Ctrl-C forwarded, kill -9 of the client and of the command, a
changed source file, a stale record, another user, `olab server status|stop`.

A long command for the signal tests: `olab stop` on a site whose hub record names a process
that ignores SIGTERM, so that stop-hub waits out its 30 s grace inside the site's lock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from core.config import load_site
from core.runner import pid_alive, stop_process
from olab import prefect_server, warm
from olab.__main__ import WARM_COMMANDS
from olab.warm import command_of
from olab.cli import FLOWS
from tests.conftest import REPO, SiteFactory
from tests.olab.test_prefect_server import TEMPORARY_SERVER, sleeper, wait_until  # noqa: F401 - a fixture

RUN_ID = re.compile(r"/runs/flow-run/([0-9a-f-]{36})")
# Waits on a busy 2-core machine: the warm process imports about 1800 modules before it answers.
READY_WITHIN = 300


# --- without a server ----------------------------------------------------------------------


def test_the_client_finds_the_socket_where_olab_keeps_its_prefect_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OLAB_HOME", str(tmp_path / "a" / ".." / "home"))
    assert warm.prefect_folder() == prefect_server.folder() == tmp_path / "home" / "prefect"
    monkeypatch.delenv("OLAB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert warm.prefect_folder() == prefect_server.folder() == tmp_path / "user" / ".olab" / "prefect"


def test_which_commands_go_to_the_warm_process():
    assert set(FLOWS) <= WARM_COMMANDS, "every command that runs a flow"
    assert "status" in WARM_COMMANDS
    assert not WARM_COMMANDS & {"server", "serve", "preview", "credentials", "secrets", "doctor", "lock"}
    assert command_of(["deploy", "--no-check"]) == "deploy"
    assert command_of(["--site", "lab", "up"]) == "up"
    assert command_of(["--site=lab", "status"]) == "status"
    assert command_of(["--help"]) is command_of(["--site"]) is command_of([]) is None


def test_it_watches_the_project_packages_and_the_console_script_is_the_client():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert sorted(warm.PACKAGES) == sorted(project["tool"]["setuptools"]["packages"])
    assert project["project"]["scripts"]["olab"] == "olab.__main__:main"


def test_a_changed_or_new_source_file_is_named():
    import site

    code = warm.sources()
    assert str(REPO / "olab" / "warm.py") in code and str(REPO / "core" / "config.py") in code
    assert set(site.getsitepackages()) <= set(code), "where packages are installed"
    assert warm.changed(code, dict(code)) is None
    path = str(REPO / "olab" / "cli.py")
    assert warm.changed(code, code | {path: (code[path][0] + 1, code[path][1])}) == f"{path} changed"
    assert warm.changed(code, code | {"/x/new.py": (1, 1)}) == "/x/new.py is new"
    assert warm.changed(code | {"/x/old.py": (1, 1)}, code) == "/x/old.py was removed"


def test_a_client_of_another_python_olab_or_start_up_environment_is_declined():
    import olab

    mine = {"prefix": sys.prefix, "olab": str(Path(olab.__file__).resolve().parent), "env": dict(os.environ)}
    assert warm._declined(mine) is None
    assert "runs Python from /elsewhere" in warm._declined(mine | {"prefix": "/elsewhere"})
    assert "runs olab from /other/checkout/olab" in warm._declined(mine | {"olab": "/other/checkout/olab"})
    other = mine["env"] | {"PYTHONPATH": "/somewhere"}
    assert "PYTHONPATH differs" in warm._declined(mine | {"env": other})


def _bound(folder: Path) -> socket.socket:
    """A socket bound at ``folder``/warm.sock, by a relative name as the warm process binds it
    (the path is longer than a socket address can be)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    here = os.getcwd()
    os.chdir(folder)
    try:
        sock.bind(warm.SOCKET_NAME)
    finally:
        os.chdir(here)
    return sock


def test_the_client_runs_in_process_when_nothing_answers_and_never_hangs(tmp_path, monkeypatch):
    # An olab home deep enough that its socket's path does not fit a socket address (107 bytes).
    monkeypatch.setenv("OLAB_HOME", str(tmp_path / ("deep-" * 20) / "home"))
    assert len(str(warm.prefect_folder() / warm.SOCKET_NAME)) > 107
    argv = ["olab", "stop", "--dry-run"]
    assert warm.run(argv) is None, "no olab home yet"

    # A socket file no process listens on any more (a killed warm process's).
    warm.prefect_folder().mkdir(parents=True)
    _bound(warm.prefect_folder()).close()
    assert warm.run(argv) is None
    # ... and a record saying it is starting: its process is gone, or it started too long ago.
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = datetime.now(timezone.utc)
    prefect_server.write_warm_record(prefect_server.WarmProcess(pid=gone.pid, started_at=now, server_pid=1, ready=False))
    assert warm.run(argv) is None
    long_ago = now - timedelta(seconds=warm.STARTING_SECONDS + 1)
    prefect_server.write_warm_record(prefect_server.WarmProcess(pid=os.getpid(), started_at=long_ago, server_pid=1, ready=False))
    assert warm.run(argv) is None

    # A process that listens and never answers (hung): the client gives up; it never said go.
    (warm.prefect_folder() / warm.SOCKET_NAME).unlink()
    hung = _bound(warm.prefect_folder())
    hung.listen(4)
    with hung:
        assert warm.run(argv) is None
        conn, _ = hung.accept()
        with conn:
            data, fds, _, _ = socket.recv_fds(conn, warm.MAX_MESSAGE, 3)
            for fd in fds:
                os.close(fd)
            assert json.loads(data)["argv"] == argv and len(fds) == 3
            conn.setblocking(False)
            assert conn.recv(100) == b"", "the client closed without telling it to run anything"

        # OLAB_NO_WARM: not even a connection.
        monkeypatch.setenv(warm.NO_WARM_VARIABLE, "1")
        assert warm.run(argv) is None
        hung.setblocking(False)
        with pytest.raises(BlockingIOError):
            hung.accept()


NOBODY = 65534
# Another user's listener where this user's warm process would be: it reports how many bytes
# it got from the client before the client hung up.
OTHER_USERS_LISTENER = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.bind(sys.argv[1])
sock.listen(1)
print("listening", flush=True)
sock.settimeout(60)
conn, _ = sock.accept()
conn.settimeout(10)
print(len(conn.recv(1 << 20)), flush=True)
"""


def python_of_another_user() -> str:
    """A Python that user NOBODY can run (pyenv's may sit in root's 0700 home); skips without one."""
    if os.geteuid() != 0:
        pytest.skip("running a process as another user needs root")
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([candidate, "-c", ""], user=NOBODY, cwd="/", check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.CalledProcessError):
            continue
        return candidate
    pytest.skip(f"no Python here that uid {NOBODY} may run")


def test_a_socket_of_another_user_gets_nothing_from_the_client(monkeypatch):
    python = python_of_another_user()
    home = Path(tempfile.mkdtemp(prefix="olab-warm-other-"))  # outside pytest's 0700 folders
    try:
        folder = home / "prefect"
        folder.mkdir()
        home.chmod(0o711)
        folder.chmod(0o777)
        monkeypatch.setenv("OLAB_HOME", str(home))
        monkeypatch.setenv("OLAB_TEST_SECRET", "s3cret-value")
        other = subprocess.Popen([python, "-c", OTHER_USERS_LISTENER, str(folder / warm.SOCKET_NAME)],
                                 user=NOBODY, stdout=subprocess.PIPE, text=True, cwd="/")
        try:
            assert other.stdout.readline().strip() == "listening"
            assert (folder / warm.SOCKET_NAME).stat().st_uid == NOBODY
            assert warm.run(["olab", "stop"]) is None
            assert other.stdout.readline().strip() == "0", "the client sent its request to another user's process"
        finally:
            other.kill()
            other.wait()
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=True)


# --- with the real server and warm process --------------------------------------------------


class Lab:
    """One private olab home with olab's Prefect server and warm process, and its sites."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.sites = SiteFactory(root / "sites")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != warm.NO_WARM_VARIABLE}
        # This checkout's olab in every process: the warm process starts outside the checkout,
        # where an editable install of another checkout would win (and it would decline).
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = clean | {"OLAB_HOME": str(self.home), "PREFECT_HOME": str(root / "client-prefect-home"),
                            "PYTHONPATH": path}
        self.site = self.sites("warm")

    def olab(self, *argv: str, env: dict | None = None, cwd: Path = REPO, module: str = "olab") -> subprocess.CompletedProcess:
        """The command, run to its end; the result's ``pid`` is the client's."""
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd, env=env or self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=600)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        done.pid = proc.pid
        return done

    def background(self, name: str, *argv: str) -> tuple[subprocess.Popen, Path, Path]:
        out, err = self.root / f"{name}.out", self.root / f"{name}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "olab", *argv], cwd=REPO, env=self.env, stdout=stdout, stderr=stderr)
        return proc, out, err

    def warm_log(self) -> str:
        return prefect_server.warm_log_file().read_text()

    def ran_warm(self, client_pid: int) -> bool:
        return f" from pid {client_pid}: session pid " in self.warm_log()

    def ready(self) -> prefect_server.WarmProcess:
        """The warm process, once it answers (started by the last command that ran a flow)."""
        wait_until(lambda: (found := prefect_server.warm_running()) is not None and found.ready
                   and (prefect_server.folder() / warm.SOCKET_NAME).exists(), READY_WITHIN, "the warm process answers")
        return prefect_server.warm_running()

    def api(self, path: str, body: dict | None = None):
        server = prefect_server.read_record()
        login = ("olab", prefect_server.credential().partition(":")[2])
        response = (httpx.post(f"{server.url}{path}", json=body, auth=login, timeout=30) if body is not None
                    else httpx.get(f"{server.url}{path}", auth=login, timeout=30))
        response.raise_for_status()
        return response.json()

    def state(self, run_id: str) -> str:
        return self.api(f"/flow_runs/{run_id}")["state"]["type"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    before = os.environ.get("OLAB_HOME")
    the_lab = Lab(root)
    os.environ["OLAB_HOME"] = str(the_lab.home)
    try:
        # In its own process: starts olab's server, and the warm process as it ends.
        first = the_lab.olab("stop", "--dry-run", "--site", str(the_lab.site), module="olab.cli")
        assert first.returncode == 0, first.stdout + first.stderr
        the_lab.ready()
        yield the_lab
    finally:
        prefect_server.stop()
        if before is None:
            os.environ.pop("OLAB_HOME", None)
        else:
            os.environ["OLAB_HOME"] = before


@pytest.fixture
def stubborn_hub(lab):
    """The site's hub record names a process that ignores SIGTERM: `olab stop` then waits 30 s
    for it inside the site's lock."""
    from tasks.local_hub import PROCESS_RECORD, LocalHubProcess

    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"up\n"
    site = load_site(str(lab.site))
    site.paths.hub.mkdir(parents=True, exist_ok=True)
    (site.paths.hub / PROCESS_RECORD).write_text(LocalHubProcess(pid=proc.pid, config_hash="stubborn").model_dump_json())
    yield site
    proc.kill()
    proc.wait()


def holder(site) -> dict | None:
    from core.guard import read_holder

    return read_holder(site)


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))


def stop_in_the_lock(lab: Lab, site, name: str) -> tuple[subprocess.Popen, Path, int, str]:
    """`olab stop` through the warm process, once its command holds the site's lock (waiting
    for the stubborn hub): the client, its stderr file, the command's pid and its run's id."""
    lab.ready()
    client, _, err = lab.background(name, "stop", "--site", str(lab.site))

    def taken() -> bool:
        pid = (holder(site) or {}).get("pid")
        return (pid not in (None, client.pid) and pid_alive(pid)) or client.poll() is not None

    wait_until(taken, READY_WITHIN, "the command took the site's lock")
    assert client.poll() is None, "the command ended before it was signalled"
    return client, err, holder(site)["pid"], RUN_ID.search(err.read_text()).group(1)


def next_flow_marks_crashed(lab: Lab, run_id: str) -> None:
    after = lab.olab("stop", "--dry-run", "--site", str(lab.site))
    assert after.returncode == 0, after.stderr
    assert "marked Crashed in Prefect" in after.stderr
    assert lab.state(run_id) == "CRASHED"


@pytest.mark.slow
def test_a_command_in_the_warm_process_answers_as_in_its_own(lab):
    process = lab.ready()
    site = str(lab.site)
    done = [lab.olab("stop", "--dry-run", "--site", site, env=lab.env | {"OLAB_TEST_SECRET": "s3cret-value"}) for _ in (1, 2)]
    for proc in done:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert lab.ran_warm(proc.pid)
        # Its output is on the client's own stdout and stderr (the warm process's log has none of it).
        assert "dry run of stop-hub on site warm: nothing was changed" in proc.stdout
        assert "Beginning flow run" in proc.stderr and "Finished in state Completed()" in proc.stderr
        assert TEMPORARY_SERVER not in proc.stderr
    log = lab.warm_log()
    assert "Beginning flow run" not in log and "dry run" not in log and "s3cret-value" not in log
    assert f"olab stop from pid {done[0].pid}: session pid " in log, "the command word, and nothing else of argv"
    assert site not in log
    assert prefect_server.warm_running() == process, "the same warm process served both"
    # It forks with no thread but its main one (a fork copies a lock another thread holds).
    assert os.listdir(f"/proc/{process.pid}/task") == [str(process.pid)]
    status = lab.olab("status", "--site", site)
    assert status.returncode == 0 and lab.ran_warm(status.pid), status.stderr

    # Its run, logs and artifact are on olab's server, as an in-process command's are.
    run_id = RUN_ID.search(done[-1].stderr).group(1)
    assert lab.state(run_id) == "COMPLETED"
    logs = lab.api("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
    assert any("took the lifecycle lock of site warm" in entry["message"] for entry in logs)
    artifacts = lab.api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    assert any("stop-hub" in (a.get("description") or "") + (a.get("data") or "") for a in artifacts), artifacts

    # The command's working folder and environment are the client's.
    relative = lab.olab("stop", "--dry-run", "--site", lab.site.name, cwd=lab.site.parent)
    assert relative.returncode == 0, relative.stderr
    # Prefect's settings too: read again from the client's environment, not the ones the warm
    # process imported Prefect with (it has no PREFECT_LOGGING_LEVEL, so logs at INFO).
    quiet = lab.olab("stop", "--dry-run", "--site", site, env=lab.env | {"PREFECT_LOGGING_LEVEL": "WARNING"})
    assert quiet.returncode == 0 and lab.ran_warm(quiet.pid), quiet.stderr
    assert "dry run of stop-hub" in quiet.stdout and "Beginning flow run" not in quiet.stderr
    elsewhere = lab.olab("stop", "--dry-run", "--site", site, env=lab.env | {"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert elsewhere.returncode != 0 and lab.ran_warm(elsewhere.pid)
    assert "127.0.0.1:9" in elsewhere.stderr, "the client's Prefect API, not olab's server"
    failing = lab.olab("stop", "--dry-run", "--site", site, env=lab.env | {"OLAB_LOCK_WAIT_SECONDS": "never"})
    assert failing.returncode == 1
    reason = "OLAB_LOCK_WAIT_SECONDS='never': give the seconds to wait for a site's lock (a number, 0 or more)"
    assert failing.stderr.strip().splitlines()[-1] == f"olab stop: FAILED: {reason}"
    assert lab.state(RUN_ID.search(failing.stderr).group(1)) == "FAILED"
    usage = lab.olab("stop", "--no-such-option", "--site", site)
    assert usage.returncode == 2 and "unrecognized arguments: --no-such-option" in usage.stderr
    assert prefect_server.warm_running() == process

    # Nothing of it is readable by another user.
    folder = prefect_server.folder()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in (warm.SOCKET_NAME, "warm.json", "warm.log", warm.LOCK_NAME):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


@pytest.mark.slow
def test_the_warm_process_refuses_another_user_even_through_an_open_socket(lab):
    python = python_of_another_user()
    lab.ready()
    folder = prefect_server.folder()
    path = folder / warm.SOCKET_NAME
    # Only to reach the peer check: folder and socket opened to others for the test's length.
    dir_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        folder.chmod(0o711)
        path.chmod(0o666)
        connect = (f"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
                   f"s.connect('/proc/self/fd/{dir_fd}/{warm.SOCKET_NAME}'); s.settimeout(30); print(len(s.recv(1 << 20)))")
        other = subprocess.run([python, "-c", connect], user=NOBODY, pass_fds=(dir_fd,), cwd="/",
                               capture_output=True, text=True, timeout=60)
    finally:
        folder.chmod(0o700)
        path.chmod(0o600)
        os.close(dir_fd)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "0", "the warm process answered another user"
    assert f"uid {NOBODY}: not this process's user" in lab.warm_log()


@pytest.mark.slow
def test_ctrl_c_reaches_the_command_and_the_client_exits_with_its_status(lab, stubborn_hub):
    client, err, command, run_id = stop_in_the_lock(lab, stubborn_hub, "interrupted")
    # The command process is a child of its session, a child of the warm process.
    assert parent_of(parent_of(command)) == prefect_server.warm_running().pid
    client.send_signal(signal.SIGINT)
    assert client.wait(120) == 130
    assert "olab stop: interrupted" in err.read_text()
    assert lab.ran_warm(client.pid)
    assert not pid_alive(command) and holder(stubborn_hub) is None, "the flow let go of the site's lock"
    assert lab.state(run_id) not in ("RUNNING", "PENDING")


@pytest.mark.slow
def test_a_ctrl_c_forwarded_as_the_command_starts_is_its_keyboard_interrupt(lab):
    """The client's protocol by hand, to send SIGINT in the same breath as the go: the
    session forwards it while the command is still becoming the command (its Prefect set-up
    takes a tenth of a second), when it must be neither lost nor an error of the set-up."""
    lab.ready()
    sock = warm._connect(prefect_server.folder())
    assert sock is not None
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    request = {"argv": ["olab", "stop", "--dry-run", "--site", str(lab.site)], "cwd": str(REPO), "env": lab.env,
               "umask": 0o022, "prefix": sys.prefix, "olab": warm._OLAB}
    messages = []
    with sock, open(os.devnull) as null:
        socket.send_fds(sock, [json.dumps(request).encode()], [null.fileno(), out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        assert "ready" in warm._receive(sock, 60)
        sock.send(json.dumps({"go": True}).encode())
        sock.send(json.dumps({"signal": int(signal.SIGINT)}).encode())
        while (message := warm._receive(sock, 300)) is not None:
            messages.append(message)
            if "exit" in message or "killed" in message:
                break
    with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
        stdout, stderr = out.read(), err.read()
    assert messages and "started" in messages[0], messages
    assert messages[-1] == {"exit": 130}, stderr
    assert "KeyboardInterrupt" in stderr and "dry run of stop-hub" not in stdout


@pytest.mark.slow
def test_kill_9_of_the_client_kills_its_command_and_the_next_flow_marks_the_run_crashed(lab, stubborn_hub):
    client, _, command, run_id = stop_in_the_lock(lab, stubborn_hub, "killed-client")
    client.send_signal(signal.SIGKILL)
    client.wait()
    wait_until(lambda: not pid_alive(command), 60, "the command died with its client")
    assert holder(stubborn_hub)["pid"] == command, "killed holding the lock: its record stays"
    assert lab.state(run_id) == "RUNNING", "a process killed outright says nothing"
    next_flow_marks_crashed(lab, run_id)


@pytest.mark.slow
def test_kill_9_of_the_command_is_reported_by_the_client_and_its_run_marked_crashed(lab, stubborn_hub):
    client, err, command, run_id = stop_in_the_lock(lab, stubborn_hub, "killed-command")
    os.kill(command, signal.SIGKILL)
    assert client.wait(60) == 128 + signal.SIGKILL
    assert f"olab: the command's process (pid {command}) was killed by SIGKILL" in err.read_text()
    next_flow_marks_crashed(lab, run_id)


@pytest.mark.slow
def test_kill_9_of_the_session_takes_its_command_and_the_client_says_so(lab, stubborn_hub):
    client, err, command, run_id = stop_in_the_lock(lab, stubborn_hub, "killed-session")
    session = parent_of(command)
    assert parent_of(session) == prefect_server.warm_running().pid
    os.kill(session, signal.SIGKILL)
    assert client.wait(60) == 1
    assert f"olab: lost the warm process that ran this command (pid {command})" in err.read_text()
    wait_until(lambda: not pid_alive(command), 60, "the command died with its session (PR_SET_PDEATHSIG)")
    assert prefect_server.warm_running() is not None, "the warm process itself goes on"
    next_flow_marks_crashed(lab, run_id)


@pytest.mark.slow
def test_olab_no_warm_runs_the_command_in_its_own_process(lab):
    process = lab.ready()
    proc = lab.olab("stop", "--dry-run", "--site", str(lab.site), env=lab.env | {warm.NO_WARM_VARIABLE: "1"})
    assert proc.returncode == 0 and "dry run of stop-hub" in proc.stdout, proc.stderr
    assert not lab.ran_warm(proc.pid)
    assert prefect_server.warm_running() == process


@pytest.mark.slow
def test_a_changed_source_file_makes_it_refuse_and_exit_and_the_client_run_in_process(lab):
    process = lab.ready()
    source = REPO / "olab" / "__init__.py"
    before = source.stat()
    client = None
    try:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        client, out, err = lab.background("stale", "stop", "--dry-run", "--site", str(lab.site))
        wait_until(lambda: f"refused olab stop from pid {client.pid}: {source} changed" in lab.warm_log()
                   or client.poll() is not None, 120, "the warm process refused")
    finally:
        # Back as it was, so that the warm process this command starts as it ends is not stale.
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert client.wait(600) == 0, err.read_text()
    assert "dry run of stop-hub" in out.read_text()
    assert f"refused olab stop from pid {client.pid}: {source} changed" in lab.warm_log()
    assert not lab.ran_warm(client.pid)
    wait_until(lambda: not pid_alive(process.pid), 30, "the stale warm process exited")
    assert lab.ready().pid != process.pid, "the command that ran in-process started a new one"


@pytest.mark.slow
def test_two_olab_homes_each_have_their_own_warm_process(lab):
    process = lab.ready()
    other = lab.root / "other-home"
    env = lab.env | {"OLAB_HOME": str(other)}
    site = str(lab.sites("other"))
    folder = other / "prefect"
    try:
        # Its first command runs in its own process (none answers in that home), starts that
        # home's server and, as it ends, that home's warm process.
        first = lab.olab("stop", "--dry-run", "--site", site, env=env)
        assert first.returncode == 0, first.stderr
        assert not lab.ran_warm(first.pid)

        def other_ready() -> bool:
            try:
                return json.loads((folder / "warm.json").read_text())["ready"] and (folder / warm.SOCKET_NAME).exists()
            except (OSError, ValueError):
                return False

        wait_until(other_ready, READY_WITHIN, "the other home's warm process answers")
        second = lab.olab("stop", "--dry-run", "--site", site, env=env)
        assert second.returncode == 0 and "dry run of stop-hub" in second.stdout, second.stderr
        assert f" from pid {second.pid}: session pid " in (folder / "warm.log").read_text()
        assert not lab.ran_warm(second.pid)
        other_pid = json.loads((folder / "warm.json").read_text())["pid"]
        assert other_pid != process.pid and prefect_server.warm_running() == process
        mine = lab.olab("stop", "--dry-run", "--site", str(lab.site))
        assert mine.returncode == 0 and lab.ran_warm(mine.pid), mine.stderr
        assert f" from pid {mine.pid}: " not in (folder / "warm.log").read_text()
    finally:
        stopped = lab.olab("server", "stop", env=env)
    assert stopped.returncode == 0 and f"stopped olab's warm process (pid {other_pid})" in stopped.stdout
    assert prefect_server.warm_running() == process, "stopping one home's leaves the other's"


@pytest.mark.slow
def test_it_exits_with_its_server_a_stale_record_is_replaced_and_server_status_and_stop_handle_it(lab, sleeper):
    process = lab.ready()
    server = prefect_server.read_record()
    stop_process(server.pid)  # the server alone, as a crash would end it
    wait_until(lambda: not pid_alive(process.pid), 60, "the warm process exited after its server")
    assert f"pid {process.pid}: exiting: olab's Prefect server (pid {server.pid}) it was made for is gone" in lab.warm_log()
    folder = prefect_server.folder()
    assert prefect_server.read_warm_record() is None and not (folder / warm.SOCKET_NAME).exists()

    # A record naming a live process that is not the warm process (pid reuse), and a socket
    # file nobody listens on: the next command runs in-process, without a hang, and starts a
    # new warm process as it ends; the other process is never touched.
    prefect_server.write_warm_record(prefect_server.WarmProcess(pid=sleeper.pid, started_at=datetime.now(timezone.utc),
                                                                server_pid=1, ready=True))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(folder / warm.SOCKET_NAME))
    dead.close()
    status = lab.olab("server", "status")
    assert "olab's warm process: not running" in status.stdout
    first = lab.olab("stop", "--dry-run", "--site", str(lab.site))
    assert first.returncode == 0, first.stderr
    assert not lab.ran_warm(first.pid)
    starting = prefect_server.read_warm_record()
    assert starting and not starting.ready and starting.pid != sleeper.pid and sleeper.poll() is None
    # A command right after it waits for the warm process it started (still importing),
    # rather than import the same modules beside it.
    second = lab.olab("stop", "--dry-run", "--site", str(lab.site))
    assert second.returncode == 0 and lab.ran_warm(second.pid), second.stderr
    process = lab.ready()
    assert process.pid == starting.pid

    status = lab.olab("server", "status")
    assert status.returncode == 0
    assert "olab's warm process: running" in status.stdout and f"pid      {process.pid}" in status.stdout
    off = lab.olab("server", "status", env=lab.env | {warm.NO_WARM_VARIABLE: "1"})
    assert f"olab's warm process: off ({warm.NO_WARM_VARIABLE} is set" in off.stdout

    stopped = lab.olab("server", "stop")
    assert f"stopped olab's warm process (pid {process.pid})" in stopped.stdout
    assert not pid_alive(process.pid) and prefect_server.read_warm_record() is None
    assert not (folder / warm.SOCKET_NAME).exists()
    assert "olab's warm process: not running" in lab.olab("server", "status").stdout
