# JupyterHub configuration for an olab local site.
# Written by `olab deploy`; edit the site file in sites/, not this file.
# Settings come from olab-hub.json beside it; secrets from the site's 0600
# secret store, so neither this file nor the hub's command line holds one.
import json
import os
import shutil
import sys
import types
from pathlib import Path

c = get_config()  # noqa: F821


def _module_of(name, code, filename):
    """One of olab's own modules, run from the source the settings carry (the hub and olab
    share its code)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(code, filename, "exec"), module.__dict__)
    return module


settings = json.loads(Path(__file__).with_name("olab-hub.json").read_text())
secrets = json.loads(Path(settings["secrets_file"]).read_text())

c.JupyterHub.ip = settings["host"]
c.JupyterHub.port = settings["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_api_port"]
c.JupyterHub.db_url = "sqlite:///" + settings["db_file"]
c.JupyterHub.pid_file = settings["pid_file"]
c.JupyterHub.cookie_secret = bytes.fromhex(secrets["cookie_secret"])
c.JupyterHub.cleanup_servers = True

c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:%d" % settings["proxy_api_port"]
c.ConfigurableHTTPProxy.auth_token = secrets["proxy_auth_token"]
# A dashboard's first render executes its notebook; on a cold machine that can
# outlast the proxy's default 20 s, which students would see as a 503.
c.ConfigurableHTTPProxy.command = settings["proxy_command"] + ["--timeout", "300000", "--proxy-timeout", "300000"]
c.ConfigurableHTTPProxy.pid_file = settings["proxy_pid_file"]

c.Authenticator.admin_users = set(settings["admins"])
c.Authenticator.allow_all = True
if settings["authenticator"] == "native":
    # Per-student logins: a student signs up with a password of their own, and an admin
    # approves the name (/hub/authorize) before it can log in; admins log in with the site's
    # admin password (`olab credentials`), and no signup can claim an admin's name.
    import hmac

    import nativeauthenticator
    from nativeauthenticator import NativeAuthenticator

    class OlabNativeAuthenticator(NativeAuthenticator):
        def create_user(self, username, password, **kwargs):
            if self.normalize_username(username) in self.admin_users:
                return None
            return super().create_user(username, password, **kwargs)

        def get_handlers(self, app):
            # NativeAuthenticator 1.3's own login page uses what JupyterHub 6 took away
            # (handler.statsd): JupyterHub's login page is used, its signup, approval and
            # password pages are kept.
            return [(path, handler) for path, handler in super().get_handlers(app) if path != r"/login"]

        async def authenticate(self, handler, data):
            name = self.normalize_username(data.get("username", ""))
            if name in self.admin_users:
                given = data.get("password", "").encode()
                return name if hmac.compare_digest(given, secrets["admin_password"].encode()) else None
            return await super().authenticate(handler, data)

    c.JupyterHub.authenticator_class = OlabNativeAuthenticator
    c.JupyterHub.template_paths = [os.path.join(os.path.dirname(nativeauthenticator.__file__), "templates")]
    c.NativeAuthenticator.open_signup = False
    c.NativeAuthenticator.minimum_password_length = 10
    c.NativeAuthenticator.check_common_password = True
    c.NativeAuthenticator.allowed_failed_logins = 5
    c.NativeAuthenticator.seconds_before_next_try = 60
elif settings["authenticator"] == "lti":
    # LTI 1.3 logins from the course platform: its signed launch (checked against its JWKS,
    # issuer and our client id) names the user by the claim username_key, and its roles
    # make them an admin or not at each launch (the rule's code comes with the settings,
    # the same code the gke hub runs). The client id comes from the 0600 store only.
    c.JupyterHub.authenticator_class = "ltiauthenticator.lti13.auth.LTI13Authenticator"
    lti = settings["lti"]
    c.LTI13Authenticator.issuer = lti["issuer"]
    c.LTI13Authenticator.authorize_url = lti["authorize_url"]
    c.LTI13Authenticator.jwks_endpoint = lti["jwks_endpoint"]
    c.LTI13Authenticator.username_key = lti["username_key"]
    c.LTI13Authenticator.uri_scheme = lti["uri_scheme"]
    if not secrets.get("lti_client_id"):
        raise SystemExit("olab: no LTI client id in the site's secret store: olab secrets init --lti-client-id ID")
    c.LTI13Authenticator.client_id = {secrets["lti_client_id"]}
    exec(compile(lti["admin_hook"], "olab-lti-admins", "exec"))
else:
    # The single-user demo mode (see single_user below).
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.admin_password = secrets["admin_password"]
    c.SharedPasswordAuthenticator.user_password = secrets["user_password"]

# Every user's server runs as this account from the built environment, with
# its own home under the site's data folder (what backups cover).
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = settings["homes"] + "/{username}"
c.Spawner.cmd = [settings["singleuser"]]
c.Spawner.args = settings["singleuser_args"]
c.Spawner.default_url = settings["default_url"]
c.Spawner.start_timeout = settings["start_timeout"]
c.Spawner.http_timeout = settings["start_timeout"]
c.Spawner.environment = settings["user_environment"]

c.JupyterHub.services = [{"name": "olab", "api_token": secrets["api_token"]}]
c.JupyterHub.load_roles = [
    {
        "name": "olab-operator",
        "scopes": ["admin:users", "admin:servers", "access:servers", "tokens", "read:hub"],
        "services": ["olab"],
    }
]

if settings["cull"]:
    # Idle servers are stopped (their data stays), as Zero-to-JupyterHub's culler does.
    cull = settings["cull"]
    c.JupyterHub.services.append(
        {
            "name": "idle-culler",
            "command": cull["command"] + ["--timeout=%d" % cull["timeout"], "--cull-every=%d" % cull["every"]],
        }
    )
    c.JupyterHub.load_roles.append(
        {
            "name": "idle-culler",
            "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
            "services": ["idle-culler"],
        }
    )


if settings["spawner"] == "docker":
    # Each student's container in a network namespace of its own, on a bridge of its own
    # (podman's "isolate": no traffic between two such bridges): from inside it, this
    # machine's loopback (the Prefect API, the registry, the hub's own port, anything bound
    # to 127.0.0.1) and every other student's server are out of reach. The hub's API listens
    # on the gateway of podman's default bridge, a host address the containers reach through
    # their own gateway, and answers nothing without a token; the proxy (on this machine)
    # reaches each server at its container's address. The container runs in a user namespace:
    # its uid 1000 is host uid home_uid, which is no account of this machine.
    import asyncio

    from docker.errors import APIError
    from dockerspawner import DockerSpawner
    from traitlets import default

    # core/bridges.py, its source carried by the settings: the spawner and olab's cleanup share
    # one code and one machine-wide ledger of the students' bridges.
    bridges = _module_of("olab_bridges", settings["bridges_code"], "core/bridges.py")

    TOKEN_IN_CONTAINER = "/run/olab/api-token"

    class OlabDockerSpawner(DockerSpawner):
        @default("network_name")
        def _own_network(self):
            # One bridge per student's server, named for this olab home too: podman's networks
            # are the machine's, and another home may have a site and a student of these names.
            return bridges.network_name(self.object_name, settings["store"])

        async def start(self):
            # Its subnet and interface are chosen under the machine's lock, clear of every
            # other bridge (a server started again keeps its network).
            await asyncio.to_thread(
                bridges.make_student_network, self.client, self.network_name, store=settings["store"], site=settings["site"]
            )
            return await super().start()

        def get_env(self):
            # The server's API token reaches the container as a file of its user's (0600,
            # mounted read-only), not through its environment: podman writes a container's
            # environment into the runtime's config.json, mode 0644, under folders other
            # accounts of this machine may traverse. The command below reads it back.
            env = super().get_env()
            token = env.pop("JUPYTERHUB_API_TOKEN", None)
            env.pop("JPY_API_TOKEN", None)
            if token is not None:
                _write_token(self.user.name, token)
            return env

        async def stop(self, now=False):
            await super().stop(now=now)
            _token_file(self.user.name).unlink(missing_ok=True)
            try:
                await asyncio.to_thread(bridges.remove_student_network, self.client, self.network_name)
            except (APIError, OSError) as exc:
                self.log.warning("network %s of %s stays: %s", self.network_name, self.user.name, exc)

    def _token_file(name):
        return Path(settings["tokens"]) / _file_name(name, "a token file")

    def _write_token(name, token):
        tokens = Path(settings["tokens"])
        tokens.mkdir(mode=0o711, exist_ok=True)
        fd = os.open(tokens, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _write_over(fd, _file_name(name, "a token file"), token.encode(), settings["home_uid"], 0o600)
        finally:
            os.close(fd)

    c.JupyterHub.spawner_class = OlabDockerSpawner
    c.JupyterHub.hub_ip = settings["gateway"]
    c.DockerSpawner.client_kwargs = {"base_url": settings["docker_url"]}
    c.DockerSpawner.image = settings["image"]
    # deploy-hub pulls the pinned digest first; a spawn never reaches a registry.
    c.DockerSpawner.pull_policy = "never"
    c.DockerSpawner.use_internal_ip = True
    c.DockerSpawner.remove = True
    c.DockerSpawner.prefix = settings["container_prefix"]
    c.DockerSpawner.volumes = {settings["homes"] + "/{raw_username}": "/home/jovyan"}
    c.DockerSpawner.hub_connect_url = "http://%s:%d" % (settings["gateway"], settings["hub_api_port"])
    # docker-py accepts only "host" as a user namespace mode; podman's API takes the mapping.
    userns = settings["userns"]
    c.DockerSpawner.extra_create_kwargs = {
        "host_config": {
            "UsernsMode": "auto:uidmapping=0:{base}:{size},gidmapping=0:{base}:{size}".format(**userns)
        }
    }
    c.Spawner.ip = "0.0.0.0"
    c.Spawner.port = 8888
    c.DockerSpawner.read_only_volumes = {settings["tokens"] + "/{raw_username}": TOKEN_IN_CONTAINER}
    c.Spawner.cmd = [
        "sh", "-c",
        'JUPYTERHUB_API_TOKEN="$(cat %s)" && export JUPYTERHUB_API_TOKEN JPY_API_TOKEN="$JUPYTERHUB_API_TOKEN" '
        '&& exec jupyterhub-singleuser "$@"' % TOKEN_IN_CONTAINER,
        "jupyterhub-singleuser",
    ]
    c.Spawner.args = []
    c.Spawner.environment = {"OLAB_SITE": settings["site"]}
    if settings["mem_limit"]:
        c.DockerSpawner.mem_limit = settings["mem_limit"]
    if settings["cpu_limit"]:
        c.DockerSpawner.cpu_limit = settings["cpu_limit"]


def _dir_at(parent_fd, name, uid=None):
    """The folder ``name`` in ``parent_fd`` (made if missing), opened without following a
    symlink: a student who turns ``labs`` (or their home) into a link to /etc gets an error,
    not root writing there."""
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        made = True
    except FileExistsError:
        made = False
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    if uid is not None and (made or os.fstat(fd).st_uid != uid):
        _own_tree(fd, uid)
    return fd


def _own_tree(fd, uid):
    """Give the folder ``fd`` and all in it to ``uid`` (the container's user as the host sees
    it), links themselves and not what they point to: a home made before containers ran in
    a user namespace (or restored from such a time) becomes its student's again."""
    os.fchown(fd, uid, uid)
    for _, dirs, files, dir_fd in os.fwalk(dir_fd=fd, follow_symlinks=False):
        for name in dirs + files:
            os.chown(name, uid, uid, dir_fd=dir_fd, follow_symlinks=False)


def _file_name(name, what):
    """A user's name as a file's name in a folder of olab's, or ValueError."""
    if "/" in name or name in (".", ".."):
        raise ValueError(f"user name {name!r} cannot name {what}")
    return name


def _write_over(dir_fd, name, content, uid, mode, log=None):
    """Put ``content`` at ``name`` in ``dir_fd`` in place of whatever is there: written to a
    new file first (O_EXCL, no link followed, ``mode``, owned by ``uid`` if given), then renamed
    over the name, which replaces a link put there rather than writing through it. With
    ``log`` (the lab index in a student's labs), a failure once the new file exists, a folder
    of that name for one, is said in the hub's log and the student's start goes on without
    the fresh page; else it is raised."""
    tmp = ".%s.olab-%s" % (name, os.urandom(6).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            if uid is not None:
                os.fchown(out.fileno(), uid, uid)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        os.unlink(tmp, dir_fd=dir_fd)
        if log is None or not isinstance(exc, OSError):
            raise
        log.warning("labs/%s not refreshed: %s", name, exc)


def _give_labs(spawner):
    """Copy the site's labs into a new home; never overwrite a student's copy, never follow
    a link the student made (the hub runs as root here), and give only what it made to the
    container's user, as it would own its volume. The lab index is olab's page, not student
    work: it is written again at every start, so it lists the labs of this release."""
    uid = settings["home_uid"] if settings["spawner"] == "docker" else None
    name = _file_name(spawner.user.name, "a home folder")
    homes = os.open(settings["homes"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        home = _dir_at(homes, name, uid)
        try:
            labs = _dir_at(home, "labs", uid)
            try:
                for lab in sorted(Path(settings["labs"]).glob("*.ipynb")):
                    content = lab.read_bytes()
                    if json.loads(content).get("metadata", {}).get("olab", {}).get("index"):
                        _write_over(labs, lab.name, content, uid, 0o644, spawner.log)
                        continue
                    try:
                        fd = os.open(lab.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=labs)
                    except FileExistsError:
                        continue  # the student's own copy (or a link they made): left as it is
                    with os.fdopen(fd, "wb") as out:
                        out.write(content)
                        if uid is not None:
                            os.fchown(out.fileno(), uid, uid)
            finally:
                os.close(labs)
        finally:
            os.close(home)
    finally:
        os.close(homes)


# A class starts at once: thirty students starting their servers at the same moment each get
# one, and a student who waits sees the hub's waiting page (/hub/spawn-pending/<name>), never a
# 429, 503 or 500. Measured by bench/bench_class.py (bench/README.md, section 7).
# - No start is refused for being one of many: JupyterHub answers 429 ("Too many users trying
#   to log in right now") beyond concurrent_spawn_limit pending starts (default 100) and beyond
#   active_server_limit running servers (default: none); 0 is no limit. The turns below pace
#   the machine instead.
c.JupyterHub.concurrent_spawn_limit = 0
c.JupyterHub.active_server_limit = 0
# - A start request is answered at once and the student goes to the waiting page; JupyterHub
#   held each up to 10 s by default (thirty such requests are what filled the proxy's queue).
c.JupyterHub.tornado_settings.update({"slow_spawn_timeout": 0})
# - The servers boot in turns, at most three per core at once. Thirty at once on 2 cores were
#   each ready only when nearly all were; in turns, half the class is ready in about half the
#   time and the last no later. A student waits for a turn before their start begins, so the
#   wait counts against no timeout; the turn is held until the server answers or its start
#   failed.
# - The hub waits at least 300 s for a started server to answer (the site's start_timeout,
#   120 s by default, is what one server alone needs): on a machine busy with other work,
#   thirty boots at once went past 120 s; in turns none came near it, and the margin stays.
c.Spawner.http_timeout = max(settings["start_timeout"], 300)
import asyncio  # noqa: E402

from jupyterhub.utils import maybe_future  # noqa: E402
from traitlets.utils.importstring import import_item  # noqa: E402

_boot_turns = asyncio.Semaphore(3 * (os.cpu_count() or 1))
_turn_keepers = set()  # (a task nothing refers to may be collected before it ends)


def _booting_in_turns(spawner_class):
    base = import_item(spawner_class) if isinstance(spawner_class, str) else spawner_class

    class BootingInTurns(base):
        async def run_pre_spawn_hook(self):
            await _boot_turns.acquire()
            try:
                await maybe_future(super().run_pre_spawn_hook())
            except BaseException:
                _boot_turns.release()
                raise
            keeper = asyncio.ensure_future(self._keep_turn_while_starting())
            _turn_keepers.add(keeper)
            keeper.add_done_callback(_turn_keepers.discard)

        async def _keep_turn_while_starting(self):
            try:
                while self.pending == "spawn":
                    await asyncio.sleep(0.25)
            finally:
                _boot_turns.release()

    return BootingInTurns


# A started server is seen as soon as it listens, not up to 5 s later: core/seen_at_once.py,
# its source carried by the settings (the gke hub runs the same code).
seen = _module_of("olab_seen_at_once", settings["seen_at_once_code"], "core/seen_at_once.py")

c.JupyterHub.spawner_class = seen.seen_at_once(_booting_in_turns(c.JupyterHub.spawner_class))
c.Spawner.pre_spawn_hook = _give_labs

if settings["single_user"]:
    # One account only (the shared-password demo mode, and the venv fallback, whose servers
    # would all run as the hub's own account: every student could read the others' files
    # and the hub's secrets). Said at every start, in the hub's log.
    c.Authenticator.allow_all = False
    c.Authenticator.allowed_users = {settings["single_user"]}
    c.Authenticator.admin_users = {settings["single_user"]}
