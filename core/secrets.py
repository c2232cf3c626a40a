"""The site's secret store: one JSON file, mode 0600, in a 0700 folder.

Secrets are generated on first use and never leave this file except through
the environment or config of the process that needs them.
"""

from __future__ import annotations

import json
import os
import re
import secrets as _random
import stat
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

from core.files import atomic_write
from core.runner import register_secrets


# The client id of the site's LTI 1.3 registration on its course platform (the same key in
# Vault for a gke site): `olab secrets init --lti-client-id ID` stores it.
LTI_CLIENT_ID = "lti_client_id"
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,255}$")


def lti_client_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a client id (never quoting it), or None."""
    if not _CLIENT_ID.match(value):
        return "a client id is 1 to 255 visible ASCII characters, without spaces (as the course platform shows it)"
    return None


class HubSecrets(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    cookie_secret: SecretStr
    proxy_auth_token: SecretStr
    admin_password: SecretStr
    user_password: SecretStr
    api_token: SecretStr

    @classmethod
    def generate(cls) -> HubSecrets:
        return cls(
            cookie_secret=_random.token_hex(32),
            proxy_auth_token=_random.token_hex(32),
            # SharedPasswordAuthenticator wants admin passwords of 32+ characters.
            admin_password=_random.token_urlsafe(32),
            user_password=_random.token_urlsafe(12),
            api_token=_random.token_hex(32),
        )

    def values(self) -> list[str]:
        """Every secret value, the extra keys (LTI, registry) included."""
        fields = [*self.__dict__.values(), *(self.__pydantic_extra__ or {}).values()]
        return [_plain(v) for v in fields if v is not None]

    def extras(self) -> dict[str, str]:
        """The extra keys beside the hub's own secrets (LTI, ...), in clear."""
        return {k: _plain(v) for k, v in (self.__pydantic_extra__ or {}).items() if v is not None}

    def extra_value(self, key: str) -> str | None:
        return self.extras().get(key) or None


def _plain(value) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


class SecretStore:
    def __init__(self, path: Path):
        self.path = path

    def load_or_create(self) -> HubSecrets:
        if self.path.exists():
            return self.load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        fresh = HubSecrets.generate()
        plain = {k: v.get_secret_value() for k, v in fresh.__dict__.items()}
        atomic_write(self.path, json.dumps(plain, indent=2), mode=0o600)
        register_secrets(fresh.values())
        return fresh

    def get(self, key: str) -> str | None:
        """The store's value for an extra ``key`` (such as LTI_CLIENT_ID); None when the store
        or the key is missing."""
        if not self.path.exists():
            return None
        return self.load().extra_value(key)

    def put(self, key: str, value: str) -> str | None:
        """Keep ``value`` under the extra ``key`` (the store made first if missing, 0600);
        returns the value it replaced, if any. The hub's own secrets are not replaced here."""
        if key in HubSecrets.model_fields:
            raise ValueError(f"{key} is one of the hub's own secrets; it is made once, not set")
        before = self.get(key)  # reads the store (refusing one that is not 0600), or None
        if before is None:
            self.load_or_create()
        plain = json.loads(self.path.read_text())
        plain[key] = value
        atomic_write(self.path, json.dumps(plain, indent=2), mode=0o600)
        register_secrets([value])
        return before

    def load(self) -> HubSecrets:
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(f"{self.path}: secret store has mode {mode:04o}; run chmod 600 on it")
        secrets = HubSecrets.model_validate_json(self.path.read_text())
        register_secrets(secrets.values())
        return secrets
