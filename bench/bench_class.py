"""A class logs in at once: thirty students start their servers at the same moment, and ten
render a dashboard at the same moment, on the local target's real hub (OCI image, podman).

    OLAB_HOME=/tmp/olab-bench-class-home python bench/bench_class.py [--rounds 3] [--students 30] [--renders 10]

Needs buildah, podman, runc, docker-registry and debootstrap (./setup.sh); the script exits
with a message where any is missing. Set OLAB_HOME to a folder that is kept to reuse the
built image across runs (the first build takes minutes and is not measured).

One run measures, in each of ``--rounds`` rounds (the order of the two hubs alternates):

(a) seconds until all ``--students`` servers are ready, after every student's
    ``POST /hub/api/users/<name>/server`` is released at the same moment (a barrier; each
    student its own connection, opened before), on two hubs started the same way
    (``LocalPlatform.apply_hub``, a fresh site each time):

    - **olab**: the hub as ``olab deploy`` configures it;
    - **baseline**: the same hub with the settings as they were before this work:
      the class-start block of ``tasks/templates/jupyterhub_config.py`` cut out (JupyterHub's
      and DockerSpawner's defaults, the spawn timeouts from the site) and the proxy as
      installed (the ``configurable-http-proxy`` console script, i.e. tornado's default 10
      requests in flight; not ``tasks/proxy.py``);
    - **olab-hub-waits** (only with ``--variants``): olab's hub with JupyterHub's own waits
      for a started server (random, growing to 5 s apart) instead of the start's quick look
      at its port: olab before commit 2dee6fc.

    A student whose start is refused (any answer but 201/202), or whose server fails to
    start (the hub drops it before it is ready), tries again at once, at most
    ``--attempts`` times in all, as a student reloading the page would. Counted: refusals
    (by status), failed starts, students ready, seconds until each is ready.

(b) on olab's hub, with all servers up: ``--renders`` students each render a lab as a Voila
    dashboard on their own server (``GET /user/<name>/voila/render/labs/<lab>.ipynb``),
    all released at the same moment; then the same renders one after another (the order of
    the two alternates by round). Median and max seconds of a render, and the ratios.

Results go to bench/results/class.json. Every hub is stopped by pid and every student's
container removed, whatever fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import RESULTS, banner, fmt_table, free_port, median, stop_site_hub, write_results, write_site  # noqa: E402

NEEDED = ("buildah", "podman", "runc", "docker-registry", "debootstrap")
# The block of the hub's configuration that sizes spawning for a class (cut out for the
# baseline): from its first comment line to the line after its end.
BLOCK_START = "# A class starts at once:"
BLOCK_AFTER = "c.Spawner.pre_spawn_hook = _give_labs"
WIDGETS = "application/vnd.jupyter.widget-view+json"


def baseline_proxy_command() -> list[str]:
    """The Python configurable-http-proxy as installed: what olab ran before tasks/proxy.py."""
    beside = Path(sys.executable).parent / "configurable-http-proxy"
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-c", "from configurable_http_proxy.cli import main; main()"]


def without_class_block(template: str) -> str:
    lines = template.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(BLOCK_START)]
    afters = [i for i, line in enumerate(lines) if line.startswith(BLOCK_AFTER)]
    if len(starts) != 1 or len(afters) != 1 or afters[0] < starts[0]:
        raise SystemExit(f"the hub template has no single '{BLOCK_START}' block before '{BLOCK_AFTER}' to cut out")
    cut = "".join(lines[: starts[0]] + lines[afters[0] :])
    if "concurrent_spawn_limit" in cut or "slow_spawn_timeout" in cut:
        raise SystemExit("the hub template sets spawn limits outside the class-start block: the baseline would not be one")
    return cut


# olab-hub-waits: olab's hub as it was before commit 2dee6fc, which JupyterHub's own growing
# waits (up to 5 s apart) found a started server with, rather than the start's quick look.
SITE_CODES = {"olab": "o", "baseline": "b", "olab-hub-waits": "w"}
SEEN_AT_ONCE = "c.JupyterHub.spawner_class = seen.seen_at_once(_booting_in_turns(c.JupyterHub.spawner_class))"


def with_jupyterhubs_wait(template: str) -> str:
    if template.count(SEEN_AT_ONCE) != 1:
        raise SystemExit(f"the hub template has no single line '{SEEN_AT_ONCE}' to undo")
    return template.replace(SEEN_AT_ONCE, "c.JupyterHub.spawner_class = _booting_in_turns(c.JupyterHub.spawner_class)")


@contextmanager
def hub_variant(variant: str):
    """olab's hub as configured, or the baseline: the same deploy path, with the template and
    the proxy command that ``LocalPlatform`` renders swapped for the ones from before (for
    olab-hub-waits, only the template's one line above)."""
    from tasks import local_hub

    if variant == "olab":
        yield
        return
    template, proxy = local_hub.hub_template, local_hub.proxy_command
    if variant == "olab-hub-waits":
        local_hub.hub_template = lambda: with_jupyterhubs_wait(template())
    else:
        local_hub.hub_template = lambda: without_class_block(template())
        local_hub.proxy_command = baseline_proxy_command
    try:
        yield
    finally:
        local_hub.hub_template, local_hub.proxy_command = template, proxy


def start_hub(site_path: Path, image, variant: str):
    from core.config import load_site
    from core.planning import hub_spec
    from targets.local import LocalPlatform
    from tasks.notebooks import discover_labs

    site = load_site(str(site_path))
    platform = LocalPlatform(site)
    with hub_variant(variant):
        spec = hub_spec(site, image, discover_labs(site.labs_dir))
        plan = platform.plan_hub(spec)
        deployment = platform.apply_hub(spec, plan)
    return site, platform, deployment


def engine_of(site):
    from tasks.oci import engine_for

    return engine_for("buildah", site.paths.containers, [])


def containers_of(site, prefix: str) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=engine_of(site).env,
                         capture_output=True, text=True, check=False).stdout
    return [name for name in out.split() if name.startswith(prefix)]


def remove_containers(site, prefix: str) -> list[str]:
    """Students' containers and their bridges (labelled with the site) left behind; normally none."""
    env = engine_of(site).env
    left = containers_of(site, prefix)
    if left:
        subprocess.run(["podman", "rm", "-f", "-t", "2", *left], env=env, capture_output=True, check=False, timeout=600)
    networks = subprocess.run(["podman", "network", "ls", "-q", "--filter", f"label=olab-site={site.name}"], env=env,
                              capture_output=True, text=True, check=False).stdout.split()
    if networks:
        subprocess.run(["podman", "network", "rm", "-f", *networks], env=env, capture_output=True, check=False, timeout=600)
    return left + networks


class Watch:
    """One poller of GET /hub/api/users (every 0.25 s) that every student's thread reads:
    the students themselves do not add load to the hub while they wait."""

    def __init__(self, api):
        self.api = api
        self.servers: dict[str, dict] = {}
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                users = self.api.get("/hub/api/users").raise_for_status().json()
                with self.changed:
                    self.servers = {u["name"]: u["servers"].get("", {}) for u in users}
                    self.changed.notify_all()
            except Exception:
                self.errors += 1
            self.stop.wait(0.25)

    def wait(self, name: str, deadline: float) -> str:
        """'ready', or 'failed' (the hub dropped the server), or 'timeout'."""
        seen = False
        with self.changed:
            while time.monotonic() < deadline:
                server = self.servers.get(name)
                if server:
                    seen = True
                    if server.get("ready"):
                        return "ready"
                elif server is not None and seen:
                    return "failed"
                self.changed.wait(1.0)
        return "timeout"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def class_starts(url: str, token: str, names: list[str], attempts: int, limit: float) -> dict:
    """Every student's start released at once; returns what each student got."""
    import httpx

    headers = {"Authorization": f"token {token}"}
    started = [0.0]
    # The barrier's action runs once, before anyone is released: the common start time.
    gate = threading.Barrier(len(names), action=lambda: started.__setitem__(0, time.monotonic()))
    with httpx.Client(base_url=url, headers=headers, timeout=60) as api:
        api.post("/hub/api/users", json={"usernames": names}).raise_for_status()
        watch = Watch(api)
        outcome: dict[str, dict] = {}

        def student(name: str) -> None:
            got = {"answers": [], "answer_s": [], "failed": 0, "ready_s": None, "outcome": "timeout"}
            outcome[name] = got
            with httpx.Client(base_url=url, headers=headers, timeout=600) as own:
                own.get("/hub/api/").raise_for_status()  # the connection is open before the gate
                gate.wait()
                start = started[0]
                deadline = start + limit
                for _ in range(attempts):
                    asked = time.monotonic()
                    try:
                        answer = own.post(f"/hub/api/users/{name}/server")
                        status, text = answer.status_code, answer.text
                    except httpx.HTTPError as exc:  # no answer at all: refused too
                        status, text = type(exc).__name__, ""
                    got["answers"].append(status)
                    got["answer_s"].append(round(time.monotonic() - asked, 3))
                    # A retry may find that its earlier start went through after all.
                    went_through = status == 400 and ("already running" in text or "pending spawn" in text)
                    if status not in (201, 202) and not went_through:
                        continue  # refused: the student tries again at once
                    result = watch.wait(name, deadline)
                    if result == "ready":
                        got["ready_s"] = time.monotonic() - start
                        got["outcome"] = "ready"
                        return
                    if result == "timeout":
                        return
                    got["failed"] += 1
                got["outcome"] = "gave up"

        with ThreadPoolExecutor(len(names)) as pool:
            futures = [pool.submit(student, name) for name in names]
            for f in futures:
                f.result()
        watch.close()
    return outcome


def summarize_starts(outcome: dict[str, dict]) -> dict:
    ready = sorted(o["ready_s"] for o in outcome.values() if o["ready_s"] is not None)
    first = [o["answers"][0] for o in outcome.values() if o["answers"]]
    refusals: dict[str, int] = {}
    for o in outcome.values():
        for code in o["answers"]:
            if code not in (201, 202):
                refusals[str(code)] = refusals.get(str(code), 0) + 1
    return {
        "students": len(outcome),
        "ready": len(ready),
        "all_ready_s": ready[-1] if len(ready) == len(outcome) else None,
        "median_ready_s": statistics.median(ready) if ready else None,
        "first_ready_s": ready[0] if ready else None,
        "refused_first_attempt": sum(code not in (201, 202) for code in first),
        "refusals_by_status": refusals,
        "failed_starts": sum(o["failed"] for o in outcome.values()),
        "median_first_answer_s": statistics.median(o["answer_s"][0] for o in outcome.values() if o["answer_s"]),
        "students_with_an_error": sum(o["failed"] > 0 or any(c not in (201, 202) for c in o["answers"]) for o in outcome.values()),
        "ready_seconds": ready,
        "per_student": outcome,
    }


def open_render(url: str, token: str, name: str):
    """A client of ``name``'s server, its connection open and the server answering."""
    import httpx

    client = httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=600)
    client.get(f"/user/{name}/api/status").raise_for_status()
    return client


def render(client, name: str, lab: str) -> float:
    """Seconds for one Voila render of ``lab`` on ``name``'s own server (its page checked)."""
    started = time.monotonic()
    page = client.get(f"/user/{name}/voila/render/labs/{lab}.ipynb")
    seconds = time.monotonic() - started
    if page.status_code != 200 or WIDGETS not in page.text:
        raise RuntimeError(f"{name}'s render of {lab}: {page.status_code} {page.text[:300]}")
    return seconds


def renders_in_turn(url: str, token: str, names: list[str], lab: str) -> tuple[list[float], float]:
    clients = [open_render(url, token, n) for n in names]
    try:
        started = time.monotonic()
        seconds = [render(c, n, lab) for c, n in zip(clients, names)]
        return seconds, time.monotonic() - started
    finally:
        for c in clients:
            c.close()


def renders_at_once(url: str, token: str, names: list[str], lab: str) -> tuple[list[float], float]:
    clients = [open_render(url, token, n) for n in names]
    started = [0.0]
    gate = threading.Barrier(len(names), action=lambda: started.__setitem__(0, time.monotonic()))

    def one(pair) -> float:
        client, name = pair
        gate.wait()
        return render(client, name, lab)

    try:
        with ThreadPoolExecutor(len(names)) as pool:
            seconds = list(pool.map(one, zip(clients, names)))
        return seconds, time.monotonic() - started[0]
    finally:
        for c in clients:
            c.close()


def stop_everyone(url: str, token: str, names: list[str], limit: float = 600) -> float:
    import httpx

    started = time.monotonic()
    with httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=120) as api:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: api.delete(f"/hub/api/users/{n}/server").status_code, names))
        while time.monotonic() - started < limit:
            users = api.get("/hub/api/users").raise_for_status().json()
            if not any(u["servers"] for u in users if u["name"] in names):
                break
            time.sleep(0.5)
    return time.monotonic() - started


def machine_busy() -> dict:
    """What else ran: the load average and other test or benchmark processes."""
    return {"loadavg": os.getloadavg(), "other_test_processes": len(benchlib.others_busy("bench_class"))}


def one_class(variant: str, round_no: int, image, args, lab: str) -> dict:
    from core.secrets import SecretStore

    name = f"class{round_no}{SITE_CODES[variant]}"  # a fresh site (own hub database) per round and variant
    site_path = write_site(name, image={"builder": "buildah", "base_image": "debootstrap:bookworm", "registry": args.registry})
    names = [f"student{i:02d}" for i in range(args.students)]
    result: dict = {"variant": variant, "round": round_no}
    site = None
    pid = None
    prefix = f"olab-{name}-"
    try:
        site, platform, deployment = start_hub(site_path, image, variant)
        from tasks.local_hub import running_process

        pid = running_process(site).pid
        token = SecretStore(site.paths.secrets).load().api_token.get_secret_value()
        time.sleep(2)  # the hub's own start-up (its first poll of the proxy) is not part of the class
        result["busy_before"] = machine_busy()
        outcome = class_starts(deployment.url, token, names, args.attempts, args.limit)
        result["busy_after"] = machine_busy()
        result.update(summarize_starts(outcome))
        s = result
        print(f"[bench] round {round_no} {variant}: {s['ready']}/{s['students']} ready, all after "
              f"{s['all_ready_s'] if s['all_ready_s'] is None else round(s['all_ready_s'], 1)} s "
              f"(median {s['median_ready_s'] and round(s['median_ready_s'], 1)} s, first {s['first_ready_s'] and round(s['first_ready_s'], 1)} s); "
              f"start answered in {s['median_first_answer_s']:.1f} s (median); refused at first {s['refused_first_attempt']}, refusals {s['refusals_by_status']}, failed starts {s['failed_starts']}; "
              f"load {result['busy_before']['loadavg'][0]:.1f} -> {result['busy_after']['loadavg'][0]:.1f}", flush=True)
        if variant == "olab" and args.renders and result["ready"] == len(names):
            who = names[: args.renders]
            client = open_render(deployment.url, token, who[0])
            try:
                render(client, who[0], lab)  # untimed: the kernel's files in the page cache
            finally:
                client.close()
            concurrent_first = round_no % 2 == 1
            timings = {}
            for kind in (["at_once", "in_turn"] if concurrent_first else ["in_turn", "at_once"]):
                do = renders_at_once if kind == "at_once" else renders_in_turn
                seconds, wall = do(deployment.url, token, who, lab)
                timings[kind] = {"seconds": seconds, "wall_s": wall, "median_s": median(seconds), "max_s": max(seconds)}
            timings["load"] = os.getloadavg()
            result["renders"] = timings
            a, b = timings["at_once"], timings["in_turn"]
            print(f"[bench] round {round_no} renders of {lab}: {len(who)} at once median {a['median_s']:.1f} s, max "
                  f"{a['max_s']:.1f} s (all in {a['wall_s']:.1f} s); in turn median {b['median_s']:.1f} s, all in {b['wall_s']:.1f} s",
                  flush=True)
        result["stop_s"] = stop_everyone(deployment.url, token, names)
    except Exception as exc:  # a failed round is reported, not timed
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[bench] round {round_no} {variant} FAILED: {result['error']}", flush=True)
        if site is not None:
            RESULTS.mkdir(parents=True, exist_ok=True)
            log = site.paths.logs / "hub.log"
            if log.exists():
                shutil.copy(log, RESULTS / f"class-{name}-hub.log")
    finally:
        if site is not None:
            log = site.paths.logs / "hub.log"
            if log.exists():
                text = log.read_text(errors="replace")
                result["hub_log"] = {
                    "slow_to_start": text.count("is slow to start"),
                    "never_showed_up": text.count("never showed up"),
                    "unresponsive_loop": text.count("Event loop was unresponsive"),
                    "throttled_429": text.count("pending spawns, throttling"),
                }
            stop_site_hub(site_path, pid)
            result["containers_left"] = remove_containers(site, prefix)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--renders", type=int, default=10)
    parser.add_argument("--attempts", type=int, default=3, help="starts a student tries before giving up")
    parser.add_argument("--limit", type=float, default=900, help="seconds a class start may take before it is cut off")
    parser.add_argument("--variants", default="olab,baseline", help="of olab, baseline, olab-hub-waits (olab before the start's quick look)")
    args = parser.parse_args()
    if benchlib.tools_missing(NEEDED):
        return 0
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)
    from core.config import load_site, olab_home
    from tasks.local_registry import stop_local_registry
    from tasks.oci import stop_api_socket

    args.registry = f"127.0.0.1:{free_port()}"
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in SITE_CODES]:
        raise SystemExit(f"no hub variant {', '.join(unknown)}: {', '.join(SITE_CODES)}")
    store = olab_home() / "containers"
    result: dict = {"students": args.students, "renders": args.renders, "attempts": args.attempts,
                    "baseline_proxy": baseline_proxy_command(), "rounds": []}
    try:
        with benchlib.prefect_server():
            from flows.build_image import build_image

            build_site = write_site("classbuild", image={"builder": "buildah", "base_image": "debootstrap:bookworm",
                                                         "registry": args.registry})
            banner("build (not measured; minutes when nothing is built yet)")
            image = build_image(site=str(build_site))
            lab = load_site(str(build_site)).config.labs.health_check_lab
            result["image"], result["lab"] = image.pinned, lab
            for round_no in range(1, args.rounds + 1):
                order = variants if round_no % 2 == 1 else list(reversed(variants))
                for variant in order:
                    banner(f"round {round_no}: {variant}, {args.students} students at once")
                    result["rounds"].append(one_class(variant, round_no, image, args, lab))
    finally:
        stop_local_registry(store)
        stop_api_socket(store)
    summary = {}
    for variant in variants:
        runs = [r for r in result["rounds"] if r["variant"] == variant and "error" not in r]
        done = [r["all_ready_s"] for r in runs if r["all_ready_s"] is not None]
        summary[variant] = {
            "rounds": len(runs),
            "all_ready_s": [r["all_ready_s"] for r in runs],
            "all_ready_median_s": median(done) if done else None,
            "median_ready_s": [r["median_ready_s"] for r in runs],
            "refused_first_attempt": [r["refused_first_attempt"] for r in runs],
            "failed_starts": [r["failed_starts"] for r in runs],
            "students_with_an_error": [r["students_with_an_error"] for r in runs],
        }
    renders = [r["renders"] for r in result["rounds"] if "renders" in r]
    if renders:
        summary["renders"] = {
            "rounds": len(renders),
            "at_once_median_s": median([r["at_once"]["median_s"] for r in renders]),
            "at_once_max_s": median([r["at_once"]["max_s"] for r in renders]),
            "at_once_wall_s": median([r["at_once"]["wall_s"] for r in renders]),
            "in_turn_median_s": median([r["in_turn"]["median_s"] for r in renders]),
            "in_turn_wall_s": median([r["in_turn"]["wall_s"] for r in renders]),
        }
        s = summary["renders"]
        s["at_once_median_vs_in_turn_median"] = s["at_once_median_s"] / s["in_turn_median_s"]
        s["at_once_wall_vs_in_turn_wall"] = s["at_once_wall_s"] / s["in_turn_wall_s"]
    result["summary"] = summary
    path = write_results("class.json", result)
    rows = [["hub", "rounds", "30/30 ready s (median)", "each round", "median student s", "refused 1st", "failed starts"]]
    for variant in variants:
        s = summary[variant]
        rows.append([variant, str(s["rounds"]),
                     f"{s['all_ready_median_s']:.1f}" if s["all_ready_median_s"] else "never",
                     " ".join("-" if x is None else f"{x:.0f}" for x in s["all_ready_s"]),
                     " ".join("-" if x is None else f"{x:.0f}" for x in s["median_ready_s"]),
                     " ".join(map(str, s["refused_first_attempt"])),
                     " ".join(map(str, s["failed_starts"]))])
    print()
    print(fmt_table(rows))
    if renders:
        s = summary["renders"]
        print(f"\n[bench] {args.renders} renders of {lab} at once: median {s['at_once_median_s']:.1f} s, max {s['at_once_max_s']:.1f} s, "
              f"all in {s['at_once_wall_s']:.1f} s; one after another: median {s['in_turn_median_s']:.1f} s, all in "
              f"{s['in_turn_wall_s']:.1f} s; at once / in turn: median {s['at_once_median_vs_in_turn_median']:.1f}x, "
              f"wall {s['at_once_wall_vs_in_turn_wall']:.2f}x")
    print(f"[bench] results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
