#!/usr/bin/env bash
# Installs the Debian packages the tests need when missing: Orthanc with its
# DICOMweb plugin (the PACS peer), dcmtk (storescu/echoscu: the scanner),
# dicom3tools (dciodvfy), poppler-utils (pdftoppm), PostgreSQL (scaled-out job store).
set -euo pipefail
need=()
command -v Orthanc   >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu  >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy  >/dev/null 2>&1 || need+=(dicom3tools)
command -v pdftoppm  >/dev/null 2>&1 || need+=(poppler-utils)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian package starts a system Orthanc; the tests run their own.
$SUDO service orthanc stop >/dev/null 2>&1 || true
$SUDO service postgresql stop >/dev/null 2>&1 || true
