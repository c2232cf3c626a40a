"""A bad site file is refused with one line per problem, exit 2, nothing touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from olab.cli import main
from core.config import ConfigError, load_site

from tests.conftest import REPO  # noqa: E402


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def test_shipped_sites_are_valid():
    local = load_site("local")
    assert local.config.target.value == "local"
    assert local.config.hub.host == "127.0.0.1"
    gke = load_site("example-gke")
    assert gke.config.gke is not None and gke.config.gke.user_pool.min_nodes == 0
    assert gke.config.schedules.teardown == "0 19 * * 5"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hub:\n  port: 70000\n", ["hub.port: Input should be less than or equal to 65535"]),
        ("hub:\n  prot: 8000\n", ["hub.prot: unknown field"]),
        ("target: moon\n", ["target: Input should be 'local' or 'gke'"]),
        ("target: gke\n", ["target gke needs a gke section"]),
        ("schedules:\n  timezone: Mars/Olympus\n", ["schedules.timezone: unknown timezone 'Mars/Olympus'"]),
        ("schedules:\n  teardown: every friday\n", ["schedules.teardown: 'every friday' is not a 5-field cron"]),
        ("hub:\n  admins: []\n", ["hub.admins: List should have at least 1 item"]),
        ("hub:\n  host: 0.0.0.0\n", ["the local hub listens on loopback only"]),
        ("hub:\n  default_url: lab\n", ["hub.default_url: must be a path starting with '/'"]),
        (
            "hub:\n  port: 0\n  admins: [Bad Name]\nlabs:\n  cell_timeout_seconds: -1\n",
            ["hub.port:", "hub.admins[0]:", "labs.cell_timeout_seconds:"],
        ),
        ("hub: [1, 2\n", ["YAML syntax error"]),
        ("- just\n- a list\n", ["must be a mapping of fields"]),
        (
            "target: gke\ngke:\n  project: X\n  region: europe-west2\n  domains: []\n  registry: r\n  terraform_state_bucket: bucket\n",
            ["gke.project:", "gke.domains: List should have at least 1 item"],
        ),
    ],
)
def test_bad_site_gives_one_line_per_problem(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    runtime = tmp_path / "runtime-must-not-exist"
    # A runtime_dir would only be created if something were touched.
    if "runtime_dir" not in text and not text.startswith("-") and "[1, 2" not in text:
        path.write_text(text + f"runtime_dir: {runtime}\n")
    code, errors, out = run_cli(capsys, "provision", "--site", str(path))
    assert code == 2
    assert len(errors) == len(expected), errors
    for line, fragment in zip(errors, expected):
        assert line.startswith(str(path)), line
        assert fragment in line, line
    assert "Traceback" not in "\n".join(errors) + out
    assert not runtime.exists()


def test_missing_site_names_the_known_ones(capsys):
    code, errors, _ = run_cli(capsys, "status", "--site", "nosuchsite")
    assert code == 2
    assert len(errors) == 1
    assert "nosuchsite.yaml: no such site file" in errors[0]
    assert "local" in errors[0]


def test_what_a_gke_site_cannot_do_is_refused_in_one_line(capsys):
    code, errors, _ = run_cli(capsys, "credentials", "--site", "example-gke")
    assert code == 2
    assert errors == [f"{REPO / 'sites' / 'example-gke.yaml'}: olab credentials is for local sites (this one's target is gke)"]


def test_site_option_may_come_before_or_after_the_command(tmp_path, capsys):
    path = write(tmp_path, "hub:\n  port: 99999\n")
    for argv in (["--site", str(path), "status"], ["status", "--site", str(path)]):
        code, errors, _ = run_cli(capsys, *argv)
        assert code == 2 and "hub.port" in errors[0]


def test_relative_paths_resolve_against_the_project(tmp_path):
    project = tmp_path / "proj"
    (project / "sites").mkdir(parents=True)
    (project / "prefect.yaml").write_text("deployments: []\n")
    (project / "sites" / "s.yaml").write_text("labs:\n  path: my-labs\n")
    site = load_site(str(project / "sites" / "s.yaml"))
    assert site.name == "s"
    assert site.labs_dir == (project / "my-labs").resolve()


def test_config_error_lists_all_problems(tmp_path):
    path = write(tmp_path, "hub:\n  port: -1\n  hub_api_port: -2\n")
    with pytest.raises(ConfigError) as info:
        load_site(str(path))
    assert len(info.value.problems) == 2
