"""The ``olab`` command: each lifecycle command runs the Prefect flow of its name.

Exit codes: 0 done, 1 the flow failed, 2 bad input (site file, arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

# Offline machines cannot reach Prefect's telemetry; keep its errors out of the way.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from core.config import ConfigError, Site, load_site  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(message: str) -> None:
    print(message, file=sys.stderr)


FLOWS = {
    "up": "release", "build": "build-image", "test": "test-notebooks", "deploy": "deploy-hub",
    "provision": "provision-cluster", "teardown": "teardown", "restore": "restore", "stop": "stop-hub",
}


def _check_site(ref: str, command: str | None = None) -> Site:
    """The validated site; for a lifecycle command, also one whose target can run its flow
    (else one line, exit 2, before Prefect starts)."""
    site = load_site(ref)
    if command in FLOWS:
        from targets import platform_for

        reason = platform_for(site).not_ready(FLOWS[command])
        if reason:
            raise ConfigError([f"{site.source}: {reason}"])
    elif site.config.target.value != "local" and command == "credentials":
        raise ConfigError([f"{site.source}: olab {command} is for local sites (this one's target is {site.config.target.value})"])
    return site


def _prefect(*, start: bool = True):
    """Prefect settings for a command: the API the caller configured (PREFECT_API_URL in the
    environment, profile or settings in force) if any, else olab's Prefect server, started
    first when ``start`` (one line says so), else only if it runs. Never a temporary server."""
    from olab import prefect_server

    if prefect_server.configured_api():
        return prefect_server.using(None)
    if not start:
        return prefect_server.using(prefect_server.running())
    server, started = prefect_server.ensure_started()
    if started:
        _err(f"started olab's Prefect server at {server.ui} (pid {server.pid}); it stays up for the next commands"
             " (`olab server stop` stops it); `olab credentials` shows its login")
    return prefect_server.using(server)


def _run_flow(name: str, call: Callable[[], object], summary: Callable[[object], list[str]]) -> int:
    from core.models import FlowPlan
    from olab.prefect_server import PrefectServerError

    try:
        with _prefect():
            result = call()
    except PrefectServerError as exc:
        _err(f"olab {name}: {exc}")
        return EXIT_FAILED
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err(f"olab {name}: interrupted")
        return 130
    except Exception as exc:  # the flow's own failure, already logged by Prefect
        for line in _lab_failures(exc):
            _err(line)
        _err(f"olab {name}: FAILED: {exc}")
        return EXIT_FAILED
    print()
    if isinstance(result, FlowPlan):
        print(f"dry run of {result.flow} on site {result.site}: nothing was changed")
        for line in result.lines():
            print(f"  {line}")
        return EXIT_OK
    for line in summary(result):
        print(line)
    return EXIT_OK


def _lab_failures(exc: Exception) -> list[str]:
    """Each failing lab's cell and traceback, printed above the command's one-line reason
    (test-notebooks fails with them, on its own or inside release)."""
    from flows.test_notebooks import LabsFailed

    if not isinstance(exc, LabsFailed):
        return []
    return [line for failure in exc.report.failures for line in ["", *failure.failure_lines()]] + [""]


def cmd_up(args: argparse.Namespace) -> int:
    from flows.release import release

    def summary(r) -> list[str]:
        return [
            f"release of site {args.site}: done",
            f"  image  {r.image.pinned}",
            f"  labs   {len(r.labs.results)} passed",
            f"  hub    {r.hub.url} ({r.hub.action}); log in as {', '.join(_site.config.hub.admins)}: `olab credentials`",
        ]

    _site = _check_site(args.site, "up")
    return _run_flow("up", lambda: release(site=args.site, dry_run=args.dry_run), summary)


def cmd_build(args: argparse.Namespace) -> int:
    from flows.build_image import build_image

    _check_site(args.site, "build")
    return _run_flow(
        "build", lambda: build_image(site=args.site, dry_run=args.dry_run), lambda img: [f"image {img.pinned}", f"  at {img.location}"]
    )


def cmd_test(args: argparse.Namespace) -> int:
    from flows.test_notebooks import test_notebooks

    _check_site(args.site, "test")
    return _run_flow(
        "test",
        lambda: test_notebooks(site=args.site, labs=args.lab or None, dry_run=args.dry_run),
        lambda report: [r.describe() for r in report.results] + [f"all {len(report.results)} labs passed"],
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy_hub import deploy_hub

    _check_site(args.site, "deploy")
    return _run_flow(
        "deploy",
        lambda: deploy_hub(site=args.site, check=not args.no_check, dry_run=args.dry_run),
        lambda hub: [f"hub {hub.url} ({hub.action})", f"  image {hub.image.pinned}"],
    )


def cmd_provision(args: argparse.Namespace) -> int:
    from flows.provision_cluster import provision_cluster

    _check_site(args.site, "provision")
    return _run_flow(
        "provision",
        lambda: provision_cluster(site=args.site, dry_run=args.dry_run, approve=args.approve),
        lambda report: [f"{'ok' if c.ok else 'NO':3} {c.name}: {c.detail}" for c in report.checks],
    )


def cmd_stop(args: argparse.Namespace) -> int:
    from flows.stop_hub import stop_hub

    site = _check_site(args.site, "stop")
    return _run_flow(
        "stop",
        lambda: stop_hub(site=args.site, dry_run=args.dry_run),
        lambda was: [f"hub of site {site.name} stopped; data kept in {site.paths.runtime}" if was else f"no hub was running for site {site.name}"],
    )


def cmd_teardown(args: argparse.Namespace) -> int:
    from flows.teardown import teardown

    site = _check_site(args.site, "teardown")

    def summary(r) -> list[str]:
        if r.already_torn_down:
            return [f"site {site.name} is already torn down; restore point {r.restore_point}"]
        return [
            f"site {site.name} torn down in {r.seconds:.1f}s",
            f"  restore point {r.restore_point}: {len(r.users)} users, {r.files} files, {r.bytes} bytes, verified",
            f"  pruned: {', '.join(r.pruned) or 'none'}; `olab restore` brings it back",
        ]

    return _run_flow("teardown", lambda: teardown(site=args.site, dry_run=args.dry_run, approve=args.approve), summary)


def cmd_restore(args: argparse.Namespace) -> int:
    from flows.restore import restore

    site = _check_site(args.site, "restore")

    def summary(r) -> list[str]:
        if r.restore_point is None:
            return [f"site {site.name}: {r.note}", f"  hub {r.hub.url}"]
        return [
            f"site {site.name} restored from {r.restore_point} in {r.seconds:.1f}s",
            f"  {len(r.users)} users verified file by file; hub {r.hub.url} ({r.hub.action})",
        ]

    return _run_flow(
        "restore", lambda: restore(site=args.site, restore_point=args.restore_point, dry_run=args.dry_run), summary
    )


def cmd_status(args: argparse.Namespace) -> int:
    from olab.status import site_status

    try:
        site = _check_site(args.site, "status")
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return EXIT_USAGE
    with _prefect(start=False) if not args.no_runs else contextlib.nullcontext():
        lines = site_status(site, runs=not args.no_runs)
    for line in lines:
        print(line)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from olab.doctor import diagnose

    site = _check_site(args.site, "doctor")
    lines, ok = diagnose(site)
    for line in lines:
        print(line)
    return EXIT_OK if ok else EXIT_FAILED


def _prefect_login() -> str:
    from olab import prefect_server

    server, login = prefect_server.running(), prefect_server.credential()
    if not login:
        return "Prefect UI: not started yet on this machine (the first flow command starts it and makes its login)"
    user, _, password = login.partition(":")
    where = server.ui if server else "not running (the next flow command starts it)"
    return f"Prefect UI: {where}  user: {user}  password: {password}"


def cmd_credentials(args: argparse.Namespace) -> int:
    from core.secrets import SecretStore

    site = _check_site(args.site, "credentials")
    if not site.paths.secrets.exists():
        print(_prefect_login())
        _err(f"site {site.name} has no secret store yet; run `olab provision` or `olab up`")
        return EXIT_FAILED
    secrets = SecretStore(site.paths.secrets).load()
    print(f"hub:      {site.hub_url}")
    if site.config.hub.authenticator == "shared-password":
        print(f"admin:    {site.config.hub.admins[0]}  password: {secrets.admin_password.get_secret_value()}")
        print("students: none (shared-password is the single-user demo mode; use hub.authenticator native for a class)")
    elif site.config.hub.authenticator == "lti":
        print(f"logins:   from the course platform only (LTI 1.3, {site.config.hub.lti.issuer}); no password opens this hub")
        print(f"admins:   {', '.join(site.config.hub.admins)}, and whoever launches as Instructor or Administrator")
    else:
        print(f"admins:   {', '.join(site.config.hub.admins)}  password: {secrets.admin_password.get_secret_value()}")
        print(f"students: sign up at {site.hub_url}/hub/signup; an admin approves each name at {site.hub_url}/hub/authorize")
    print(_prefect_login())
    return EXIT_OK


def cmd_secrets(args: argparse.Namespace) -> int:
    """`olab secrets init`: a new gke site's hub secrets, generated and written into Vault once;
    on a local site, the LTI client id, kept in its 0600 store."""
    site = _check_site(args.site, "secrets")
    if site.config.vault is None and site.config.target.value == "local" and args.lti_client_id is not None:
        return _store_local_lti_client_id(site, args.lti_client_id, force=args.force)
    if site.config.vault is None:
        _err(f"{site.source}: vault: olab secrets init writes a gke site's secrets into Vault; this site has no vault section"
             " (a local site's secrets are made by `olab provision` in its 0600 store; `--lti-client-id ID` stores its"
             " LTI client id there)")
        return EXIT_USAGE
    from tasks.vault import VaultError, init_hub_secrets, vault_access

    extra = {"lti_client_id": args.lti_client_id} if args.lti_client_id else None
    try:
        result = init_hub_secrets(vault_access(site.config.vault), extra, force=args.force)
    except VaultError as exc:
        _err(f"olab secrets init: {exc}")
        return EXIT_FAILED
    verb = "replaced" if result.replaced else "wrote"
    print(f"{verb} the hub's secrets of site {site.name} in Vault: {site.config.vault.address} {result.mount}/{result.path}, version {result.version}")
    print(f"  keys: {', '.join(result.keys)} (values are never printed)")
    return EXIT_OK


def _store_local_lti_client_id(site: Site, client_id: str, *, force: bool) -> int:
    """The client id of the site's LTI registration, into its 0600 store (made if missing);
    the value is never printed. A different id already there is replaced only with --force."""
    from core.secrets import LTI_CLIENT_ID, SecretStore, lti_client_id_problem

    if problem := lti_client_id_problem(client_id):
        _err(f"olab secrets init: --lti-client-id: {problem}")
        return EXIT_USAGE
    store = SecretStore(site.paths.secrets)
    try:
        before = store.get(LTI_CLIENT_ID)
        if before is not None and before != client_id and not force:
            _err(f"olab secrets init: {store.path} already holds another LTI client id; --force replaces it")
            return EXIT_FAILED
        if before != client_id:
            store.put(LTI_CLIENT_ID, client_id)
    except (OSError, ValueError) as exc:  # a store that is not 0600, unreadable, or not JSON
        _err(f"olab secrets init: {exc}")
        return EXIT_FAILED
    verb = "kept" if before == client_id else "replaced" if before else "stored"
    print(f"{verb} the LTI client id of site {site.name} in {store.path} (mode 0600; the value is never printed)")
    if site.config.hub.authenticator != "lti":
        print(f"  the hub uses it with hub.authenticator lti (this site's is {site.config.hub.authenticator})")
    elif before != client_id:
        print("  `olab deploy` starts (or restarts) the hub with it")
    return EXIT_OK


def cmd_lock(args: argparse.Namespace) -> int:
    from olab.lock import regenerate_lock

    site = _check_site(args.site, "lock")
    path = regenerate_lock(site.image_context)
    print(f"wrote {path}")
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    """`olab server status|stop`: olab's Prefect server on this machine (one per olab home).
    status exits 0 when it runs and answers, 1 when not; stop exits 0 (stopped, or was not running)."""
    from olab import prefect_server

    if args.action == "stop":
        done = prefect_server.stop()
        if done.warm_stopped:
            print(f"stopped olab's warm process (pid {done.warm.pid}); commands running in it go on")
        if done.stopped:
            print(f"stopped olab's Prefect server at {done.server.ui} (pid {done.server.pid})")
        elif done.server:
            print(f"olab's Prefect server was not running (its record named pid {done.server.pid}, "
                  "which is gone or not the server; the record is removed)")
        else:
            print("olab's Prefect server was not running")
        return EXIT_OK
    server = prefect_server.read_record()
    if server is None:
        print(f"olab's Prefect server: not running (the next flow command starts it); home {prefect_server.folder()}")
        _print_warm_status()
        return EXIT_FAILED
    from core.runner import pid_alive

    alive = pid_alive(server.pid) and prefect_server.is_ours(server.pid, server.port)
    healthy = alive and prefect_server.answers(server)
    state = "running" if healthy else ("NOT ANSWERING" if alive else "not running (stale record)")
    print(f"olab's Prefect server: {state}")
    print(f"  url      {server.ui}")
    print(f"  pid      {server.pid}")
    print(f"  since    {server.started_at.astimezone():%Y-%m-%d %H:%M:%S}")
    print(f"  healthy  {'yes' if healthy else 'no'}")
    print(f"  log      {prefect_server.log_file()}")
    _print_warm_status()
    return EXIT_OK if healthy else EXIT_FAILED


def _print_warm_status() -> None:
    from olab import prefect_server, warm

    found = prefect_server.warm_running()
    if warm.disabled():
        print(f"olab's warm process: off ({warm.NO_WARM_VARIABLE} is set: every command runs in its own process)")
    elif found is None:
        print("olab's warm process: not running (the next command that runs a flow starts it as it ends)")
    else:
        print("olab's warm process: " + ("running (commands that run flows start in it)" if found.ready
                                         else "starting (importing; commands run in their own process until it is ready)"))
        print(f"  pid      {found.pid}")
        print(f"  since    {found.started_at.astimezone():%Y-%m-%d %H:%M:%S}")
        print(f"  log      {prefect_server.warm_log_file()}")


def cmd_serve(args: argparse.Namespace) -> int:
    from olab.serve import serve_site

    site = _check_site(args.site, "serve")
    return serve_site(site, port=args.port)


def cmd_preview(args: argparse.Namespace) -> int:
    from olab.preview import run_preview

    site = _check_site(args.site, "preview")
    return run_preview(site, args.site, args.lab)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "up": (cmd_up, "release: build the image, test the labs, deploy the hub, check it"),
    "build": (cmd_build, "build the user environment (skipped when its inputs are unchanged)"),
    "test": (cmd_test, "run every lab in the user environment, in parallel"),
    "deploy": (cmd_deploy, "start or reconfigure the hub, then health-check it"),
    "provision": (cmd_provision, "prepare what the hub runs on (local: folders, ports, tools)"),
    "teardown": (cmd_teardown, "stop the site and keep everything in a verified restore point"),
    "restore": (cmd_restore, "bring the site back from its newest complete restore point"),
    "preview": (cmd_preview, "serve one lab as students will see it (the site's image and Voilà), restaged on each edit, "
                             "until Ctrl-C"),
    "status": (cmd_status, "what is deployed: image, hub, health, last runs"),
    "stop": (cmd_stop, "stop the hub and user servers, keeping all data"),
    "serve": (cmd_serve, "serve every deployment with its schedules on olab's Prefect server (its UI)"),
    "server": (cmd_server, "status|stop: olab's Prefect server on this machine (started by the first flow command)"),
    "doctor": (cmd_doctor, "which image builder and container runtime this machine has, and what to install"),
    "credentials": (cmd_credentials, "print the hub's login passwords (from the 0600 secret store)"),
    "lock": (cmd_lock, "regenerate the image's lock file from its requirements.in"),
    "secrets": (cmd_secrets, "secrets init: write a new gke site's hub secrets into Vault, once; on a local site, "
                             "store its LTI client id"),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--site", default=argparse.SUPPRESS, help="site name in sites/ or path to a site file (default: local)")
    parser = argparse.ArgumentParser(prog="olab", description="The O-Lab lifecycle as Prefect flows.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == "test":
            cmd.add_argument("--lab", action="append", help="run only this lab (repeatable)")
        if name == "deploy":
            cmd.add_argument("--no-check", action="store_true", help="skip the health check")
        if name == "provision":
            cmd.add_argument("--approve", action="store_true", help="apply a plan that destroys or replaces something without waiting (CI)")
        if name == "teardown":
            cmd.add_argument("--approve", action="store_true",
                             help="gke destroy mode: delete the cluster and the snapshotted disks without waiting for an approval")
        if name in FLOWS:
            cmd.add_argument("--dry-run", action="store_true", help="say what would be done, and change nothing")
        if name == "restore":
            cmd.add_argument("--restore-point", help="restore this one (default: the newest complete one)")
        if name == "status":
            cmd.add_argument("--no-runs", action="store_true", help="do not ask Prefect for the last runs")
        if name == "secrets":
            cmd.add_argument("action", choices=["init"], help="init: generate the site's hub secrets and write them once")
            cmd.add_argument("--force", action="store_true",
                             help="replace secrets that are already there (Vault: every user is logged out; a local site: "
                                  "only its LTI client id)")
            cmd.add_argument("--lti-client-id",
                             help="the client id of the site's LTI 1.3 registration on the course platform (a local site: "
                                  "kept in its 0600 secret store)")
        if name == "serve":
            cmd.add_argument("--port", type=int, default=None,
                             help="port on 127.0.0.1 for olab's Prefect server if serve starts it (default 4200, else a free one)")
        if name == "preview":
            cmd.add_argument("lab", help="the lab's name: its file in the site's labs folder without .md or .ipynb")
        if name == "server":
            cmd.add_argument("action", choices=["status", "stop"], help="status: url, pid, since, healthy; stop: stop it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "site"):
        args.site = "local"
    handler = COMMANDS[args.command][0]
    from olab import prefect_server
    from olab.prefect_server import PrefectServerError

    try:
        return handler(args)
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return EXIT_USAGE
    except PrefectServerError as exc:
        _err(f"olab {args.command}: {exc}")
        return EXIT_FAILED
    finally:
        # The next command gets a warm process (olab.warm) if this one used olab's server;
        # started as this one ends, so that it competes with no command's work.
        prefect_server.start_warm()


if __name__ == "__main__":
    sys.exit(main())
