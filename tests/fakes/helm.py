"""A helm that changes releases only as Helm's storage would, for tests of deploy-hub on gke
without a cluster: the real helm for everything else.

:func:`install_fake_helm` writes an executable script (``gke.helm`` of a test site) that runs
:func:`main`:

* ``upgrade``, ``rollback`` and ``uninstall`` (not ``--help``/``-h``) append one JSON line to
  the log (``argv``, and for every ``--values``/``-f`` file its ``mode`` and whether it
  ``exists`` at that moment; never what a file holds), then act on the release's secrets
  through the real ``kubernetes`` client with the ``--kubeconfig`` they were given, as
  Helm's secrets driver does (``tests.fakes.kubernetes.helm_release`` /
  ``helm_release_secret``, POSTed; a status change is a delete and a create, the fake API
  having no update):

  - ``upgrade R CHART --install``: the ``--values`` files merged (later wins, maps merged key
    by key, anything else replaced) become the next revision's config, status deployed,
    with the chart's name and version (from the repository's ``index.yaml``, or a chart
    folder's ``Chart.yaml``); earlier deployed revisions become superseded and history
    beyond ``--history-max`` is pruned. As helm: a newest revision that is pending refuses
    the upgrade ("another operation (install/upgrade/rollback) is in progress"); a values
    file that is not there, a chart version the repository lacks, fail before anything;
  - ``rollback R N``: the next revision with revision N's config, deployed; the others
    superseded;
  - ``uninstall R``: every secret of the release deleted.

* A control file (:meth:`FakeHelm.fail_next_upgrade`) makes the next upgrade of a release
  fail: ``Error: UPGRADE FAILED: <message>`` on stderr, exit 1, and either a pending-upgrade
  revision left behind (``leave_pending``: as a helm killed mid-upgrade leaves it), or
  what helm does with ``--rollback-on-failure``: the new revision failed, then rolled back
  (the previous config as a new deployed revision; an install is uninstalled instead).
* Every other command (``version``, ``upgrade --help``, ``pull``, ``template``, ``history``,
  ``get``, ...) execs the real helm, with the same arguments and environment.

The script imports nothing heavy before it knows it must act, so a pass-through costs
one Python start-up.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

ACTING = ("upgrade", "rollback", "uninstall")
# helm's flags that take a value (the ones olab passes, and a few more), to tell them from positionals.
_VALUED = {
    "--repo", "--version", "--namespace", "-n", "--timeout", "--history-max", "--values", "-f", "--kubeconfig",
    "--kube-context", "--set", "--set-string", "--set-file", "--description", "--max",
}


@dataclass(frozen=True)
class FakeHelm:
    """The fake's files: ``path`` (the executable, for ``gke.helm``), ``log`` (one JSON line
    per acting command) and ``control`` (what the next upgrade should do)."""

    path: Path
    log: Path
    control: Path
    real: str

    def calls(self) -> list[dict]:
        """The acting commands so far, oldest first: {"argv": [...], "values": [{"path", "mode", "exists"}]}."""
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def argvs(self) -> list[list[str]]:
        return [call["argv"] for call in self.calls()]

    def fail_next_upgrade(self, message: str, *, release: str | None = None, leave_pending: bool = False) -> None:
        """The next upgrade (of ``release``, or any) fails with ``message``."""
        plans = self._plans()
        plans.append({"release": release, "message": message, "leave_pending": leave_pending})
        self.control.write_text(json.dumps(plans))

    def pending_failures(self) -> list[dict]:
        return self._plans()

    def _plans(self) -> list[dict]:
        return json.loads(self.control.read_text()) if self.control.is_file() else []


def install_fake_helm(folder: Path, real_helm: str) -> FakeHelm:
    """Write the fake helm into ``folder`` (it runs the real one at ``real_helm`` for
    everything but upgrade, rollback and uninstall)."""
    folder.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    fake = FakeHelm(path=folder / "helm", log=folder / "helm-calls.jsonl", control=folder / "helm-control.json", real=real_helm)
    config = {"log": str(fake.log), "control": str(fake.control), "real": real_helm}
    fake.path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "from tests.fakes.helm import main\n"
        f"sys.exit(main(sys.argv, {config!r}))\n"
    )
    fake.path.chmod(0o755)
    return fake


# ---- the script ----------------------------------------------------------------------------


class Refusal(Exception):
    """What helm would print after ``Error: `` and exit 1 with."""


def main(argv: list[str], config: dict) -> int:
    verb = argv[1] if len(argv) > 1 else ""
    if verb not in ACTING or "--help" in argv or "-h" in argv:
        os.execv(config["real"], [config["real"], *argv[1:]])
    args = _parse(argv[2:])
    _log(Path(config["log"]), argv, args["values"])
    try:
        if verb == "upgrade":
            out = _upgrade(args, Path(config["control"]))
        elif verb == "rollback":
            out = _rollback(args)
        else:
            out = _uninstall(args)
    except Refusal as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _parse(rest: list[str]) -> dict:
    positional, flags, values, switches = [], {}, [], set()
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            if name in _VALUED:
                if not eq:
                    i += 1
                    value = rest[i] if i < len(rest) else ""
                if name in ("--values", "-f"):
                    values.append(value)
                else:
                    flags[name] = value
            else:
                switches.add(name)
        else:
            positional.append(arg)
        i += 1
    return {"positional": positional, "flags": flags, "values": values, "switches": switches}


def _log(log: Path, argv: list[str], values: list[str]) -> None:
    files = []
    for f in values:
        try:
            mode = f"{stat.S_IMODE(os.stat(f).st_mode):04o}"
            exists = True
        except FileNotFoundError:
            mode, exists = None, False
        files.append({"path": f, "mode": mode, "exists": exists})
    with open(log, "a") as out:
        out.write(json.dumps({"argv": argv, "values": files}) + "\n")


# ---- the release's secrets ----------------------------------------------------------------------


class _Storage:
    """One release's secrets in one namespace, through the real kubernetes client."""

    def __init__(self, args: dict, name: str):
        from kubernetes import client as k8s
        from kubernetes import config as k8s_config

        kubeconfig = args["flags"].get("--kubeconfig") or os.environ.get("KUBECONFIG")
        if not kubeconfig:
            raise Refusal("Kubernetes cluster unreachable: no --kubeconfig (this fake reads no ~/.kube/config)")
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, context=args["flags"].get("--kube-context"),
                                    client_configuration=configuration, persist_config=False)
        configuration.retries = False
        self.k8s = k8s
        self.api = k8s.ApiClient(configuration)
        self.core = k8s.CoreV1Api(self.api)
        self.name = name
        self.namespace = args["flags"].get("--namespace") or args["flags"].get("-n") or "default"

    def close(self) -> None:
        self.api.close()
        self.api.rest_client.pool_manager.clear()

    def namespace_exists(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.read_namespace(self.namespace)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def releases(self) -> dict[int, dict]:
        """Every stored revision (Helm's release JSON), by revision."""
        import base64
        import gzip

        found = self.core.list_namespaced_secret(self.namespace, label_selector=f"owner=helm,name={self.name}")
        out = {}
        for secret in found.items:
            if secret.type != "helm.sh/release.v1":
                continue
            raw = base64.b64decode(base64.b64decode(secret.data["release"]))
            if raw[:3] == b"\x1f\x8b\x08":
                raw = gzip.decompress(raw)
            release = json.loads(raw)
            out[int(release["version"])] = release
        return out

    def create(self, release: dict) -> None:
        import time

        from tests.fakes.kubernetes import helm_release_secret

        self.core.create_namespaced_secret(self.namespace, helm_release_secret(release, created_at=int(time.time())))

    def rewrite(self, release: dict) -> None:
        """A stored revision with a new status (Helm's Update; here delete and create)."""
        import time

        from tests.fakes.kubernetes import helm_release_secret

        self.delete(int(release["version"]))
        self.core.create_namespaced_secret(self.namespace, helm_release_secret(release, modified_at=int(time.time())))

    def delete(self, revision: int) -> None:
        self.core.delete_namespaced_secret(f"sh.helm.release.v1.{self.name}.v{revision}", self.namespace)

    def supersede(self, releases: dict[int, dict], keep: int) -> None:
        """Every deployed revision but ``keep`` becomes superseded."""
        for number, release in releases.items():
            if number != keep and release["info"]["status"] == "deployed":
                release["info"]["status"] = "superseded"
                self.rewrite(release)


def _new_release(storage: _Storage, revision: int, status: str, config: dict, chart: dict, description: str,
                 first_deployed=None) -> dict:
    import datetime

    from tests.fakes.kubernetes import helm_release

    now = datetime.datetime.now(datetime.UTC)
    return helm_release(
        storage.name, storage.namespace, revision, status, chart=chart["name"], chart_version=chart["version"],
        app_version=chart.get("appVersion", ""), config=config, description=description,
        first_deployed=first_deployed or now, last_deployed=now, helm=4,
    )


def _chart_of(release: dict) -> dict:
    metadata = release["chart"]["metadata"]
    return {"name": metadata["name"], "version": metadata["version"], "appVersion": metadata.get("appVersion", "")}


def _first_deployed(releases: dict[int, dict]):
    import datetime

    if not releases:
        return None
    text = releases[min(releases)]["info"].get("first_deployed", "")
    try:
        return datetime.datetime.fromisoformat(text[:26].rstrip("Z").split("+")[0]).replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def _status_lines(release: dict, head: str) -> str:
    return (
        f"{head}\nNAME: {release['name']}\nLAST DEPLOYED: {release['info']['last_deployed']}\n"
        f"NAMESPACE: {release['namespace']}\nSTATUS: {release['info']['status']}\n"
        f"REVISION: {release['version']}\nTEST SUITE: None"
    )


# ---- upgrade ------------------------------------------------------------------------------------


def _merge(target: dict, layer: dict) -> dict:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
    return target


def _values(files: list[str]) -> dict:
    import yaml

    merged: dict = {}
    for f in files:
        try:
            text = Path(f).read_text()
        except FileNotFoundError:
            raise Refusal(f"open {f}: no such file or directory") from None
        except PermissionError:
            raise Refusal(f"open {f}: permission denied") from None
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise Refusal(f"failed to parse {f}: error unmarshaling JSON: json: cannot unmarshal into Go value of type map[string]interface {{}}")
        _merge(merged, data)
    return merged


def _chart_meta(ref: str, flags: dict) -> dict:
    """The chart's name, version and appVersion: from the repository's index, or the folder's Chart.yaml."""
    import yaml

    repo, version = flags.get("--repo"), flags.get("--version")
    if repo:
        import urllib.request

        try:
            with urllib.request.urlopen(repo.rstrip("/") + "/index.yaml", timeout=30) as answer:
                index = yaml.safe_load(answer.read())
        except OSError as exc:
            raise Refusal(f"looks like \"{repo}\" is not a valid chart repository or cannot be reached: {exc}") from None
        for entry in (index.get("entries") or {}).get(ref) or []:
            if version is None or str(entry.get("version")) == version:
                return {"name": ref, "version": str(entry["version"]), "appVersion": str(entry.get("appVersion", ""))}
        raise Refusal(f"chart \"{ref}\" version \"{version}\" not found in {repo} repository")
    chart_file = Path(ref) / "Chart.yaml"
    if not chart_file.is_file():
        raise Refusal(f"non-absolute URLs should be in form of repo_name/path_to_chart, got: {ref}")
    meta = yaml.safe_load(chart_file.read_text())
    return {"name": meta["name"], "version": str(meta["version"]), "appVersion": str(meta.get("appVersion", ""))}


def _take_failure(control: Path, release: str) -> dict | None:
    if not control.is_file():
        return None
    plans = json.loads(control.read_text())
    for i, plan in enumerate(plans):
        if plan.get("release") in (None, release):
            del plans[i]
            control.write_text(json.dumps(plans))
            return plan
    return None


def _prune(storage: _Storage, keep: int) -> None:
    """helm's --history-max: the oldest revisions beyond ``keep`` go (never the deployed one)."""
    if keep <= 0:
        return
    releases = storage.releases()
    for number in sorted(releases)[: max(0, len(releases) - keep)]:
        if releases[number]["info"]["status"] != "deployed":
            storage.delete(number)


def _upgrade(args: dict, control: Path) -> str:
    if len(args["positional"]) != 2:
        raise Refusal("\"helm upgrade\" requires 2 arguments\n\nUsage:  helm upgrade [RELEASE] [CHART] [flags]")
    name, ref = args["positional"]
    config = _values(args["values"])
    chart = _chart_meta(ref, args["flags"])
    storage = _Storage(args, name)
    try:
        if not storage.namespace_exists():
            if "--create-namespace" in args["switches"]:
                raise Refusal(f"create: namespaces \"{storage.namespace}\": this fake cluster cannot create namespaces; seed it")
            raise Refusal(f"create: failed to create: namespaces \"{storage.namespace}\" not found")
        releases = storage.releases()
        last = releases[max(releases)] if releases else None
        installing = last is None or last["info"]["status"] == "uninstalled"
        if installing and "--install" not in args["switches"]:
            raise Refusal(f"UPGRADE FAILED: \"{name}\" has no deployed releases")
        if last is not None and last["info"]["status"].startswith("pending-"):
            raise Refusal("UPGRADE FAILED: another operation (install/upgrade/rollback) is in progress")
        revision = (max(releases) + 1) if releases else 1
        first = _first_deployed(releases)
        current = max((n for n, r in releases.items() if r["info"]["status"] == "deployed"), default=None)
        failure = _take_failure(control, name)
        if failure is not None:
            return _fail(storage, args, failure, releases, revision, current, config, chart, first, installing)
        release = _new_release(storage, revision, "deployed", config, chart,
                               "Install complete" if installing else "Upgrade complete", first)
        storage.create(release)
        storage.supersede(releases, keep=revision)
        _prune(storage, int(args["flags"].get("--history-max") or 10))
        head = (f"Release \"{name}\" does not exist. Installing it now." if installing
                else f"Release \"{name}\" has been upgraded. Happy Helming!")
        return _status_lines(release, head)
    finally:
        storage.close()


def _fail(storage: _Storage, args: dict, failure: dict, releases: dict, revision: int, current: int | None,
          config: dict, chart: dict, first, installing: bool) -> str:
    message = failure["message"]
    what = "INSTALLATION FAILED" if installing else "UPGRADE FAILED"
    if failure.get("leave_pending"):
        # A helm killed mid-upgrade: the new revision stays pending, nothing is rolled back.
        status = "pending-install" if installing else "pending-upgrade"
        storage.create(_new_release(storage, revision, status, config, chart,
                                    "Initial install underway" if installing else "Preparing upgrade", first))
        raise Refusal(f"{what}: {message}")
    storage.create(_new_release(storage, revision, "failed", config, chart, f"Upgrade \"{storage.name}\" failed: {message}", first))
    rolls_back = "--rollback-on-failure" in args["switches"] or "--atomic" in args["switches"]
    if not rolls_back:
        raise Refusal(f"{what}: {message}")
    flag = "rollback-on-failure" if "--rollback-on-failure" in args["switches"] else "atomic"
    if current is None:
        for number in storage.releases():
            storage.delete(number)
        raise Refusal(f"{what}: release {storage.name} failed, and has been uninstalled due to {flag} being set: {message}")
    previous = releases[current]
    back = _new_release(storage, revision + 1, "deployed", previous.get("config") or {}, _chart_of(previous),
                        f"Rollback to {current}", first)
    storage.create(back)
    storage.supersede(storage.releases(), keep=revision + 1)
    raise Refusal(f"{what}: release {storage.name} failed, and has been rolled back due to {flag} being set: {message}")


# ---- rollback and uninstall ------------------------------------------------------------------------


def _rollback(args: dict) -> str:
    if len(args["positional"]) not in (1, 2):
        raise Refusal("\"helm rollback\" requires at least 1 argument")
    name = args["positional"][0]
    storage = _Storage(args, name)
    try:
        releases = storage.releases()
        if not releases:
            raise Refusal("release: not found")
        latest = max(releases)
        target = int(args["positional"][1]) if len(args["positional"]) == 2 and args["positional"][1] != "0" else latest - 1
        if target not in releases:
            raise Refusal("release: not found")
        source = releases[target]
        release = _new_release(storage, latest + 1, "deployed", source.get("config") or {}, _chart_of(source),
                               f"Rollback to {target}", _first_deployed(releases))
        storage.create(release)
        # The release rolled back from, and every other deployed revision: superseded.
        current = releases[latest]
        if current["info"]["status"] != "superseded":
            current["info"]["status"] = "superseded"
            storage.rewrite(current)
        storage.supersede({n: r for n, r in storage.releases().items() if n != latest}, keep=latest + 1)
        return "Rollback was a success! Happy Helming!"
    finally:
        storage.close()


def _uninstall(args: dict) -> str:
    if not args["positional"]:
        raise Refusal("\"helm uninstall\" requires at least 1 argument")
    name = args["positional"][0]
    storage = _Storage(args, name)
    try:
        releases = storage.releases()
        if not releases:
            raise Refusal(f"uninstall: Release not loaded: {name}: release: not found")
        for number in releases:
            storage.delete(number)
        return f"release \"{name}\" uninstalled"
    finally:
        storage.close()
