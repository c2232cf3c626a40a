"""An OCI registry, any registry: asked over its HTTP API (v2) whether a tag exists.

Logs in where the registry asks to (a 401 with a Basic or a Bearer challenge, as
Artifact Registry and an htpasswd registry do) with the site's credentials.
"""

from __future__ import annotations

import base64
import re

import httpx

from core.models import RegistryLogin

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


class RegistryAuthError(RuntimeError):
    """The registry refused olab's credentials, or wanted some and none were given."""


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class Registry:
    def __init__(self, address: str, *, insecure: bool = True, login: RegistryLogin | None = None):
        self.address = address
        host = address.split("/")[0]
        self.prefix = address[len(host):].strip("/")
        scheme = "http" if insecure else "https"
        self.base = f"{scheme}://{host}/v2"
        self.login = login
        self._auth: dict[str, str] = {}

    def repository(self, name: str) -> str:
        return f"{self.address}/{name}"

    def _authorize(self, response: httpx.Response) -> dict[str, str]:
        """Headers that answer a 401's challenge with the site's credentials."""
        if self.login is None:
            raise RegistryAuthError(f"registry {self.address} wants credentials and the site gives none")
        user, password = self.login.username, self.login.password.get_secret_value()
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "bearer" and params.get("realm"):
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            token = httpx.get(params["realm"], params=query, auth=(user, password), timeout=15)
            if token.status_code in (401, 403):
                raise RegistryAuthError(f"registry {self.address} refused the site's credentials ({token.status_code})")
            token.raise_for_status()
            body = token.json()
            return {"Authorization": f"Bearer {body.get('token') or body.get('access_token')}"}
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}

    def _request(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        response = httpx.request(method, url, headers={**headers, **self._auth}, timeout=15)
        if response.status_code == 401 and not self._auth:
            self._auth = self._authorize(response)
            response = httpx.request(method, url, headers={**headers, **self._auth}, timeout=15)
        if response.status_code in (401, 403):
            raise RegistryAuthError(f"registry {self.address} refused the site's credentials ({response.status_code})")
        return response

    def manifest_digest(self, name: str, tag: str) -> str | None:
        """The digest of ``name:tag`` if the registry has it, else None."""
        path = f"{self.prefix}/{name}" if self.prefix else name
        response = self._request("HEAD", f"{self.base}/{path}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES})
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.headers.get("Docker-Content-Digest")

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.base}/", timeout=2).status_code in (200, 401)
        except httpx.TransportError:
            return False
