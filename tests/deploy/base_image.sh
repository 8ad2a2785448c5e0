#!/usr/bin/env bash
# Builds a python:3.11-slim stand-in from Debian's packages, for machines that reach no image registry:
# `debootstrap` a minimal bookworm with python3 + venv, import it, and put a venv first on PATH (bookworm's system
# python refuses `pip install`, PEP 668). The host's CA bundle goes in, so builds verify TLS as the host does.
# Usage: tests/deploy/base_image.sh [TAG]   (default moeinf-base:bookworm; does nothing if TAG exists)
set -euo pipefail
TAG=${1:-moeinf-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$TAG" >/dev/null 2>&1; then echo "base image $TAG exists"; exit 0; fi
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install -y debootstrap)" >&2; exit 1; }
ROOTFS=$(mktemp -d /var/tmp/moeinf-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOTFS" "$MIRROR"
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
chroot "$ROOTFS" python3 -m venv /opt/python
chroot "$ROOTFS" /opt/python/bin/pip install -q --upgrade pip 2>/dev/null || true  # best effort
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOTFS/etc/pip.conf"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$TAG"
echo "built base image $TAG"
