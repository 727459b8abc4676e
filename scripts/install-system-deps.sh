#!/usr/bin/env bash
# Installs the Debian packages the tests need when missing: Orthanc with its
# DICOMweb plugin (the PACS peer), dcmtk (storescu/echoscu: the scanner),
# dicom3tools (dciodvfy), poppler-utils (pdftoppm), PostgreSQL (scaled-out job store),
# redis-server (the Celery broker of the scaled-out tests), chromium and npm
# (the OHIF viewer test, tests/test_viewer.py). Each is looked for first: on a
# machine that has them all, apt-get is not run at all; otherwise the missing
# ones are installed with one apt-get update and one apt-get install.
# Then caches the prebuilt OHIF viewer (npm package @ohif/app) under
# ${XDG_CACHE_HOME:-~/.cache}/brainline/ohif-<version>/package/dist, where
# tests/test_viewer.py looks for it.
set -euo pipefail
OHIF_VERSION="3.13.2"
need=()
command -v Orthanc   >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu  >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy  >/dev/null 2>&1 || need+=(dicom3tools)
command -v pdftoppm  >/dev/null 2>&1 || need+=(poppler-utils)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium  >/dev/null 2>&1 || need+=(chromium)
command -v npm       >/dev/null 2>&1 || need+=(npm)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian packages start a system Orthanc, PostgreSQL and Redis; the tests run their own.
  $SUDO service orthanc stop >/dev/null 2>&1 || true
  $SUDO service postgresql stop >/dev/null 2>&1 || true
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi

# The prebuilt OHIF viewer (about 50 MB), fetched once with the npm client.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/brainline/ohif-${OHIF_VERSION}"
if [ ! -f "$cache/package/dist/index.html" ] && command -v npm >/dev/null 2>&1; then
  echo "caching @ohif/app@${OHIF_VERSION} in $cache"
  mkdir -p "$cache"
  (cd "$cache" && npm pack "@ohif/app@${OHIF_VERSION}" >/dev/null \
     && tar xzf "ohif-app-${OHIF_VERSION}.tgz" && rm -f "ohif-app-${OHIF_VERSION}.tgz") \
    || echo "warning: could not fetch @ohif/app; tests/test_viewer.py will try again" >&2
fi
