"""Commands as thin clients of the warm process, against the same commands in their own process
(issue 14, items 2 and 5).

    python bench/bench_thin_client.py [--rounds 5] [--first-rounds 2]

One local site with a venv image (``image.builder: venv``: the deploy path is the one an OCI
site takes, without a 5-minute image build), on olab's own Prefect server, started by the
benchmark's first command as an operator's first command starts it. Built, deployed (hub
running) and tested once before anything is timed. Every side is a whole process, command
to exit, with an operator's environment (no Prefect setting; this run's OLAB_HOME and a
project folder whose ``sites/`` holds the site, so the deployment run takes its name too):

- (a) **baseline, as today**: ``python -m olab.cli deploy --no-check --site thin``, the
  in-process path the console script ran until now (Prefect imported by the command);
- (b) ``python -m olab deploy --no-check --site thin``: the console script's entry point now,
  served by the warm process (a round it did not serve, e.g. because a source file changed
  under it, is reported and left out of the medians);
- (c) the deployment ``deploy-hub`` run through ``olab serve --site thin`` (Prefect's runner,
  polling every 10 s, Prefect's default, and running each flow run in a new process): a thin
  client process (httpx only, no Prefect import) creates the run with ``check: false``,
  follows its state and prints its logs as they come, and exits 0 when it is Completed;
- (c') diagnostic: (c) with serve's runner polling every second
  (``PREFECT_RUNNER_POLL_FREQUENCY=1``), in a block of its own after the rounds;
- unchanged ``olab build`` and ``olab test`` with nothing changed, as (a) and as (b); the
  first ``olab test`` (every lab run) is timed once during the set-up, for the ratio the
  issue names (<= 0.1x);
- the first command with the server down (it starts the server) and the command right after
  it (the warm process is still importing then), with the warm process on, against both with
  ``OLAB_NO_WARM=1`` (as today): ``--first-rounds`` pairs each, after the rounds.

Every process runs this checkout's olab (``PYTHONPATH``). Every deploy must answer
"(unchanged)" and leave the hub's pid alone. Rounds rotate the order
of the sides. The gke baseline the issue names (``helm install --dry-run=client`` of the same
values) needs a gke site: this benchmark's site is local; section 5 measures it on a fake
cluster. Results go to bench/results/thin-client.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import BENCH_ROOT, REPO, banner, fmt_table, median, others_busy, stop_site_hub  # noqa: E402

SITE = "thin"
GOAL_DEPLOY_SECONDS = 2.0
GOAL_BUILD_SECONDS = 1.0
GOAL_TEST_RATIO = 0.1
# The thin client of a deployment run: httpx only, the login read from olab's 0600 file.
FOLLOW_RUN = r"""
import os, sys, time, httpx
api, deployment, site = sys.argv[1:4]
login = open(os.path.join(os.environ["OLAB_HOME"], "prefect", "credential")).read().strip().partition(":")
client = httpx.Client(base_url=api, auth=(login[0], login[2]), timeout=30)
run = client.post(f"/deployments/{deployment}/create_flow_run", json={"parameters": {"site": site, "check": False}}).json()
printed, state, last = 0, None, ""
# Until the run is final and its last log line (the engine's "Finished in state") is in: the
# run's process sends its logs in batches, after its state.
while not (state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and last.startswith("Finished in state")):
    time.sleep(0.1)
    state = client.get(f"/flow_runs/{run['id']}").json()["state"]["type"]
    logs = client.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC",
                                             "offset": printed}).json()
    for entry in logs:
        print(entry["message"], flush=True)
        last = entry["message"]
    printed += len(logs)
sys.exit(0 if state == "COMPLETED" else 1)
"""


class Bench:
    def __init__(self) -> None:
        from olab import prefect_server

        self.server = prefect_server
        self.project = BENCH_ROOT / "project"
        (self.project / "sites").mkdir(parents=True)
        shutil.copy(REPO / "prefect.yaml", self.project / "prefect.yaml")
        self.site_file = benchlib.write_site(SITE)
        shutil.copy(self.site_file, self.project / "sites" / f"{SITE}.yaml")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "OLAB_NO_WARM"}
        # Every process runs this checkout's olab (the warm process starts outside it, where an
        # editable install of another checkout would win), as benchlib does for this process.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = clean | {"OLAB_PROJECT": str(self.project), "PREFECT_HOME": str(BENCH_ROOT / "client-prefect-home"),
                            "PYTHONPATH": path}
        self.serve: subprocess.Popen | None = None
        self.deployment_id: str | None = None

    def command(self, module: str, *argv: str, env: dict | None = None, expect: str = "") -> dict:
        """One whole `python -m MODULE ARGV` process, timed from start to exit."""
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", module, *argv, "--site", SITE], cwd=REPO, env=env or self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=1800)
        seconds = time.perf_counter() - started
        if proc.returncode != 0 or expect not in out:
            raise AssertionError(f"python -m {module} {' '.join(argv)}: exit {proc.returncode}\n{out}\n{err[-3000:]}")
        return {"seconds": seconds, "pid": proc.pid, "out": out, "err": err}

    def served_warm(self, pid: int) -> bool:
        return f" from pid {pid}: session pid " in self.server.warm_log_file().read_text()

    def wait_warm(self, seconds: float = 600) -> int:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = self.server.warm_running()
            if found and found.ready and (self.server.folder() / "warm.sock").exists():
                return found.pid
            time.sleep(0.25)
        raise AssertionError(f"no warm process answered within {seconds:.0f}s; see {self.server.warm_log_file()}")

    def hub_pid(self) -> int:
        from core.config import load_site
        from tasks.local_hub import running_process

        found = running_process(load_site(str(self.site_file)))
        if found is None:
            raise AssertionError("the site's hub is not running")
        return found.pid

    def start_serve(self, poll_seconds: int | None = None) -> None:
        import httpx

        env = self.env | ({"PREFECT_RUNNER_POLL_FREQUENCY": str(poll_seconds)} if poll_seconds else {})
        log = open(BENCH_ROOT / f"serve-{poll_seconds or 'default'}.log", "w")
        self.serve = subprocess.Popen([sys.executable, "-m", "olab.cli", "serve", "--site", SITE], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = self.server.running()
        login = ("olab", self.server.credential().partition(":")[2])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            answer = httpx.get(f"{server.url}/deployments/name/deploy-hub/deploy-hub", auth=login, timeout=30)
            if answer.status_code == 200 and self.serve_log_says_ready(log.name):
                self.deployment_id = answer.json()["id"]
                return
            if self.serve.poll() is not None:
                raise AssertionError(f"olab serve exited {self.serve.returncode}; see {log.name}")
            time.sleep(1)
        raise AssertionError(f"olab serve did not serve deploy-hub within 300s; see {log.name}")

    @staticmethod
    def serve_log_says_ready(path: str) -> bool:
        # Prefect's runner prints this once every deployment is registered and it polls.
        return "Your deployments are being served and polling for scheduled runs" in Path(path).read_text(errors="replace")

    def stop_serve(self) -> None:
        if self.serve and self.serve.poll() is None:
            os.killpg(self.serve.pid, signal.SIGINT)
            try:
                self.serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.serve.pid, signal.SIGKILL)
                self.serve.wait()
        self.serve = None

    def deployment_run(self) -> dict:
        server = self.server.running()
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", FOLLOW_RUN, server.url, self.deployment_id, SITE], env=self.env,
                              capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
        if proc.returncode != 0 or "nothing to do" not in proc.stdout:
            raise AssertionError(f"the deployment run did not complete as a no-op: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return {"seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds of each side (median reported)")
    parser.add_argument("--first-rounds", type=int, default=2, help="pairs of first-command runs with and without the warm process")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench()
    try:
        return run(bench, args)
    finally:
        bench.stop_serve()
        stop_site_hub(bench.site_file)
        bench.server.stop()


def run(bench: Bench, args) -> int:
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    others = others_busy("bench_thin_client")
    banner(f"set-up (not measured): build, deploy, first test of site {SITE}; load {loads[0]}; others busy: {len(others)}")
    started = time.monotonic()
    bench.command("olab.cli", "build", expect="image ")
    print(f"[bench] olab's Prefect server started and image built in {time.monotonic() - started:.1f}s", flush=True)
    bench.command("olab.cli", "deploy", "--no-check", expect="(start)")
    hub = bench.hub_pid()
    benchlib.clear_lab_cache()  # a first run: every lab runs (OLAB_HOME may be kept between runs)
    first_test = bench.command("olab.cli", "test", expect="labs passed")["seconds"]
    print(f"[bench] first olab test (every lab run): {first_test:.1f}s", flush=True)
    warm_pid = bench.wait_warm()
    bench.start_serve()

    deploy = ("deploy", "--no-check")
    sides = {
        "deploy_inproc": lambda: bench.command("olab.cli", *deploy, expect="(unchanged)"),
        "deploy_warm": lambda: bench.command("olab", *deploy, expect="(unchanged)"),
        "deploy_serve": bench.deployment_run,
        "build_inproc": lambda: bench.command("olab.cli", "build", expect="image "),
        "build_warm": lambda: bench.command("olab", "build", expect="image "),
        "test_inproc": lambda: bench.command("olab.cli", "test", expect="labs passed"),
        "test_warm": lambda: bench.command("olab", "test", expect="labs passed"),
    }
    kinds = list(sides)
    results: dict[str, list[float]] = {k: [] for k in kinds}
    fell_back: list[str] = []

    def measure(kind: str) -> float | None:
        if kind.endswith("_warm"):
            bench.wait_warm()
        done = sides[kind]()
        if kind.endswith("_warm") and not bench.served_warm(done["pid"]):
            fell_back.append(kind)
            return None
        if bench.hub_pid() != hub:
            raise AssertionError(f"{kind}: the hub's pid changed: a no-op deploy restarted it")
        return done["seconds"]

    banner("warm-up (not measured): one of each")
    warm_up = {kind: measure(kind) for kind in kinds}
    print("[bench] warm-up: " + ", ".join(f"{k} {'not served warm' if v is None else f'{v:.2f}s'}" for k, v in warm_up.items()),
          flush=True)
    for n in range(args.rounds):
        order = kinds[n % len(kinds):] + kinds[:n % len(kinds)]
        loads.append(os.getloadavg())
        this_round = {}
        for kind in order:
            seconds = measure(kind)
            if seconds is not None:
                results[kind].append(seconds)
            this_round[kind] = "not served warm" if seconds is None else f"{seconds:.2f}s"
        busy = others_busy("bench_thin_client")
        print(f"[bench] round {n + 1}/{args.rounds} (load {loads[-1][0]:.2f}, others busy {len(busy)}): "
              + ", ".join(f"{k} {this_round[k]}" for k in kinds), flush=True)
    bench.stop_serve()

    banner("diagnostic: the deployment run with serve's runner polling every second")
    bench.start_serve(poll_seconds=1)
    bench.deployment_run()  # warm-up
    fast_poll = [bench.deployment_run()["seconds"] for _ in range(args.rounds)]
    bench.stop_serve()

    banner("the first command (server down) and the one right after it, warm process on and off")
    first: dict[str, list[float]] = {"first_on": [], "next_on": [], "first_off": [], "next_off": []}
    next_served = 0
    for _ in range(args.first_rounds):
        for mode in ("on", "off"):
            bench.server.stop()
            env = bench.env | ({"OLAB_NO_WARM": "1"} if mode == "off" else {})
            loads.append(os.getloadavg())
            first[f"first_{mode}"].append(bench.command("olab.cli", *deploy, env=env, expect="(unchanged)")["seconds"])
            after = bench.command("olab", *deploy, env=env, expect="(unchanged)")
            first[f"next_{mode}"].append(after["seconds"])
            next_served += mode == "on" and bench.served_warm(after["pid"])
    loads.append(os.getloadavg())

    rows = [["side", "median s", "min s", "max s", "rounds"]]
    for kind in kinds:
        values = results[kind]
        if values:
            rows.append([kind, f"{median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}", str(len(values))])
    rows.append(["deploy_serve, runner polling every 1 s", f"{median(fast_poll):.3f}", f"{min(fast_poll):.3f}",
                 f"{max(fast_poll):.3f}", str(len(fast_poll))])
    for key, values in first.items():
        rows.append([key, f"{median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}", str(len(values))])
    banner("results")
    print(fmt_table(rows))
    med = {k: median(v) for k, v in results.items() if v}
    ratios = {
        "deploy_warm / deploy_inproc": med["deploy_warm"] / med["deploy_inproc"],
        "deploy_serve / deploy_inproc": med["deploy_serve"] / med["deploy_inproc"],
        "build_warm / build_inproc": med["build_warm"] / med["build_inproc"],
        "test_warm / test_inproc": med["test_warm"] / med["test_inproc"],
        "test_warm / first test": med["test_warm"] / first_test,
        "test_inproc / first test": med["test_inproc"] / first_test,
        "first_on / first_off": median(first["first_on"]) / median(first["first_off"]),
        "next_on / next_off": median(first["next_on"]) / median(first["next_off"]),
    }
    for name, value in ratios.items():
        print(f"[bench] {name} = {value:.2f}x")
    print(f"[bench] goals: no-op deploy <= {GOAL_DEPLOY_SECONDS} s: warm {med['deploy_warm']:.2f} s; unchanged build <= "
          f"{GOAL_BUILD_SECONDS} s: warm {med['build_warm']:.2f} s; test with nothing changed <= {GOAL_TEST_RATIO}x of a first "
          f"run: warm {ratios['test_warm / first test']:.3f}x")
    print(f"[bench] rounds the warm process did not serve (left out): {fell_back or 'none'}; the command right after the first "
          f"was served warm in {next_served} of {args.first_rounds} pairs")
    print(f"[bench] 1-minute load: {min(l[0] for l in loads):.2f} to {max(l[0] for l in loads):.2f}; "
          f"first warm process pid {warm_pid}")
    print("[bench] gke baseline (helm install --dry-run=client of the same values): not measured here, the site is local; "
          "see section 5")
    path = benchlib.write_results("thin-client.json", {
        "rounds": args.rounds, "results": results, "fast_poll": fast_poll, "first": first, "first_test": first_test,
        "ratios": ratios, "fell_back": fell_back, "next_served_warm": next_served, "loads": loads,
        "others_busy_at_start": others,
    })
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
