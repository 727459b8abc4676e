#!/usr/bin/env bash
# Build the BrainLine image (gateway and workers use the same image) with podman,
# or buildah when podman is missing.
#
#   deploy/build-image.sh                 # FROM python:3.11-slim-bookworm (needs a registry)
#   deploy/build-image.sh --local-base    # no registry: a Debian bookworm + python3.11 base
#                                         # made with debootstrap from the Debian mirror
# Environment: TAG (default localhost/brainline:0.1.0), DEBIAN_MIRROR, WHEELS (a
# folder of wheels to prefer, e.g. the CPU torch wheel; default /opt/wheels if present),
# BUILD_EXTRA_ARGS (more build flags; this development VM needs
# "--runtime runc --ulimit nofile=10000:10000 --ulimit nproc=5000:5000").
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-localhost/brainline:0.1.0}
LOCAL_BASE=localhost/bookworm-python:3.11
if command -v podman >/dev/null 2>&1; then
  BUILD=(podman build --format docker --network host)
  image_exists() { podman image exists "$1"; }
  import_rootfs() { podman import - "$1"; }
else
  BUILD=(buildah bud --format docker --network host)
  image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
  import_rootfs() { local c; c=$(buildah from scratch); buildah add "$c" - /; buildah commit "$c" "$1"; buildah rm "$c"; }
fi
args=()
if [ "${1:-}" = "--local-base" ]; then
  if ! image_exists "$LOCAL_BASE"; then
    command -v debootstrap >/dev/null || { echo "install the Debian package debootstrap" >&2; exit 2; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates \
      bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | import_rootfs "$LOCAL_BASE"
  fi
  args+=(--build-arg "BASE=$LOCAL_BASE")
fi
pip_args=""
WHEELS=${WHEELS:-/opt/wheels}
if [ -d "$WHEELS" ]; then
  args+=(-v "$WHEELS:/wheels:ro")
  pip_args="--find-links /wheels"
fi
for repo in /opt/pypi /opt/pypi-more; do  # local package indexes (simple/ + files), when the site has them
  if [ -d "$repo/simple" ]; then
    args+=(-v "$repo:$repo:ro")
    pip_args="$pip_args --extra-index-url file://$repo/simple"
  fi
done
# A TLS-intercepting proxy in front of PyPI (common in hospitals): trust its CA
# for pip inside the build (CA_BUNDLE, default $PIP_CERT).
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-}}
if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then
  args+=(-v "$CA_BUNDLE:/run/site-ca.crt:ro")
  pip_args="$pip_args --cert /run/site-ca.crt"
fi
# shellcheck disable=SC2206
extra=(${BUILD_EXTRA_ARGS:-})
"${BUILD[@]}" "${extra[@]}" "${args[@]}" --build-arg "PIP_EXTRA_ARGS=$pip_args" -t "$TAG" .
echo "built $TAG"
