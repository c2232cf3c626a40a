"""Execute lab notebooks inside a user environment and report each as one JSON line.

This file runs with the *user environment's* Python (the image's, or a venv's), so it
imports nothing from olab: only what every user environment carries (nbformat, nbclient,
jupyter_client, ipykernel). Each lab's result is a line ``RESULT_MARK {json}`` on stdout,
written when that lab ends; the exit status is 0 when every lab passed.

    python labrunner.py --timeout SECONDS --parallel N LAB.ipynb [LAB.ipynb ...]

Every lab runs in a kernel of its own, started for it and killed after it, in an empty
working folder of its own, ``--parallel`` labs at a time. By default (``--kernels forked``) the kernels are forked from one
*zygote* process that has already imported ipykernel and the modules two or more of the
labs import (numpy, scipy, matplotlib, ...): those imports are done once per run instead of
once per lab, which was most of what a lab cost. A forked kernel is still a new process
that has run nothing but imports: its namespace is empty and it holds no state from any
other lab; numpy's global generator is seeded anew in each, as in a fresh process (what
stays shared is Python's string-hash salt, drawn once per zygote). ``--kernels fresh``
starts each kernel the ordinary way (``python -m ipykernel_launcher``): what the benchmark
compares with. A library that misbehaves in a forked process belongs in NEVER_WARM.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import atexit
import json
import os
import re
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback as tb
import uuid
from pathlib import Path

RESULT_MARK = "olab-lab-result"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A traceback tells the author where their cell went wrong in its last frames; a lab that
# fails deep inside scipy should not fill the CLI or the artifact with hundreds of lines.
TRACEBACK_FRAMES = 3
TRACEBACK_CHARS = 4000
# Never imported ahead in the zygote: ROOT (and cppyy, its binding) installs C signal
# handlers for SIGSEGV, SIGCHLD, SIGALRM and eight more when it starts (measured:
# /proc/self/status SigCgt), which every forked kernel would inherit, labs that never
# import ROOT included.
NEVER_WARM = ("ROOT", "cppyy")
# What a lab's `%matplotlib inline` imports.
INLINE_BACKEND = "matplotlib_inline.backend_inline"
# The kernel itself, and what it imports when it starts (measured: sys.modules before and
# after IPKernelApp.initialize): its application, its kernel class, the debugger (debugpy
# and pydevd, the largest part), the history's sqlite3 and tornado's queues.
KERNEL_MODULES = ("ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.debugger", "IPython.core.history",
                  "tornado.queues")


def _first_line(source):
    for line in source.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line[:80]
    return ""


def _traceback(cell, fallback):
    """The failing cell's traceback without ANSI colours: IPython's header dropped, the last
    frames and the exception line kept, at most TRACEBACK_CHARS (its tail)."""
    parts = next((out.get("traceback") for out in cell.get("outputs", []) if out.get("output_type") == "error"), None)
    parts = [ANSI.sub("", part).rstrip() for part in (parts or fallback.splitlines())]
    parts = [p for p in parts if p and set(p) != {"-"} and not p.endswith("Traceback (most recent call last)")]
    if not parts:
        return None
    frames, last = parts[:-1], parts[-1]
    kept = frames[-TRACEBACK_FRAMES:]
    if len(frames) > len(kept):
        kept.insert(0, f"... {len(frames) - len(kept)} earlier frames")
    text = "\n".join([*kept, last])
    return text if len(text) <= TRACEBACK_CHARS else "...\n" + text[-TRACEBACK_CHARS:].split("\n", 1)[-1]


# --- which imports to do once ------------------------------------------------------------


def cell_imports(source):
    """The absolute module names a code cell imports at its top level (``from a import b``
    names both ``a`` and ``a.b``: b may be a submodule), plus the inline backend for
    ``%matplotlib inline``. IPython's magics and shell lines are not Python: skipped."""
    names = set()
    lines = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(("%", "!")):
            if stripped.split()[:2] == ["%matplotlib", "inline"]:
                names.add(INLINE_BACKEND)
            lines.append("")
        else:
            lines.append(line)
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return names
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def notebook_imports(notebook):
    """Every module a notebook (its JSON as a dict) imports in its code cells."""
    names = set()
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            source = cell.get("source", "")
            names |= cell_imports("".join(source) if isinstance(source, list) else source)
    return names


def shared_imports(notebooks):
    """The modules worth importing once for all: those two or more of the notebooks import
    (one lab's own import is done once anyway), never one in NEVER_WARM."""
    counts = {}
    for notebook in notebooks:
        for name in notebook_imports(notebook):
            counts[name] = counts.get(name, 0) + 1
    return sorted(name for name, n in counts.items()
                  if n >= 2 and name.split(".")[0] not in NEVER_WARM)


def run_order(paths, notebooks, warmed):
    """Labs that import packages of their own (not imported in the zygote: ROOT alone takes
    about 5 s) first, so that the slowest labs do not start last; otherwise as given."""
    done = {name.split(".")[0] for name in warmed} | set(sys.stdlib_module_names)
    own = {path: len({name.split(".")[0] for name in notebook_imports(nb)} - done) for path, nb in zip(paths, notebooks)}
    return sorted(paths, key=lambda path: -own[path])


# --- the zygote: one process that imports once and forks a kernel per lab ------------------


def zygote_main(modules):
    """Import, then fork one kernel per request read on stdin until stdin closes.

    Protocol, one JSON object a line: requests ``{"id", "args", "cwd", "env"}`` on stdin;
    on stdout ``{"ready": [modules imported]}`` once, ``{"id", "pid"}`` per fork and
    ``{"pid", "exit"}`` when a kernel ends. Its kernels die with it.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    # What an import or a kernel prints goes to stderr, never into the protocol.
    os.dup2(2, 1)
    runner_dir = sys.path[0]
    warmed = []
    for name in modules:
        try:
            __import__(name)
            warmed.append(name)
        except Exception:  # the lab's own import will report it in its cell
            pass
    for name in KERNEL_MODULES:
        __import__(name)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    proto.write(json.dumps({"ready": warmed}) + "\n")
    kernels = set()
    pending = b""

    def reap():
        while kernels:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            kernels.discard(pid)
            proto.write(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}) + "\n")

    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                os.read(wake_r, 4096)
                reap()
                continue
            data = os.read(0, 65536)
            if not data:
                for pid in kernels:
                    _kill_group(pid)
                proto.flush()
                # Nothing to clean up; tearing down numpy, scipy and the rest at exit took
                # seconds on a busy machine, on every run's critical path.
                os._exit(0)
            pending += data
            *requests, pending = pending.split(b"\n")
            for line in requests:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _become_kernel(request, runner_dir, [proto.fileno(), wake_r, wake_w, selector])
                kernels.add(pid)
                proto.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _become_kernel(request, runner_dir, inherited):
    """In the forked child: shed the zygote, then run ipykernel as `python -m
    ipykernel_launcher ARGS` would, in the cwd and environment jupyter_client chose."""
    code = 1
    try:
        os.setsid()  # its own process group: a signal to the kernel reaches what it starts
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        inherited[-1].close()
        for fd in inherited[:-1]:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # As for a kernel jupyter_client launches, JPY_PARENT_PID names its parent: the zygote.
        os.environ["JPY_PARENT_PID"] = str(os.getppid())
        # A fresh process seeds numpy's global generator from the OS; a fork would repeat
        # the zygote's state in every lab (Python's random reseeds itself at fork).
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        # The zygote's folder is first on its sys.path where `python -m` puts the cwd, which
        # ipykernel_launcher drops (IPython then adds the kernel's cwd): drop it likewise.
        if sys.path and sys.path[0] == runner_dir:
            del sys.path[0]
        from ipykernel import kernelapp

        # What `python -m ipykernel_launcher` puts in sys.argv: the launcher's file, beside ipykernel.
        sys.argv = [str(Path(kernelapp.__file__).parent.parent / "ipykernel_launcher.py"), *request["args"]]
        # ipykernel read JPY_PARENT_PID (unset) when the zygote imported it: name the parent
        # here, so that the kernel ends when the zygote does.
        kernelapp.IPKernelApp.launch_instance(parent_handle=os.getppid())
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        tb.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a kernel's interpreter would run at its exit
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Zygote:
    """The runner's end of the zygote: forks kernels on request and learns when they end."""

    def __init__(self, process):
        self.process = process
        self.ready = asyncio.get_running_loop().create_future()
        self.waiting = {}
        self.exits = {}
        self.ids = 0
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, modules):
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--zygote", *modules, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _read(self):
        while line := await self.process.stdout.readline():
            message = json.loads(line)
            if "ready" in message:
                self.ready.set_result(message["ready"])
            elif "exit" in message:
                self.exits[message["pid"]] = message["exit"]
            else:
                self.waiting.pop(message["id"]).set_result(message["pid"])
        gone = RuntimeError(f"the kernel zygote exited ({await self.process.wait()})")
        for future in [self.ready, *self.waiting.values()]:
            if not future.done():
                future.set_exception(gone)

    async def fork(self, args, cwd, env):
        await self.ready
        self.ids += 1
        future = self.waiting[self.ids] = asyncio.get_running_loop().create_future()
        request = {"id": self.ids, "args": args, "cwd": str(cwd), "env": dict(env)}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        await self.process.stdin.drain()
        return ForkedProcess(await future, self)

    async def close(self):
        self.process.stdin.close()
        await self.process.wait()
        await self.reader


class ForkedProcess:
    """A forked kernel as jupyter_client's LocalProvisioner handles a Popen: it is the
    zygote's child, so its exit status comes from the zygote."""

    stdin = stdout = stderr = None

    def __init__(self, pid, zygote):
        self.pid = pid
        self.zygote = zygote

    def poll(self):
        return self.zygote.exits.get(self.pid)

    def wait(self, timeout=None):
        # The provisioner polls until poll() answers before it waits.
        return self.zygote.exits.get(self.pid)

    def send_signal(self, signum):
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:  # not yet the leader of its own group
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


def forked_kernel_manager(zygote):
    """An AsyncKernelManager whose ipykernel kernels are forked by ``zygote``.

    Only ``ipykernel_launcher`` run by this very Python is forked (what the zygote imported
    is what that kernel would import); any other kernel command starts as jupyter_client
    starts it."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import LocalProvisioner

    class ForkedProvisioner(LocalProvisioner):
        async def launch_kernel(self, cmd, **kwargs):
            # jupyter_client has made the spec's "python" this Python (format_kernel_cmd).
            if cmd[:3] != [sys.executable, "-m", "ipykernel_launcher"]:
                return await super().launch_kernel(cmd, **kwargs)
            self.cwd = kwargs.get("cwd") or os.getcwd()
            self.process = await zygote.fork(cmd[3:], self.cwd, kwargs["env"])
            self.pid = self.pgid = self.process.pid
            return self.connection_info

    class ForkedKernelManager(AsyncKernelManager):
        async def _async_pre_start_kernel(self, **kw):
            if self.provisioner is None:
                self.kernel_id = self.kernel_id or kw.pop("kernel_id", None) or str(uuid.uuid4())
                self.provisioner = ForkedProvisioner(kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self)
            return await super()._async_pre_start_kernel(**kw)

    return ForkedKernelManager


# --- running the labs ------------------------------------------------------------------


async def run_lab(path, timeout, manager_class):
    """Execute one lab in a kernel of its own (``manager_class``'s; jupyter_client's own
    when None), then kill it; the result as a dict, never an exception."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    started = time.monotonic()
    # Its own empty working folder: a file one lab writes beside it is not there for the next.
    work = Path(tempfile.mkdtemp(prefix=f"{Path(path).stem}-", dir="."))
    result = {"lab": Path(path).stem, "status": "passed", "failing_cell": None, "cell_excerpt": None,
              "error": None, "traceback": None, "kernel_seconds": None}
    current = {"index": None}
    nb = None

    def on_cell_start(cell, cell_index, **_):
        current["index"] = cell_index

    def on_notebook_start(**_):
        # The kernel has answered kernel_info: how long this lab waited for one.
        result["kernel_seconds"] = round(time.monotonic() - started, 3)

    options = {} if manager_class is None else {"kernel_manager_class": manager_class}
    try:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            allow_errors=False,
            on_cell_start=on_cell_start,
            on_notebook_start=on_notebook_start,
            resources={"metadata": {"path": str(work)}},
            # The lab's outcome is known when its last cell returns: its kernel is killed,
            # not asked to finish its own shutdown.
            shutdown_kernel="immediate",
            **options,
        )
        await client.async_execute()
    except CellExecutionError as exc:
        result.update(status="failed", error=f"{exc.ename}: {exc.evalue}".strip())
        if current["index"] is not None:
            result["traceback"] = _traceback(nb.cells[current["index"]], exc.traceback)
    except CellTimeoutError:
        result.update(status="timeout", error=f"a cell ran longer than {timeout}s")
    except DeadKernelError as exc:
        result.update(status="error", error=f"kernel died: {exc}")
    except Exception as exc:  # the result must always be reported
        result.update(status="error", error=f"{type(exc).__name__}: {exc}")
    if result["status"] != "passed" and current["index"] is not None:
        index = current["index"]
        result["failing_cell"] = index + 1
        result["cell_excerpt"] = _first_line(nb.cells[index].source)
    shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _read_json(path):
    # What a notebook imports, to choose what to import once; one that cannot be read fails
    # in its own run, with its own reason.
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


async def run_labs(paths, timeout, parallel, kernels):
    notebooks = [_read_json(p) for p in paths]
    zygote = None
    warmed = []
    if kernels == "forked":
        # The zygote imports while this process imports nbclient: two processes, two cores.
        zygote = await Zygote.start(shared_imports(notebooks))
    import nbclient  # noqa: F401  (while the zygote imports)

    manager_class = forked_kernel_manager(zygote) if zygote else None
    if zygote:
        warmed = await zygote.ready
    sys.stderr.write(f"labrunner: {len(paths)} labs, {parallel} at a time, {kernels} kernels"
                     + (f" (imported once: {', '.join(warmed)})" if warmed else "") + "\n")
    slots = asyncio.Semaphore(parallel)
    results = []

    async def one(path):
        async with slots:
            result = await run_lab(path, timeout, manager_class)
        results.append(result)
        sys.stdout.write(f"{RESULT_MARK} {json.dumps(result)}\n")
        sys.stdout.flush()

    try:
        await asyncio.gather(*(one(p) for p in run_order(paths, notebooks, warmed)))
    finally:
        if zygote:
            await zygote.close()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("notebooks", nargs="*")
    parser.add_argument("--timeout", type=int, default=120, help="seconds a cell may run")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 2, help="labs at a time")
    parser.add_argument("--kernels", choices=("forked", "fresh"), default="forked")
    parser.add_argument("--zygote", nargs="*", metavar="MODULE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zygote is not None:
        zygote_main(args.zygote)  # never returns
    if not args.notebooks:
        parser.error("no notebooks given")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    results = asyncio.run(run_labs(args.notebooks, args.timeout, args.parallel, args.kernels))
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every result is written and the zygote is gone: the interpreter's own teardown is
    # waiting time only.
    os._exit(status)
