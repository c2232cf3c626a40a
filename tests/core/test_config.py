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


# Malformed site files, as bytes: each is refused with exactly these lines, in order (per
# line a fragment, or a tuple of fragments), exit 2, no traceback. Every line must also start
# with the file's path.
GKE = (
    b"target: gke\ngke:\n  project: my-olab-project\n  region: europe-west2\n"
    b"  domains: [olab.example.org]\n  registry: r\n  terraform_state_bucket: my-bucket\n"
)
BILLION_LAUGHS = b'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + b"".join(
    b"%s: &%s [%s]\n" % (name, name, b", ".join([b"*" + prev] * 9))
    for prev, name in zip(b"abcdefgh", b"bcdefghi")
    for prev, name in [(bytes([prev]), bytes([name]))]
)
MALFORMED = [
    pytest.param(b"description: caf\xe9\n", ["bad.yaml:1: not UTF-8: byte 0xe9 at byte offset 16"], id="not-utf8"),
    pytest.param(b"hub:\n  port: 8000\n\xff\xfe\n", ["bad.yaml:3: not UTF-8: byte 0xff at byte offset 18"], id="not-utf8-line-3"),
    pytest.param(b"description: a\x00b\n", ["bad.yaml:1: character #x0000 (character 14 of the file) is not allowed"], id="nul-character"),
    pytest.param(b"description: " + b"[" * 10000, ["bad.yaml:1:77: nested more than 64 levels deep"], id="deep-flow-sequences"),
    pytest.param(b"description: " + b"{" * 10000, ["nested more than 64 levels deep"], id="deep-flow-mappings"),
    pytest.param(b"".join(b"  " * i + b"k:\n" for i in range(200)), [("bad.yaml:65:", "nested more than 64 levels deep")], id="deep-block-mappings"),
    pytest.param(b"hub:\n  port: 1" + b"0" * 5000 + b"\n", ["bad.yaml:2: hub.port: an integer of 5001 digits is too large"], id="int-past-str-digits-limit"),
    pytest.param(b"hub:\n  port: 0x" + b"f" * 5000 + b"\n", ["hub.port: an integer of 5000 digits"], id="huge-hex-int"),
    pytest.param(b"backups:\n  keep: -" + b"9" * 40 + b"\n", ["backups.keep: an integer of 40 digits"], id="long-negative-int"),
    pytest.param(b"name: a\nname: b\n", ["bad.yaml:2: name: duplicated key 'name' (lines 1 and 2)"], id="duplicated-top-key"),
    pytest.param(
        GKE + b"  shutdown:\n    mode: destroy\n    approve_destroy: true\n    mode: scale-to-zero\n",
        ["bad.yaml:11: gke.shutdown.mode: duplicated key 'mode' (lines 9 and 11)"],
        id="duplicated-deep-key",
    ),
    pytest.param(b"hub:\n  admins: [a]\n  lti: {issuer: x, issuer: y}\n", ["hub.lti.issuer: duplicated key 'issuer' (twice on line 3)"], id="duplicated-flow-key"),
    pytest.param(
        b"hub:\n  port: 1\n  port: 2\nlabs:\n  path: a\n  path: b\n",
        ["bad.yaml:3: hub.port: duplicated key", "bad.yaml:6: labs.path: duplicated key"],
        id="two-duplicates-two-lines",
    ),
    pytest.param(BILLION_LAUGHS, [("bad.yaml:2:", "alias *a: aliases are not allowed")], id="billion-laughs"),
    pytest.param(b"description: &d text\nlabs:\n  health_check_lab: *d\n", ["bad.yaml:3:21: alias *d: aliases are not allowed"], id="single-alias"),
    pytest.param(b"1: a\n", ["bad.yaml:1: (top level): key '1' (YAML int) is not a field name"], id="int-key"),
    pytest.param(b"hub:\n  true: 1\n", ["bad.yaml:2: hub: key 'true' (YAML bool) is not a field name"], id="bool-key"),
    pytest.param(b"? [a, b]\n: 1\n", ["(top level): a sequence as a key is not a field name"], id="sequence-key"),
    pytest.param(b"hub:\n  <<: {port: 9000}\n", ["hub: key '<<' (YAML merge) is not a field name"], id="merge-key"),
    pytest.param(b"description: 2024-02-30\n", ["description: '2024-02-30' is not a valid YAML timestamp"], id="impossible-date"),
    pytest.param(b"description: !!int abc\n", ["description: 'abc' is not a valid YAML int"], id="bad-explicit-tag"),
    pytest.param(b"name: a\n---\nname: b\n", ["YAML syntax error: but found another document"], id="two-documents"),
    pytest.param(b"# padding\n" * 14000, ["more than 131072 bytes"], id="too-large"),
    pytest.param(b"schedules:\n  teardown: '61 * * * *'\n", ["schedules.teardown: '61 * * * *': Invalid cron string"], id="cron-minute-61"),
    pytest.param(b"schedules:\n  teardown: '* * * * * *'\n", ["schedules.teardown: '* * * * * *' is not a 5-field cron"], id="cron-six-fields"),
    pytest.param(b"schedules:\n  restore: '0 0 31 2 *'\n", ["schedules.restore: '0 0 31 2 *': never fires"], id="cron-31-february"),
    pytest.param(b"schedules:\n  restore: '0 7 * * 8'\n", ["schedules.restore: '0 7 * * 8': Invalid cron string"], id="cron-weekday-8"),
    pytest.param(b"schedules:\n  timezone: posixrules\n", ["schedules.timezone: unknown timezone 'posixrules' to Prefect"], id="timezone-prefect-lacks"),
    pytest.param(b"hub:\n  port: true\n", ["hub.port: Input should be a valid integer, not the boolean true"], id="port-true"),
    pytest.param(b'hub:\n  port: "8000"\n', ["hub.port: Input should be a valid integer, not the string '8000'"], id="port-string"),
    pytest.param(b"backups:\n  keep: 2.5\n", ["backups.keep: Input should be a valid integer, not the number 2.5"], id="keep-float"),
    pytest.param(b"backups:\n  keep: 4.0\n", ["backups.keep: Input should be a valid integer, not the number 4.0"], id="keep-whole-float"),
    pytest.param(
        GKE + b'  shutdown:\n    approve_destroy: "yes"\n',
        ["gke.shutdown.approve_destroy: Input should be a valid boolean, not the string 'yes'"],
        id="approve-destroy-string",
    ),
    pytest.param(GKE + b"  user_pool:\n    preemptible: 1\n", ["gke.user_pool.preemptible: Input should be a valid boolean, not the number 1"], id="bool-from-int"),
    pytest.param(b"hub:\n  cpu_limit: true\n", ["hub.cpu_limit: Input should be a valid number, not the boolean true"], id="float-from-bool"),
    pytest.param(b"hub:\n  cpu_limit: '1.5'\n", ["hub.cpu_limit: Input should be a valid number, not the string '1.5'"], id="float-from-string"),
    pytest.param(GKE + b"  prices:\n    cluster_hour: .inf\n", ["gke.prices.cluster_hour: Input should be a finite number"], id="infinite-price"),
]


def test_every_shipped_site_file_loads():
    shipped = sorted((REPO / "sites").glob("*.yaml"))
    assert shipped, "sites/*.yaml"
    for path in shipped:
        assert load_site(str(path)).source == path


def test_nesting_up_to_the_limit_is_read_and_one_more_level_is_refused(tmp_path):
    # The top-level mapping is level 1: 63 lists inside it make 64 levels.
    ok = write(tmp_path, "description: " + "[" * 63 + "]" * 63 + "\n", "ok.yaml")
    with pytest.raises(ConfigError) as info:
        load_site(str(ok))
    assert info.value.problems == [f"{ok}: description: Input should be a valid string"]
    deep = write(tmp_path, "description: " + "[" * 64 + "]" * 64 + "\n", "deep.yaml")
    with pytest.raises(ConfigError) as info:
        load_site(str(deep))
    assert info.value.problems == [f"{deep}:1:77: nested more than 64 levels deep"]


def test_strict_types_still_take_what_site_files_write(tmp_path):
    # An int where a float is wanted, YAML's true/false, and numbers that fit: all accepted.
    path = tmp_path / "ok.yaml"
    path.write_bytes(
        GKE
        + b"  poll_seconds: 5\n  approval_timeout_seconds: 60\n  shutdown:\n    approve_destroy: true\n"
        + b"  prices:\n    cluster_hour: 0\n    node_hour: {e2-standard-2: 1}\n"
        + b"  user_pool:\n    preemptible: false\n    max_nodes: 1_000\n"
        + b"hub:\n  cpu_limit: 2\n  port: 0x1F90\n"
    )
    site = load_site(str(path))
    gke = site.config.gke
    assert gke.poll_seconds == 5.0 and gke.shutdown.approve_destroy is True
    assert gke.prices.cluster_hour == 0.0 and gke.prices.node_hour == {"e2-standard-2": 1.0}
    assert gke.user_pool.max_nodes == 1000 and gke.user_pool.preemptible is False
    assert site.config.hub.cpu_limit == 2.0 and site.config.hub.port == 8080


def test_crons_prefect_schedules_accept_pass(tmp_path):
    from prefect.client.schemas.schedules import CronSchedule

    path = write(
        tmp_path,
        "schedules:\n  timezone: America/New_York\n  teardown: '30 18 * * FRI'\n  restore: '0 0 29 2 *'\n",
    )
    schedules = load_site(str(path)).config.schedules
    # What the site keeps is what olab serve hands Prefect.
    CronSchedule(cron=schedules.teardown, timezone=schedules.timezone)
    assert (schedules.teardown, schedules.restore) == ("30 18 * * FRI", "0 0 29 2 *")


def test_an_unreadable_site_file_is_one_line(tmp_path, monkeypatch):
    # Tests run as root, whom file modes do not stop: the refusal to open is simulated.
    path = write(tmp_path, "description: fine\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ConfigError) as info:
        load_site(str(path))
    assert info.value.problems == [f"{path}: cannot read the site file: Permission denied"]


# LTI 1.3 logins on the local target: the course platform's URLs are https://, or http:// on
# this machine's loopback (a test, a dev Moodle); the gke target keeps https:// only.
def lti_site(target: bytes, issuer: str, authorize_url: str, jwks_endpoint: str) -> bytes:
    head = GKE if target == b"gke" else b"target: local\n"
    return head + (
        f"hub:\n  authenticator: lti\n  admins: [prof@example.org]\n  lti:\n    issuer: {issuer}\n"
        f"    authorize_url: {authorize_url}\n    jwks_endpoint: {jwks_endpoint}\n"
    ).encode()


@pytest.mark.parametrize(
    "platform",
    [
        ("https://moodle.example.org", "https://moodle.example.org/mod/lti/auth.php", "https://moodle.example.org/mod/lti/certs.php"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/auth", "http://127.0.0.1:8080/jwks"),
        ("http://localhost/moodle", "http://localhost/moodle/mod/lti/auth.php", "http://localhost/moodle/mod/lti/certs.php"),
        ("http://[::1]:9000", "http://[::1]:9000/auth", "http://127.0.0.2:9000/jwks"),
    ],
    ids=["https", "http-127.0.0.1", "http-localhost", "http-ipv6-loopback"],
)
def test_a_local_site_takes_lti_from_an_https_or_loopback_platform(tmp_path, platform):
    path = tmp_path / "lti.yaml"
    path.write_bytes(lti_site(b"local", *platform))
    hub = load_site(str(path)).config.hub
    assert hub.authenticator == "lti"
    assert (hub.lti.issuer, hub.lti.authorize_url, hub.lti.jwks_endpoint) == platform
    assert hub.lti.username_key == "email"


def test_native_stays_the_local_default(tmp_path):
    assert load_site(str(write(tmp_path, "target: local\n"))).config.hub.authenticator == "native"


LTI_REFUSED = [
    pytest.param(
        lti_site(b"local", "https://lms.example.org", "http://lms.example.org/auth", "https://lms.example.org/jwks"),
        ["hub.lti.authorize_url: 'http://lms.example.org/auth': use https:// (http:// only on the local target, for a "
         "course platform on this machine's loopback)"],
        id="local-http-off-loopback",
    ),
    pytest.param(
        lti_site(b"local", "http://10.0.0.5", "http://10.0.0.5/auth", "https://lms.example.org/jwks"),
        ["hub.lti.issuer: 'http://10.0.0.5': use https://", "hub.lti.authorize_url: 'http://10.0.0.5/auth': use https://"],
        id="local-http-lan-two-lines",
    ),
    pytest.param(
        lti_site(b"local", "ftp://lms.example.org", "https://lms.example.org/auth?x=1", "https://lms.example.org/jwks"),
        ["hub.lti.issuer: 'ftp://lms.example.org' is not an https:// URL", "hub.lti.authorize_url: 'https://lms.example.org/auth?x=1' is not an https:// URL"],
        id="not-urls",
    ),
    pytest.param(
        lti_site(b"gke", "https://lms.example.org", "https://lms.example.org/auth", "http://127.0.0.1:8080/jwks"),
        ["hub.lti.jwks_endpoint 'http://127.0.0.1:8080/jwks': the gke target's course platform must be https://"],
        id="gke-http-loopback",
    ),
    pytest.param(b"target: local\nhub:\n  authenticator: lti\n", ["authenticator lti needs an lti section"], id="local-lti-without-platform"),
    pytest.param(b"target: local\nhub:\n  authenticator: cas\n", ["hub.authenticator: Input should be 'native', 'shared-password' or 'lti'"],
                 id="unknown-authenticator"),
    pytest.param(GKE + b"hub:\n  authenticator: native\n", ["hub.authenticator native: the gke target runs shared-password or lti"],
                 id="gke-native"),
]


@pytest.mark.parametrize(("content", "expected"), MALFORMED + LTI_REFUSED)
def test_malformed_site_file_exits_2_with_one_line_per_problem(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    code, errors, out = run_cli(capsys, "status", "--site", str(path))
    assert code == 2
    assert len(errors) == len(expected), errors
    for line, fragments in zip(errors, expected):
        assert line.startswith(str(path)), line
        for fragment in (fragments,) if isinstance(fragments, str) else fragments:
            assert fragment in line, line
    assert "Traceback" not in "\n".join(errors) + out
    with pytest.raises(ConfigError) as info:  # the same lines from the library, without the CLI
        load_site(str(path))
    assert info.value.problems == errors
