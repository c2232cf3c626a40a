"""OCI images without a daemon: buildah builds, podman runs (docker where chosen).

All podman/buildah calls share one storage (overlay) and one configuration
under ``$OLAB_HOME/containers``, written here, so that what buildah builds
podman runs, and podman's Docker-compatible API (for DockerSpawner) sees it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from core import bridges
from core.files import atomic_write
from core.logs import task_logger
from core.models import RegistryLogin
from core.retry import retry_options
from core.runner import CommandError, ToolMissing, pid_alive, read_pid_file, run, start_server, stop_pid_file

APT_HINT = "apt-get install buildah podman runc fuse-overlayfs"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def _have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


def docker_usable() -> bool:
    if not _have("docker"):
        return False
    try:
        return run(["docker", "info"], check=False, timeout=10).returncode == 0
    except (ToolMissing, CommandError):
        return False


def resolve_builder(setting: str) -> str:
    """The builder a site's ``image.builder`` means on this machine."""
    if setting == "auto":
        if _have("buildah", "podman"):
            return "buildah"
        if docker_usable():
            return "docker"
        return "venv"
    if setting in ("buildah", "podman") and not _have(setting, "podman"):
        missing = "buildah and podman" if setting == "buildah" else "podman"
        raise ToolMissing(f"image.builder {setting}: {missing} not installed: {APT_HINT} (or set image.builder: venv)")
    if setting == "docker" and not docker_usable():
        raise ToolMissing("image.builder docker: no Docker engine answers `docker info`; start one, or use buildah: " + APT_HINT)
    return setting


def _limits() -> list[str]:
    # A container may not raise a limit above this process's hard limit.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 1 << 20)
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    return [f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}"]


@dataclass
class Engine:
    """One container tool family: buildah+podman, podman alone, or docker."""

    builder: str
    store: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        return "docker" if self.builder == "docker" else "podman"

    @property
    def build_tool(self) -> str:
        return self.builder

    @property
    def socket(self) -> Path:
        """The Docker-compatible API socket (podman's is started by ensure_api_socket)."""
        return Path("/var/run/docker.sock") if self.runtime == "docker" else self.store / "podman.sock"

    def prepare(self, insecure_registries: list[str]) -> Engine:
        """Write the shared container configuration (idempotent)."""
        if self.builder == "docker":
            self.env = dict(os.environ)
            return self
        self.store.mkdir(parents=True, exist_ok=True)
        storage = self.store / "storage.conf"
        containers = self.store / "containers.conf"
        registries = self.store / "registries.conf"
        atomic_write(
            storage,
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.store / "storage"}"\nrunroot = "{self.store / "run"}"\n',
        )
        ulimits = ", ".join(f'"{u}"' for u in _limits())
        atomic_write(
            containers,
            "[containers]\n"
            f"default_ulimits = [{ulimits}]\n"
            'netns = "host"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'runtime = "runc"\n'
            'events_logger = "file"\n',
        )
        # The store is every site's of this olab home: a site's registry is added to those
        # already there, never put in their place (a gke site's build beside a local site's
        # push, or the hub's pulls, would otherwise lose the local registry's plain HTTP).
        with open(self.store / "registries.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            before = registries.read_text() if registries.exists() else ""
            after = registries_conf(before, insecure_registries)
            if after != before:
                atomic_write(registries, after)
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(storage),
            "CONTAINERS_CONF": str(containers),
            "CONTAINERS_REGISTRIES_CONF": str(registries),
        }
        return self

    def run(self, argv: list[str], **kwargs) -> str:
        return run(argv, env=self.env, **kwargs).output

    def image_id(self, ref: str) -> str | None:
        result = run([self.runtime, "image", "inspect", "--format", "{{.Id}}", ref], env=self.env, check=False)
        return result.output.strip().splitlines()[-1] if result.returncode == 0 and result.output.strip() else None

    def build(self, context: Path, ref: str, build_args: dict[str, str], on_line) -> None:
        argv = [self.build_tool, "build"]
        if self.builder == "buildah":
            argv += ["--isolation", "chroot", "--pull=never", "--layers"]
        elif self.builder == "podman":
            argv += ["--isolation", "chroot", "--pull=never"]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
        if ca and Path(ca).is_file() and self.builder != "docker":
            # The host's CA bundle (a proxy's CA, say) is mounted for the build only, never copied into a layer.
            argv += ["-v", f"{ca}:/tmp/olab-ca.crt:ro", "--build-arg", "PIP_CERT=/tmp/olab-ca.crt"]
        argv += ["-t", ref, "-f", str(context / "Containerfile"), str(context)]
        run(argv, env=self.env, on_line=on_line, timeout=3600)

    @contextmanager
    def _logged_in(self, ref: str, login: RegistryLogin | None) -> Iterator[list[str]]:
        """Options that log a push or pull in: an auth file, 0600 in a private folder that
        lives as long as the command (credentials never go on a command line)."""
        if login is None:
            yield []
            return
        host = ref.split("/")[0]
        auth = base64.b64encode(f"{login.username}:{login.password.get_secret_value()}".encode()).decode()
        with tempfile.TemporaryDirectory(prefix="olab-auth-") as folder:
            path = Path(folder) / ("config.json" if self.builder == "docker" else "auth.json")
            atomic_write(path, json.dumps({"auths": {host: {"auth": auth}}}), mode=0o600)
            yield ["--config", folder] if self.builder == "docker" else ["--authfile", str(path)]

    def push(self, ref: str, digest_file: Path, login: RegistryLogin | None = None) -> str:
        secrets = [login.password.get_secret_value()] if login else []
        with self._logged_in(ref, login) as auth:
            if self.builder == "docker":
                out = run(["docker", *auth, "push", ref], env=self.env, secrets=secrets).output
                for line in reversed(out.splitlines()):
                    if "digest: sha256:" in line:
                        return "sha256:" + line.split("digest: sha256:")[1].split()[0]
                raise CommandError(["docker", "push"], 0, "no digest in docker push output")
            tool = "buildah" if self.builder == "buildah" else "podman"
            run([tool, "push", *auth, "--digestfile", str(digest_file), ref, f"docker://{ref}"], env=self.env,
                secrets=secrets, timeout=1800)
        return digest_file.read_text().strip()

    def pull(self, ref: str, login: RegistryLogin | None = None) -> None:
        with self._logged_in(ref, login) as auth:
            if self.builder == "docker":
                run(["docker", *auth, "pull", "--quiet", ref], env=self.env, timeout=1800)
            else:
                run([self.runtime, "pull", *auth, "--quiet", ref], env=self.env, timeout=1800)

    def ensure_local(self, ref: str, login: RegistryLogin | None = None) -> str:
        """The image's id, pulling it first if this machine does not have it."""
        found = self.image_id(ref)
        if found is None:
            self.pull(ref, login)
            found = self.image_id(ref)
        return found

    def run_prefix(self, mounts: list[tuple[Path, str]], workdir: str = "/tmp") -> list[str]:
        """The start of a `run` command line for a throwaway container."""
        argv = [self.runtime, "run", "--rm", "--network", "none", "--workdir", workdir]
        if self.runtime == "podman":
            argv += ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
        for source, target in mounts:
            argv += ["-v", f"{source}:{target}:ro"]
        return argv

    def import_rootfs(self, rootfs: Path, ref: str) -> None:
        with tempfile.TemporaryDirectory(dir=rootfs.parent, prefix=".olab-rootfs-") as tmp:
            archive = Path(tmp) / "rootfs.tar"
            run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], timeout=1800)
            self.run([self.runtime, "import", str(archive), ref], timeout=1800)

    def ensure_api_socket(self) -> Path:
        """podman's Docker-compatible API on a unix socket, for DockerSpawner."""
        if self.runtime == "docker":
            return self.socket
        pid_file = self.store / "podman-service.pid"
        if pid_alive(read_pid_file(pid_file)) and self.socket.exists():
            return self.socket
        stop_pid_file(pid_file)
        self.socket.unlink(missing_ok=True)
        start_server(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            cwd=self.store,
            log_file=self.store / "podman-service.log",
            env=self.env,
            ready=self.socket.exists,
            timeout=30,
            what="podman's API service",
            pid_file=pid_file,
            poll=0.1,
        )
        return self.socket


    def bridge_gateway(self, network: str = "podman") -> str:
        """The host's address on ``network`` (a bridge: each container in its own network
        namespace, none on the host's loopback), where a service on the host is reachable
        from the containers and from nowhere else."""
        if self.runtime == "docker":
            found = json.loads(self.run([self.runtime, "network", "inspect", network]))
            return found[0]["IPAM"]["Config"][0]["Gateway"]
        found = json.loads(self.run([self.runtime, "network", "inspect", network]))
        gateways = [s.get("gateway") for s in found[0].get("subnets", []) if s.get("gateway")]
        if not gateways:
            raise RuntimeError(f"network {network} has no gateway address (is it a bridge?)")
        return gateways[0]

    def ensure_bridge(self, network: str, image: str) -> str:
        """The bridge's gateway, with its interface up on the host: the bridge is made when
        a first container joins it, and a hub must bind the gateway address before any
        student's container starts; a throwaway container of ``image`` makes it."""
        import socket

        gateway = self.bridge_gateway(network)
        with socket.socket() as probe:
            try:
                probe.bind((gateway, 0))
                return gateway
            except OSError:
                pass
        self.run([self.runtime, "run", "--rm", "--network", network, "--entrypoint", "true", image], timeout=120)
        return gateway

    def remove_leftovers(self, container_prefix: str, site: str) -> list[str]:
        """Students' containers (named ``<prefix>-...``) and their own bridges (labelled with
        the site and this store: the networks are the machine's, and another olab home may have
        a site of this name) that outlived their hub (a hub killed outright cannot stop them),
        and their entries in the machine's ledger of bridges; returns what it removed. A
        stopped hub has stopped its servers already: usually nothing."""
        listed = self.run([self.runtime, "ps", "-a", "--format", "{{.Names}}"])
        containers = [n for n in listed.split() if n.startswith(f"{container_prefix}-")]
        if containers:
            self.run([self.runtime, "rm", "-f", "-t", "5", *containers], timeout=120)
        networks = self.run([
            self.runtime, "network", "ls", "--format", "{{.Name}}",
            "--filter", f"label={bridges.SITE_LABEL}={site}", "--filter", f"label={bridges.STORE_LABEL}={bridges.store_tag(self.store)}",
        ]).split()
        if networks:
            self.run([self.runtime, "network", "rm", "-f", *networks], timeout=120)
        with bridges.held() as ledger:
            ledger.free_site(str(self.store), site)
        return containers + networks


def registries_conf(current: str, insecure: list[str]) -> str:
    """containers-registries.conf(5) naming as plain HTTP the registries ``current`` names
    and those of ``insecure`` (loopback ones, see :func:`insecure_registries`)."""
    hosts = set(re.findall(r'^location = "([^"]+)"$', current, re.MULTILINE)) | set(insecure)
    return "unqualified-search-registries = []\n" + "".join(
        f'[[registry]]\nlocation = "{host}"\ninsecure = true\n' for host in sorted(hosts))


def insecure_registries(site) -> list[str]:
    """The site's registry, when it is on loopback (olab's own, or a test's): plain HTTP."""
    address = site.config.gke.registry if site.config.gke is not None else site.config.image.registry
    host = address.split("/")[0]
    return [host] if host.split(":")[0] in ("127.0.0.1", "localhost") else []


def stop_api_socket(store: Path) -> bool:
    return stop_pid_file(store / "podman-service.pid")


def engine_for(builder: str, store: Path, registries: list[str]) -> Engine:
    return Engine(builder=builder, store=store).prepare(registries)


def debootstrap_ref(suite: str) -> str:
    return f"localhost/olab-base:{suite}"


def ensure_debootstrap_base(engine: Engine, suite: str, work: Path) -> str:
    """A minimal Debian image with Python, made here when no registry can be pulled from."""
    ref = debootstrap_ref(suite)
    if engine.image_id(ref):
        return ref
    if not shutil.which("debootstrap"):
        raise ToolMissing(f"image.base_image debootstrap:{suite}: debootstrap is not installed: apt-get install debootstrap")
    logger = task_logger()
    rootfs = work / f"rootfs-{suite}"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    logger.info("making Debian %s base image with debootstrap (about a minute)", suite)
    run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", suite, str(rootfs), DEBIAN_MIRROR],
        on_line=logger.info,
        timeout=1800,
    )
    try:
        engine.import_rootfs(rootfs, ref)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return ref


def containerfile_base(context: Path) -> str | None:
    """The default of ``ARG BASE_IMAGE=...`` in the Containerfile."""
    for line in (context / "Containerfile").read_text().splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].upper() == "ARG" and parts[1].startswith("BASE_IMAGE="):
            return parts[1].split("=", 1)[1].strip() or None
    return None


@task(name="build-oci-image", cache_policy=NO_CACHE, **retry_options(retries=1))
def build_and_push(
    engine: Engine, context: Path, repository: str, tag: str, base_image: str, login: RegistryLogin | None = None
) -> tuple[str, float]:
    """Build ``repository:tag`` from the context and push it; returns (digest, seconds)."""
    logger = task_logger()
    started = time.monotonic()
    ref = f"{repository}:{tag}"
    logger.info("building %s with %s on %s", ref, engine.builder, base_image)
    engine.build(context, ref, {"BASE_IMAGE": base_image}, on_line=logger.info)
    with tempfile.TemporaryDirectory() as tmp:
        digest = engine.push(ref, Path(tmp) / "digest", login)
    logger.info("pushed %s@%s", repository, digest)
    return digest, time.monotonic() - started
