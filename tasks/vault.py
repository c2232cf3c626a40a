"""Vault (or OpenBao) for the gke target: the site's hub secrets in a KV v2 engine,
read through ``hvac``, written once by ``olab secrets init``.

* Where: ``<mount>/<path>`` of the site file's ``vault`` section (KV v2, so the API
  path is ``<mount>/data/<path>``); one secret holds every key of the site
  (:class:`core.secrets.HubSecrets`' fields, plus LTI keys, registry credentials...).
* Who: ``token`` (env ``VAULT_TOKEN`` or a 0600 ``token_file``), ``approle``
  (``role_id`` from the site file, ``role_id_file`` or env ``VAULT_ROLE_ID``; the
  ``secret_id`` from a 0600 ``secret_id_file`` or env ``VAULT_SECRET_ID``),
  ``kubernetes`` or ``jwt`` (a ``role`` and a ``jwt_file``, by default the pod's
  service-account token). Credentials never come from the site file itself.
* Writing once: KV v2's check-and-set, ``cas=0``, so of two concurrent inits one
  writes and the other is refused by Vault itself; ``force`` replaces the version it
  saw (``cas=<current version>``), never blindly.
* Errors: :class:`VaultError`, one line naming what failed and what to do (an
  unreachable or sealed Vault is :class:`VaultUnavailable`, which Prefect retries).
* Every secret this module holds (credentials, the token a login gives, every value
  read or written) is registered with :func:`core.runner.register_secrets`, so the
  command runner masks it; nothing here logs a value, only key names.
* Helm gets secrets only through :func:`helm_secret_values`: a values file, mode 0600
  from its first byte, in a private folder removed when the block ends.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import hvac
import hvac.exceptions
import requests
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from core.config import VaultSettings
from core.files import atomic_write
from core.logs import task_logger
from core.retry import TransientError
from core.runner import mask, register_secrets
from core.secrets import HubSecrets

# Mount and secret paths: segments of safe characters, no leading or trailing '/', no '..'.
KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ENV_TOKEN, ENV_ROLE_ID, ENV_SECRET_ID = "VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID"
REQUIRED_KEYS = tuple(HubSecrets.model_fields)


class VaultError(RuntimeError):
    """Vault refused or failed; the message is one line saying what and where."""


class VaultUnavailable(VaultError, TransientError):
    """Vault cannot be reached, or is sealed: trying again later may pass."""


class VaultSecretExists(VaultError):
    """``init`` found secrets already at the site's path (or lost a race to another init)."""


VaultAccess = VaultSettings  # the site file's vault section is the access


def vault_access(settings: Any) -> VaultAccess:
    """The access of a site's ``vault`` section (``core.config.VaultSettings``): every field
    it has is carried over by name. Problems are one line each, naming fields, not values."""
    try:
        return VaultAccess.model_validate(settings.model_dump(exclude_none=True))
    except ValidationError as exc:
        problems = [f"vault.{'.'.join(str(p) for p in e['loc']) or '(section)'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
        raise VaultError("; ".join(problems)) from None


@dataclass(frozen=True)
class LoginInfo:
    """What a login gave (never the token itself)."""

    method: str
    policies: tuple[str, ...]
    ttl_seconds: int
    renewable: bool


@dataclass(frozen=True)
class InitResult:
    """What ``init`` wrote: key names and the KV version, no values."""

    mount: str
    path: str
    version: int
    keys: tuple[str, ...]
    replaced: bool


# ---- credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Credential:
    value: str
    source: str  # "env VAULT_SECRET_ID", "file /run/olab/secret-id": said in errors, never the value


def _read_file(path: Path, what: str, *, private: bool) -> _Credential:
    path = path.expanduser()
    try:
        info = path.stat()
        if private and stat.S_IMODE(info.st_mode) & 0o077:
            raise VaultError(
                f"{what} file {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may read it; run chmod 600 on it"
            )
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise VaultError(f"{what} file {path}: no such file") from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise VaultError(f"{what} file {path}: cannot be read ({type(exc).__name__})") from None
    if not value:
        raise VaultError(f"{what} file {path} is empty")
    register_secrets([value])
    return _Credential(value, f"file {path}")


def _from_file_or_env(
    path: Path | None, env_name: str, environ: Mapping[str, str], what: str, setting: str, *, private: bool = True
) -> _Credential:
    if path is not None:
        return _read_file(path, what, private=private)
    value = (environ.get(env_name) or "").strip()
    if not value:
        raise VaultError(f"no {what}: set {env_name} in the environment or vault.{setting} in the site file (a 0600 file)")
    register_secrets([value])
    return _Credential(value, f"env {env_name}")


# ---- errors -----------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return mask(line if len(line) <= limit else line[: limit - 3] + "...")


def _vault_errors(exc: hvac.exceptions.VaultError) -> str:
    # Vault's own words (its "errors" list), never the response body: a body may hold data.
    errors = exc.errors if isinstance(exc.errors, list) else [exc.errors] if exc.errors else []
    words = "; ".join(_one_line(e).removeprefix("1 error occurred: * ") for e in errors if e)
    return words or type(exc).__name__


def _transport_error(address: str, exc: requests.RequestException, timeout: float) -> VaultError:
    if isinstance(exc, requests.exceptions.SSLError):
        return VaultError(
            f"vault {address}: TLS verification failed ({_reason(exc)}); set vault.ca_bundle to the CA that signed its certificate"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return VaultUnavailable(f"vault {address} is unreachable: no answer within {timeout:g}s")
    return VaultUnavailable(
        f"vault {address} is unreachable ({_reason(exc)}); check vault.address and that this machine can reach it"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc)
    found = re.findall(r"\[(?:Errno|SSL: [A-Z_]+)[^\]]*\]\s*([^'\"()]+)", text)
    if found:
        return _one_line(found[-1].strip().rstrip(".,"))
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "host name not found"
    return type(exc).__name__


def _down(address: str, exc: hvac.exceptions.VaultError) -> VaultUnavailable:
    words = _vault_errors(exc)
    if "sealed" in words.lower():
        return VaultUnavailable(f"vault {address} is sealed: unseal it (bao operator unseal, or vault operator unseal) and try again")
    return VaultUnavailable(f"vault {address} is unavailable: {words}")


# ---- the client -------------------------------------------------------------------------


class VaultClient:
    """One Vault, one site's secrets. Use as a context manager: it logs in on entry and
    revokes the token a login made (AppRole, Kubernetes, JWT) on exit."""

    def __init__(self, access: VaultAccess, *, environ: Mapping[str, str] | None = None):
        self.access = access
        self._environ = os.environ if environ is None else environ
        verify: bool | str = True
        if access.ca_bundle:
            ca = access.ca_bundle.expanduser()
            if not ca.is_file():
                raise VaultError(f"vault.ca_bundle {ca}: no such file")
            verify = str(ca)
        # token="" explicitly: hvac would otherwise take VAULT_TOKEN or ~/.vault-token on its own.
        self._client = hvac.Client(
            url=access.address.rstrip("/"), token="", verify=verify, timeout=access.timeout_seconds,
            namespace=access.namespace,
        )
        self._revoke_on_close = False
        self.login_info: LoginInfo | None = None

    def __enter__(self) -> VaultClient:
        try:
            self.login()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing

    def _call(self, fn, *args, **kwargs):
        """An hvac call whose transport errors, sealed Vault and 5xx become one line;
        4xx errors (hvac's own) pass through for the caller to explain."""
        address = self.access.address
        try:
            return fn(*args, **kwargs)
        except requests.RequestException as exc:
            raise _transport_error(address, exc, self.access.timeout_seconds) from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.VaultNotInitialized) as exc:
            raise _down(address, exc) from None
        except (hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway, hvac.exceptions.RateLimitExceeded) as exc:
            raise VaultUnavailable(f"vault {address}: {_vault_errors(exc)}") from None

    def _fail(self, doing: str, exc: hvac.exceptions.VaultError) -> VaultError:
        return VaultError(f"vault {self.access.address}: {doing} failed: {_vault_errors(exc)}")

    def _denied(self, action: str, api_path: str) -> VaultError:
        policies = ", ".join(self.login_info.policies) if self.login_info else "unknown"
        return VaultError(
            f"vault {self.access.address}: permission denied to {action} {self.access.where}: "
            f"the token's policies ({policies}) grant no {action} on {api_path}"
        )

    # -- login

    def login(self) -> LoginInfo:
        access, address = self.access, self.access.address
        log = task_logger()
        method = access.auth
        if method == "token":
            token = _from_file_or_env(access.token_file, ENV_TOKEN, self._environ, "Vault token", "token_file")
            self._client.token = token.value
            try:
                data = self._call(self._client.auth.token.lookup_self)["data"]
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
                raise VaultError(f"vault {address}: the token from {token.source} was refused (invalid, expired or revoked)") from None
            except hvac.exceptions.VaultError as exc:
                raise self._fail(f"looking up the token from {token.source}", exc) from None
            info = LoginInfo("token", tuple(data.get("policies") or ()), int(data.get("ttl") or 0), bool(data.get("renewable")))
        else:
            auth = self._login(method)
            register_secrets([auth["client_token"]])
            self._client.token = auth["client_token"]
            self._revoke_on_close = True
            info = LoginInfo(method, tuple(auth.get("policies") or ()), int(auth.get("lease_duration") or 0),
                             bool(auth.get("renewable")))
        self.login_info = info
        log.info("vault %s: logged in by %s (policies: %s)", address, method, ", ".join(info.policies) or "none")
        return info

    def _login(self, method: str) -> dict:
        access, address, mount = self.access, self.access.address, self.access.login_mount
        if method == "approle":
            if access.role_id:
                role_id = _Credential(access.role_id, "the site file")
            else:
                role_id = _from_file_or_env(access.role_id_file, ENV_ROLE_ID, self._environ, "AppRole role_id",
                                            "role_id_file", private=False)
            secret_id = _from_file_or_env(access.secret_id_file, ENV_SECRET_ID, self._environ, "AppRole secret_id", "secret_id_file")
            call = lambda: self._client.auth.approle.login(role_id.value, secret_id.value, mount_point=mount)  # noqa: E731
            who = f"AppRole login at auth/{mount} (role_id from {role_id.source}, secret_id from {secret_id.source})"
            bad = "invalid role_id or secret_id (a secret_id may have expired or been used up): issue a new secret_id"
        else:
            jwt = _read_file(access.jwt_file, f"{method} JWT", private=False)
            if method == "kubernetes":
                call = lambda: self._client.auth.kubernetes.login(access.role, jwt.value, mount_point=mount)  # noqa: E731
                bad = f"the service-account token in {jwt.source} is not bound to role '{access.role}', or has expired"
            else:
                call = lambda: self._client.auth.jwt.jwt_login(access.role, jwt.value, path=mount)  # noqa: E731
                bad = f"the JWT in {jwt.source} does not match role '{access.role}' (issuer, audience, signature or expiry)"
            who = f"{method} login as role '{access.role}' at auth/{mount}"
        try:
            return self._call(call)["auth"]
        except hvac.exceptions.InvalidPath as exc:
            if "no handler for route" in _vault_errors(exc) or not exc.errors:
                raise VaultError(f"vault {address}: {who} failed: no {method} auth method is enabled at auth/{mount} (set vault.auth_mount)") from None
            raise VaultError(f"vault {address}: {who} refused: {bad}") from None
        except hvac.exceptions.InvalidRequest as exc:
            raise VaultError(f"vault {address}: {who} refused: {bad} (vault says: {_vault_errors(exc)})") from None
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
            # Without a token, Vault answers 403 both to a login it refuses and to a path no
            # auth method serves; AppRole refuses bad credentials with 400, so its 403 is the path.
            if method == "approle":
                raise VaultError(f"vault {address}: {who} failed: no approle auth method answers at auth/{mount}; "
                                 f"check vault.auth_mount (vault says: {_vault_errors(exc)})") from None
            raise VaultError(f"vault {address}: {who} refused: {bad}, or no {method} auth method is enabled at "
                             f"auth/{mount} (vault says: {_vault_errors(exc)})") from None
        except hvac.exceptions.VaultError as exc:
            raise self._fail(who, exc) from None

    def close(self) -> None:
        """Revoke the token a login made (not one given by env or file), then drop the session."""
        if self._revoke_on_close:
            with suppress(Exception):
                self._client.auth.token.revoke_self()
            self._revoke_on_close = False
        self._client.token = ""
        with suppress(Exception):
            self._client.adapter.close()

    def _need_login(self) -> None:
        if self.login_info is None:
            raise VaultError(f"vault {self.access.address}: not logged in (use VaultClient as a context manager, or call login())")

    # -- reading

    def read_secrets(self) -> dict[str, SecretStr]:
        """Every key of the site's secret, each registered for masking."""
        self._need_login()
        access, kv = self.access, self._client.secrets.kv.v2
        try:
            response = self._call(kv.read_secret_version, access.path, mount_point=access.mount, raise_on_deleted_version=True)
        except hvac.exceptions.Forbidden:
            raise self._denied("read", access.api_path) from None
        except hvac.exceptions.InvalidPath as exc:
            raise self._missing(exc) from None
        except hvac.exceptions.VaultError as exc:
            raise self._fail(f"reading {access.where}", exc) from None
        data = response.get("data") or {}
        values = data.get("data") or {}
        if not isinstance(values, dict):
            raise VaultError(f"vault {access.address}: {access.where} is not a KV v2 secret of keys")
        wrong = sorted(k for k, v in values.items() if not isinstance(v, str))
        if wrong:
            raise VaultError(f"vault {access.address}: {access.where}: keys {', '.join(wrong)} are not strings")
        register_secrets(values.values())
        version = (data.get("metadata") or {}).get("version")
        task_logger().info("vault %s: read %d keys (%s) from %s, version %s", access.address, len(values),
                           ", ".join(sorted(values)), access.where, version)
        return {k: SecretStr(v) for k, v in values.items()}

    def read_hub_secrets(self) -> HubSecrets:
        """The site's hub secrets: HubSecrets' fields, and any extra keys (LTI keys, registry
        credentials) as SecretStr extras."""
        values = self.read_secrets()
        if missing := [k for k in REQUIRED_KEYS if k not in values]:
            raise VaultError(
                f"vault {self.access.address}: {self.access.where} lacks {', '.join(missing)} "
                f"(it holds {', '.join(sorted(values)) or 'nothing'}); write them with `olab secrets init` (force to replace)"
            )
        # Built from keys checked above: pydantic's errors would quote the values.
        return HubSecrets(**values)

    def _missing(self, exc: hvac.exceptions.InvalidPath) -> VaultError:
        access, address = self.access, self.access.address
        words = _vault_errors(exc) if exc.errors else ""
        if "no handler for route" in words:
            return VaultError(
                f"vault {address}: no secrets engine is mounted at '{access.mount}/' ({access.where}); "
                f"enable KV v2 there (bao secrets enable -path={access.mount} kv-v2) or fix vault.mount"
            )
        metadata = ((exc.json or {}).get("data") or {}).get("metadata") if isinstance(exc.json, dict) else None
        if metadata and (metadata.get("deletion_time") or metadata.get("destroyed")):
            return VaultError(
                f"vault {address}: the latest version ({metadata.get('version')}) at {access.where} was deleted; "
                "undelete it (bao kv undelete) or write new secrets with `olab secrets init` (force)"
            )
        if self._kv_version() == "1":
            return VaultError(f"vault {address}: mount '{access.mount}' is a KV version 1 engine; olab reads KV v2 ({access.where})")
        return VaultError(
            f"vault {address}: no secret at {access.where} (KV v2 {access.api_path}); "
            "write this site's secrets once with `olab secrets init`"
        )

    def _kv_version(self) -> str | None:
        """The KV version of the mount, where the token may see it (None if not)."""
        with suppress(Exception):
            mount = self._client.adapter.get(f"/v1/sys/internal/ui/mounts/{self.access.mount}/{self.access.path}")
            data = mount.get("data") or {}
            if data.get("type") == "kv":
                return str((data.get("options") or {}).get("version") or "1")
        return None

    # -- writing

    def _current_version(self) -> int:
        access, kv = self.access, self._client.secrets.kv.v2
        try:
            metadata = self._call(kv.read_secret_metadata, access.path, mount_point=access.mount)
        except hvac.exceptions.InvalidPath:
            return 0
        except hvac.exceptions.Forbidden:
            raise self._denied("read", f"{access.mount}/metadata/{access.path} (force replaces the version it reads there)") from None
        except hvac.exceptions.VaultError as exc:
            raise self._fail(f"reading the metadata of {access.where}", exc) from None
        return int((metadata.get("data") or {}).get("current_version") or 0)

    def write_secrets(self, values: Mapping[str, str | SecretStr], *, cas: int) -> int:
        """Write every key as one new version, only if the current version is ``cas``
        (0: only if there is none). Returns the new version."""
        self._need_login()
        access, kv = self.access, self._client.secrets.kv.v2
        plain = {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in values.items()}
        if bad := [k for k in plain if not KEY.match(k)]:
            raise VaultError(f"secret keys {', '.join(sorted(bad))}: use lower-case letters, digits and '_'")
        if empty := [k for k, v in plain.items() if not isinstance(v, str) or not v]:
            raise VaultError(f"secret keys {', '.join(sorted(empty))}: values must be non-empty strings")
        register_secrets(plain.values())
        try:
            response = self._call(kv.create_or_update_secret, access.path, secret=plain, cas=cas, mount_point=access.mount)
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in _vault_errors(exc):
                version = None
                if cas == 0:
                    with suppress(VaultError):
                        version = self._current_version()
                raise VaultSecretExists(
                    f"vault {access.address}: {access.where} already holds secrets"
                    + (f" (version {version})" if version else "" if cas == 0 else f" newer than version {cas}")
                    + "; `olab secrets init` writes them once: pass force to replace them"
                ) from None
            raise self._fail(f"writing {access.where}", exc) from None
        except hvac.exceptions.Forbidden:
            raise self._denied("create" if cas == 0 else "update", access.api_path) from None
        except hvac.exceptions.InvalidPath as exc:
            raise self._missing(exc) from None
        except hvac.exceptions.VaultError as exc:
            raise self._fail(f"writing {access.where}", exc) from None
        return int((response.get("data") or {}).get("version") or 0)

    def init_hub_secrets(
        self, extra: Mapping[str, str | SecretStr] | None = None, *, force: bool = False, secrets: HubSecrets | None = None
    ) -> InitResult:
        """Write a new site's secrets once: ``secrets`` (default: freshly generated) and
        ``extra`` keys (LTI keys, registry credentials). Refused where secrets exist,
        unless ``force``, which replaces exactly the version it read."""
        self._need_login()
        extra = dict(extra or {})
        if clash := sorted(set(extra) & set(REQUIRED_KEYS)):
            raise VaultError(f"extra keys {', '.join(clash)} are hub secrets: pass them in secrets=, not extra")
        hub = secrets or HubSecrets.generate()
        values: dict[str, str | SecretStr] = {k: v for k, v in hub.__dict__.items()}
        values.update({k: v for k, v in (hub.__pydantic_extra__ or {}).items()})
        values.update(extra)
        cas = self._current_version() if force else 0
        version = self.write_secrets(values, cas=cas)
        keys = tuple(sorted(values))
        task_logger().info("vault %s: wrote %d keys (%s) to %s, version %d%s", self.access.address, len(keys),
                           ", ".join(keys), self.access.where, version, " (replaced)" if cas else "")
        return InitResult(self.access.mount, self.access.path, version, keys, replaced=cas > 0)


# ---- one call each ----------------------------------------------------------------------


def read_hub_secrets(access: VaultAccess, *, environ: Mapping[str, str] | None = None) -> HubSecrets:
    """Log in, read the site's hub secrets, revoke the login's token."""
    with VaultClient(access, environ=environ) as vault:
        return vault.read_hub_secrets()


def init_hub_secrets(
    access: VaultAccess,
    extra: Mapping[str, str | SecretStr] | None = None,
    *,
    force: bool = False,
    secrets: HubSecrets | None = None,
    environ: Mapping[str, str] | None = None,
) -> InitResult:
    """``olab secrets init``: log in, write the site's secrets once, revoke the login's token."""
    with VaultClient(access, environ=environ) as vault:
        return vault.init_hub_secrets(extra, force=force, secrets=secrets)


# ---- helm -------------------------------------------------------------------------------


def _plain(value: Any, found: list[str]) -> Any:
    if isinstance(value, SecretStr):
        found.append(value.get_secret_value())
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {str(k): _plain(v, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, found) for v in value]
    return value


def _private_tmp() -> Path | None:
    # Memory, not disk, where the machine has it.
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


@contextmanager
def helm_secret_values(values: Mapping[str, Any], *, folder: Path | None = None, name: str = "secrets.yaml") -> Iterator[Path]:
    """A Helm values file (``helm ... -f <path>``) of ``values``: created mode 0600 in a fresh
    0700 folder (in ``folder``, else /dev/shm, else the temp folder), removed with its folder
    when the block ends, also on error. Wrap secrets in SecretStr: they are registered for
    masking and written in clear only into this file."""
    found: list[str] = []
    document = _plain(values, found)
    register_secrets(found)
    private = Path(tempfile.mkdtemp(prefix="olab-helm-", dir=folder or _private_tmp()))
    try:
        path = private / name
        atomic_write(path, yaml.safe_dump(document, sort_keys=True), mode=0o600)
        yield path
    finally:
        shutil.rmtree(private, ignore_errors=True)
