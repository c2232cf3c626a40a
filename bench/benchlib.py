"""Shared helpers for the olab benchmarks (not a test module, not part of olab).

Importing this module sets the environment every benchmark runs with:
``OLAB_PROJECT`` (this repository unless already set), ``OLAB_HOME`` (a fresh
temporary folder unless already set; set it yourself to reuse a built
environment across benchmark runs) and ``PREFECT_SERVER_ANALYTICS_ENABLED=false``.
It must therefore be imported before anything from olab, flows, tasks or prefect.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# The benchmark measures the checkout it is in, wherever an editable install of olab points
# (another checkout's `pip install -e .` on a shared machine moved it under a running bench).
sys.path.insert(0, str(REPO))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OLAB_PROJECT", str(REPO))
_OWN_HOME = not os.environ.get("OLAB_HOME")
if _OWN_HOME:
    os.environ["OLAB_HOME"] = tempfile.mkdtemp(prefix="olab-bench-home-")
# The benchmark root: site files, site runtimes, the baseline venv (never inside the repository).
BENCH_ROOT = Path(tempfile.mkdtemp(prefix="olab-bench-"))
# The image context and the labs are copied here once, so that an edit in the working
# tree during a benchmark cannot change the image's content hash (a rebuild) half-way.
SNAPSHOT = BENCH_ROOT / "inputs"


def _cleanup() -> None:
    if os.environ.get("OLAB_BENCH_KEEP"):
        print(f"[bench] kept {BENCH_ROOT}" + (f" and OLAB_HOME {os.environ['OLAB_HOME']}" if _OWN_HOME else ""))
        return
    shutil.rmtree(BENCH_ROOT, ignore_errors=True)
    if _OWN_HOME:
        shutil.rmtree(os.environ["OLAB_HOME"], ignore_errors=True)


atexit.register(_cleanup)

import yaml  # noqa: E402


def tools_missing(needed) -> bool:
    """True (and says so) when a tool the benchmark needs is not installed: it is skipped."""
    missing = [t for t in needed if not shutil.which(t)]
    if missing:
        print(f"[bench] skipped: {', '.join(missing)} not installed (run ./setup.sh as root)")
    return bool(missing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot_inputs() -> tuple[Path, Path]:
    """Copy images/olab-user and labs/ once; every bench site uses these copies."""
    context, labs = SNAPSHOT / "images" / "olab-user", SNAPSHOT / "labs"
    if not context.exists():
        shutil.copytree(REPO / "images" / "olab-user", context, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "labs", labs, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return context, labs


def write_site(name: str, **sections) -> Path:
    """A site file like tests/conftest.py SiteFactory writes: own runtime, free ports.

    The venv builder is pinned (what the benchmarks compare), and the image
    context and labs are the snapshot taken when the benchmark started.
    """
    context, labs = snapshot_inputs()
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, hub_api_port, proxy_api_port = sorted(ports)
    data = {
        "name": name,
        "target": "local",
        "runtime_dir": str(BENCH_ROOT / name / "runtime"),
        "hub": {"port": port, "hub_api_port": hub_api_port, "proxy_api_port": proxy_api_port, "start_timeout_seconds": 120},
        "image": {"context": str(context), "builder": "venv"},
        "labs": {"path": str(labs), "cell_timeout_seconds": 120},
        "backups": {"path": str(BENCH_ROOT / name / "backups")},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path = BENCH_ROOT / name / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@contextmanager
def prefect_server():
    """A temporary local Prefect server (SQLite in a temp dir), started before any timing,
    with the Prefect settings olab's commands run with (olab/crash_detection.py: no
    heartbeat from Prefect's engine; the lifecycle guard sends it, core/heartbeat.py)."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from olab import crash_detection

    started = time.monotonic()
    with prefect_test_harness(server_startup_timeout=180), temporary_settings(crash_detection.settings()):
        print(f"[bench] temporary Prefect server up in {time.monotonic() - started:.1f}s (not measured)", flush=True)
        yield


@contextmanager
def flow_heartbeats(engine: bool = False):
    """Diagnostic: with engine=True, flows send their heartbeat from Prefect's engine (every
    30 s), as olab's commands did before: Prefect 3.9 joins that thread, which sleeps in 1 s
    steps, when a flow run ends, so every run ended 0 to 1 s after its work. Default: as
    olab's commands run (the lifecycle guard's heartbeat, which stops at once)."""
    if not engine:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from core.heartbeat import HEARTBEAT_SECONDS

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_SECONDS}):
        yield


def results_name(base: str, engine_heartbeat: bool) -> str:
    return f"{base}-prefect-heartbeat.json" if engine_heartbeat else f"{base}.json"


def add_heartbeat_option(parser, base: str) -> None:
    """--prefect-heartbeat, shared by the flow benchmarks (see flow_heartbeats)."""
    parser.add_argument(
        "--prefect-heartbeat",
        action="store_true",
        help="diagnostic: flows send their heartbeat from Prefect's engine, as olab's commands did before "
        f"(results in bench/results/{results_name(base, True)})",
    )


def heartbeat_note(engine_heartbeat: bool) -> str:
    return ("Prefect's engine, every 30 s (diagnostic: what olab's commands did before)" if engine_heartbeat
            else "the lifecycle guard's (core/heartbeat.py), as olab's commands run; Prefect's engine heartbeat off")


def clear_lab_cache() -> None:
    """Forget every lab result olab has stored (SitePaths.lab_cache: OLAB_HOME/lab-results)."""
    from core.config import olab_home

    shutil.rmtree(olab_home() / "lab-results", ignore_errors=True)


def timed(call):
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    import prefect

    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "prefect": prefect.__version__,
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    payload = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def processes():
    """(pid, command line, working directory or None) of every other process on the machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            cwd = None
        yield int(proc.name), cmdline, cwd


def others_busy(own_script: str) -> list[str]:
    """Other test suites or benchmarks running now (a shared machine): their pids and commands."""
    return [f"{pid} {cmd[:100]}" for pid, cmd, _ in processes()
            if "pytest" in cmd or ("bench_" in cmd and own_script not in cmd)]


def pids_under(folder: Path) -> list[int]:
    """Pids of processes whose command line names ``folder`` or whose working directory is in it.

    A bench site's runtime folder is private to the bench: the hub's command line
    names its config there, and user servers run in homes there.
    """
    needle = str(folder)
    return [pid for pid, cmdline, cwd in processes()
            if cwd is not None and (needle in cmdline or cwd == needle or cwd.startswith(needle + os.sep))]


def stop_site_hub(site_path: Path, known_pid: int | None = None) -> list[int]:
    """Stop every hub of a bench site, by pid, whatever state the run left behind.

    Looks at the pid a step returned, the pid in the local target's record of
    the hub process (``tasks.local_hub.running_process``), the hub's and
    proxy's own pid files, and finally any process started from this site's
    runtime folder. Returns the pids that were stopped.
    """
    from core.config import load_site
    from core.runner import pid_alive, stop_process
    from tasks.local_hub import running_process

    site = load_site(str(site_path))
    candidates: list[int] = []
    if known_pid:
        candidates.append(known_pid)
    try:
        hub = running_process(site)
        if hub is not None:
            candidates.append(hub.pid)
    except (OSError, ValueError):
        pass
    for pid_file in (site.paths.hub / "jupyterhub.pid", site.paths.hub / "proxy.pid"):
        try:
            candidates.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            pass
    stopped = []
    for pid in dict.fromkeys(candidates):
        # A stale pid file may name a recycled pid: only stop what is a hub or a proxy.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "jupyterhub" not in cmdline and "configurable-http-proxy" not in cmdline:
            continue
        if pid_alive(pid) and stop_process(pid, grace_seconds=30):
            stopped.append(pid)
    # Anything still running from this site's runtime folder (the hub, user servers).
    leftovers = pids_under(site.paths.runtime)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    return stopped


def fmt_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def banner(text: str) -> None:
    print(f"\n[bench] {text}", flush=True)


def python_info() -> str:
    return sys.version.split()[0]
