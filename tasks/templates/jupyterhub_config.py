# JupyterHub configuration for an olab local site.
# Written by `olab deploy`; edit the site file in sites/, not this file.
# Settings come from olab-hub.json beside it; secrets from the site's 0600
# secret store, so neither this file nor the hub's command line holds one.
import json
import os
import shutil
from pathlib import Path

c = get_config()  # noqa: F821

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

c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.admin_password = secrets["admin_password"]
c.SharedPasswordAuthenticator.user_password = secrets["user_password"]
c.Authenticator.admin_users = set(settings["admins"])
c.Authenticator.allow_all = True

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
    from dockerspawner import DockerSpawner
    from jupyterhub.utils import random_port

    class HostNetworkSpawner(DockerSpawner):
        """Each user's container on the host network, on its own loopback port."""

        async def start(self):
            self.port = random_port()
            return await super().start()

        async def get_ip_and_port(self):
            return "127.0.0.1", self.port

    c.JupyterHub.spawner_class = HostNetworkSpawner
    c.DockerSpawner.client_kwargs = {"base_url": settings["docker_url"]}
    c.DockerSpawner.image = settings["image"]
    # deploy-hub pulls the pinned digest first; a spawn never reaches a registry.
    c.DockerSpawner.pull_policy = "never"
    c.DockerSpawner.network_name = "host"
    c.DockerSpawner.use_internal_ip = True
    c.DockerSpawner.remove = True
    c.DockerSpawner.prefix = settings["container_prefix"]
    c.DockerSpawner.volumes = {settings["homes"] + "/{raw_username}": "/home/jovyan"}
    c.DockerSpawner.hub_connect_url = "http://127.0.0.1:%d" % settings["hub_api_port"]
    c.Spawner.ip = "127.0.0.1"
    c.Spawner.cmd = ["jupyterhub-singleuser"]
    c.Spawner.args = []
    c.Spawner.environment = {"OLAB_SITE": settings["site"]}
    if settings["mem_limit"]:
        c.DockerSpawner.mem_limit = settings["mem_limit"]
    if settings["cpu_limit"]:
        c.DockerSpawner.cpu_limit = settings["cpu_limit"]


def _home(spawner):
    if settings["spawner"] == "docker":
        return Path(settings["homes"]) / spawner.user.name
    return Path(spawner.home_dir)


def _give_labs(spawner):
    """Copy the site's labs into a new home; never overwrite a student's copy."""
    home = _home(spawner)
    target = home / "labs"
    target.mkdir(parents=True, exist_ok=True)
    for lab in sorted(Path(settings["labs"]).glob("*.ipynb")):
        if not (target / lab.name).exists():
            shutil.copy2(lab, target / lab.name)
    if settings["spawner"] == "docker":
        # The container's user owns its home, as it would its volume.
        uid = settings["container_uid"]
        for folder, dirs, files in os.walk(home):
            os.chown(folder, uid, uid)
            for name in dirs + files:
                os.lchown(os.path.join(folder, name), uid, uid)


c.Spawner.pre_spawn_hook = _give_labs
