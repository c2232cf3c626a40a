"""Teardown and restore lose nothing: nasty data round trips, crashes at every
step, a corrupted archive, an unusable backup location, and no interleaving."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.build_image import build_image
from flows.deploy_hub import deploy_hub
from flows.restore import restore
from flows.teardown import teardown
from core.config import load_site
from core.runner import pid_alive
from core.sealing import KeyMissing, key_path
from core.secrets import SecretStore
from core.state import read_mark
from olab.status import site_status
from tests.conftest import hub_pid
from tasks.backup import BackupError, NotAuthentic, VerificationFailed, list_restore_points
from tasks.host import RUNTIME_MARK, NotOurs, read_runtime_mark, staging_dir

from tests.conftest import REPO  # noqa: E402

pytestmark = pytest.mark.slow  # runs flows on a Prefect server
USERS = [f"student{i:02d}" for i in range(1, 20)] + ["prof"]


def write_nasty_data(homes: Path) -> None:
    """Per user a work/ tree of the kinds of files that break naive backups."""
    for i, user in enumerate(USERS):
        work = homes / user / "work"
        (work / "empty dir" / "nested empty").mkdir(parents=True, exist_ok=True)
        (work / "données été ünïcode ✓.txt").write_text(f"résultat {user}\n")
        (work / "file with spaces.csv").write_text("t,x\n0,1\n")
        (work / ".hidden").write_text("secret-ish\n")
        (work / "zero").write_bytes(b"")
        (work / f"marker.txt").write_text(f"UNIQUE-MARKER-{user}-" + "x" * 5000)
        private = work / "private.key"
        private.write_text("key\n")
        os.chmod(private, 0o600)
        script = work / "run.sh"
        script.write_text("#!/bin/sh\necho hi\n")
        os.chmod(script, 0o755)
        os.symlink("file with spaces.csv", work / "relative link")
        os.symlink("/nonexistent/target", work / "dangling link")
        os.symlink("../work/zero", work / "empty dir" / "up link")
        if i == 0:
            with open(work / "big.bin", "wb") as big:
                block = hashlib.sha256(b"olab").digest() * 32768  # 1 MiB, not all zeros
                for _ in range(50):
                    big.write(block)


def snapshot(homes: Path) -> dict[str, tuple]:
    """Every path under each user's work/ tree: type, mode, size, content hash or link target."""
    out = {}
    for user in USERS:
        root = homes / user / "work"
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                st = path.lstat()
                rel = str(path.relative_to(homes))
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = ("link", os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = ("dir", stat.S_IMODE(st.st_mode))
                else:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def api_for(site):
    token = SecretStore(site.paths.secrets).load().api_token.get_secret_value()
    return httpx.Client(base_url=site.hub_url, headers={"Authorization": f"token {token}"}, timeout=60)


@pytest.fixture
def live_site(make_site, stop_hubs):
    """A deployed local site with 20 users in the hub database and nasty data in their homes."""
    path = make_site("td", backups={"keep": 3}, hub={"admins": ["prof"]})
    stop_hubs.append(path)
    image = build_image(site=str(path))
    deploy_hub(site=str(path), image=image, check=False)
    site = load_site(str(path))
    with api_for(site) as api:
        for user in USERS:
            if user != "prof":
                api.post(f"/hub/api/users/{user}").raise_for_status()
    write_nasty_data(site.paths.homes)
    return path, site


def test_round_trip_keeps_every_file_the_database_and_the_secrets(live_site, caplog):
    path, site = live_site
    before = snapshot(site.paths.homes)
    assert len(before) > 20 * 10
    secrets_before = site.paths.secrets.read_bytes()
    secret_values = SecretStore(site.paths.secrets).load().values()
    note = f"olab-note-{secrets.token_hex(8)}"  # kept in clear in the hub's database only
    with api_for(site) as api:
        api.post("/hub/api/users/student01/server").raise_for_status()  # a running server to stop
        # A token lives only in the hub's database: it works after restore only if the database came back.
        student_token = api.post("/hub/api/users/student02/tokens", json={"note": note}).json()["token"]
    # Bits a restore must not bring back (outside work/, which snapshot compares).
    tools = site.paths.homes / "student05" / "tools"
    (tools / "drop").mkdir(parents=True)
    os.chmod(tools / "drop", 0o1777)
    (tools / "suid").write_text("#!/bin/sh\nid\n")
    os.chmod(tools / "suid", 0o4755)
    pid = hub_pid(site)

    report = teardown(site=str(path))
    archives = len(USERS) + 1  # every home and the hub's state
    assert f"archived (homes + hub state): {archives} of {archives}" in caplog.text, "teardown shows its progress"
    assert not pid_alive(pid)
    assert not site.paths.runtime.exists()
    assert report.restore_point and len(report.users) == len(USERS)
    point = site.paths.backups / report.restore_point
    assert (point / "COMPLETE").is_file() and (point / "manifest.mac").is_file()
    for archive in [point / "hub.tar.enc", *(point / "users").iterdir()]:
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert key_path(site.name).is_file() and not key_path(site.name).is_relative_to(site.paths.backups)
    # Nothing of the secret store or the database is in clear anywhere in the backups.
    assert len(secret_values) >= 5
    for file in (p for p in site.paths.backups.rglob("*") if p.is_file()):
        data = file.read_bytes()
        for value in [*secret_values, note, "SQLite format 3"]:
            assert value.encode() not in data, f"{file.relative_to(site.paths.backups)} holds {value[:8]}... in clear"
    assert read_mark(site).phase == "torn-down"
    status = "\n".join(site_status(site, runs=False))
    assert f"(kept in restore point {report.restore_point})" in status and "hub      torn down" in status
    assert "none built yet" not in status
    again = teardown(site=str(path))
    assert again.already_torn_down

    restored = restore(site=str(path))
    assert f"unpacked and verified (homes + hub state): {archives} of {archives}" in caplog.text
    assert restored.restore_point == report.restore_point
    assert sorted(u.user for u in restored.users) == sorted(USERS)
    assert all(u.verified for u in restored.users)
    assert snapshot(site.paths.homes) == before
    assert site.paths.secrets.read_bytes() == secrets_before
    assert stat.S_IMODE(site.paths.secrets.stat().st_mode) == 0o600
    assert stat.S_IMODE((tools / "suid").stat().st_mode) == 0o755 and stat.S_IMODE((tools / "drop").stat().st_mode) == 0o777
    assert read_runtime_mark(site.paths.runtime) == site.name, "a restored runtime is olab's to delete again"
    assert read_mark(site) is None
    with api_for(site) as api:
        users = {u["name"]: u for u in api.get("/hub/api/users").json()}
    assert set(USERS) - {"prof"} <= set(users)
    who = httpx.get(f"{site.hub_url}/hub/api/user", headers={"Authorization": f"token {student_token}"})
    assert who.status_code == 200 and who.json()["name"] == "student02"


def test_dry_run_touches_nothing(live_site, capsys):
    from olab.cli import main

    path, site = live_site
    before = snapshot(site.paths.homes)
    assert main(["teardown", "--dry-run", "--site", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"would archive {len(USERS)} users and the hub's state" in out
    assert f"would delete {site.paths.runtime}" in out and "would stop user servers" in out
    assert pid_alive(hub_pid(site))
    assert snapshot(site.paths.homes) == before
    assert list_restore_points(site.paths.backups) == []


def test_corrupted_archive_fails_loudly_and_an_older_point_still_restores(live_site):
    path, site = live_site
    before = snapshot(site.paths.homes)
    older = teardown(site=str(path)).restore_point
    restore(site=str(path))
    newer = teardown(site=str(path)).restore_point
    archive = site.paths.backups / newer / "users" / "student07.tar"
    data = bytearray(archive.read_bytes())
    offset = data.index(b"UNIQUE-MARKER-student07") + 10
    data[offset] ^= 0x01
    archive.write_bytes(bytes(data))
    damaged = hashlib.sha256(archive.read_bytes()).hexdigest()

    with pytest.raises(VerificationFailed) as info:
        restore(site=str(path))
    assert f"restore point {newer}: users/student07.tar does not match its manifest" in str(info.value)
    assert "user student07" in str(info.value) and "work/marker.txt" in str(info.value)
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == damaged, "restore must not touch the restore point"
    assert not site.paths.runtime.exists()

    # The manifest made to match the damage: refused by its seal before anything is unpacked.
    manifest = site.paths.backups / newer / "manifest.json"
    forged = json.loads(manifest.read_text())
    forged["users"] = [u for u in forged["users"] if u["name"] != "student07"]
    manifest.write_text(json.dumps(forged, indent=2, sort_keys=True) + "\n")
    with pytest.raises(NotAuthentic, match=f"restore point {newer}: manifest.json is not authenticated by this site's key"):
        restore(site=str(path))
    assert not staging_dir(site).exists() and not site.paths.runtime.exists()

    # Without the key nothing is restored, and restore says where the key was expected.
    key = key_path(site.name)
    os.replace(key, key.with_name("elsewhere"))
    try:
        with pytest.raises(KeyMissing, match=f"restore key is missing: expected at {key}"):
            restore(site=str(path), restore_point=older)
    finally:
        os.replace(key.with_name("elsewhere"), key)

    restore(site=str(path), restore_point=older)
    assert snapshot(site.paths.homes) == before


def test_teardown_deletes_only_a_runtime_olab_marked_and_keeps_backups_out_of_it(live_site):
    path, site = live_site
    pid = hub_pid(site)
    before = snapshot(site.paths.homes)
    assert read_runtime_mark(site.paths.runtime) == site.name, "deploy marked the runtime it made"
    (site.paths.runtime / RUNTIME_MARK).unlink()  # as a runtime made before olab marked them
    with pytest.raises(NotOurs, match=f"runtime folder {site.paths.runtime} has no olab mark"):
        teardown(site=str(path))
    assert pid_alive(pid), "refused before anything was stopped"
    assert snapshot(site.paths.homes) == before and site.paths.secrets.is_file()
    assert list_restore_points(site.paths.backups) == [] and read_mark(site) is None

    deploy_hub(site=str(path), check=False)  # the next deploy marks a runtime that holds only olab's
    assert read_runtime_mark(site.paths.runtime) == site.name
    inside = site.paths.runtime / "backups"
    path.write_text(path.read_text().replace(str(site.paths.backups), str(inside)))
    with pytest.raises(NotOurs, match=f"backups.path {inside} lies in the runtime folder"):
        teardown(site=str(path))
    assert pid_alive(pid) and snapshot(site.paths.homes) == before
    assert not inside.exists()


def test_unwritable_backup_location_stops_teardown_before_anything(live_site, tmp_path):
    path, site = live_site
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the backups should go")
    text = path.read_text().replace(str(site.paths.backups), str(blocker / "backups"))
    path.write_text(text)
    pid = hub_pid(site)
    before = snapshot(site.paths.homes)
    with pytest.raises(BackupError, match="is not writable"):
        teardown(site=str(path))
    assert pid_alive(pid), "the hub must stay up"
    assert snapshot(site.paths.homes) == before


def test_full_backup_location_stops_teardown_before_anything(live_site, tmp_path):
    path, site = live_site
    small = tmp_path / "small-disk"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill: {mounted.stderr.decode().strip()}")
    try:
        path.write_text(path.read_text().replace(str(site.paths.backups), str(small / "backups")))
        pid = hub_pid(site)
        with pytest.raises(BackupError, match="MiB free"):
            teardown(site=str(path))
        assert pid_alive(pid)
        assert site.paths.runtime.exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_deploy_and_teardown_started_together_do_not_interleave(live_site):
    path, site = live_site
    errors: list[BaseException] = []

    def run(fn, **kw):
        try:
            fn(site=str(path), **kw)
        except BaseException as exc:  # noqa: BLE001 - deploy after teardown is refused
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(deploy_hub,), kwargs={"check": False}), threading.Thread(target=run, args=(teardown,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        # The newest runs of the two flows: the session's server holds hundreds of runs by now,
        # and its default order (by random id) would leave these out of a page of 200.
        newest = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["deploy-hub", "teardown"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=20,
        )
        runs = [r for r in newest if r.parameters.get("site") == str(path)][:2]
        assert len(runs) == 2, [(r.name, r.parameters) for r in newest]
        spans = []
        for run in runs:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            took = [l.timestamp for l in logs if "took the lifecycle lock" in l.message]
            released = [l.timestamp for l in logs if "releasing the lifecycle lock" in l.message]
            assert len(took) == 1 and len(released) == 1, [l.message for l in logs]
            spans.append((took[0], released[0], run.name))
    (a_start, a_end, _), (b_start, b_end, _) = sorted(spans)
    # The work each did under the site's lock did not overlap.
    assert a_end <= b_start, f"flows interleaved: {spans}"
    for exc in errors:
        assert "torn down" in str(exc), exc


def _cli(path: Path, *args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("OLAB_CRASH_AFTER", None)
    if crash:
        env["OLAB_CRASH_AFTER"] = crash
    return subprocess.run([sys.executable, "-m", "olab.cli", *args, "--site", str(path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


TEARDOWN_STEPS = ["preflight", "stop-servers", "stop-hub", "archive", "verify", "mark", "delete"]
RESTORE_STEPS = ["mark", "unpack", "swap", "unmark", "deploy"]


def test_killed_at_every_step_and_run_again_loses_nothing(live_site):
    path, site = live_site
    before = snapshot(site.paths.homes)
    secrets_before = site.paths.secrets.read_bytes()

    for step in TEARDOWN_STEPS:
        with api_for(site) as api:
            api.post("/hub/api/users/student03/server")
        killed = _cli(path, "teardown", crash=f"teardown:{step}")
        assert killed.returncode == -9, f"teardown did not die after {step}: {killed.stderr[-2000:]}"
        rerun = _cli(path, "teardown")
        assert rerun.returncode == 0, f"teardown rerun after a kill at {step}: {rerun.stderr[-3000:]}"
        assert not site.paths.runtime.exists()
        ok = _cli(path, "restore")
        assert ok.returncode == 0, f"restore after a kill at teardown:{step}: {ok.stderr[-3000:]}"
        assert snapshot(site.paths.homes) == before, f"data changed after a kill at teardown:{step}"
        assert site.paths.secrets.read_bytes() == secrets_before

    for step in RESTORE_STEPS:
        assert _cli(path, "teardown").returncode == 0
        killed = _cli(path, "restore", crash=f"restore:{step}")
        assert killed.returncode == -9, f"restore did not die after {step}: {killed.stderr[-2000:]}"
        rerun = _cli(path, "restore")
        assert rerun.returncode == 0, f"restore rerun after a kill at {step}: {rerun.stderr[-3000:]}"
        assert snapshot(site.paths.homes) == before, f"data changed after a kill at restore:{step}"
        assert httpx.get(f"{site.hub_url}/hub/api/").status_code == 200

    points = list_restore_points(site.paths.backups)
    assert sum(p.complete for p in points) <= 3, "retention keeps 3"
    assert not any(not p.complete for p in points[:-1]), "incomplete points older than the newest complete one are pruned"
