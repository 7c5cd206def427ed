#!/usr/bin/env bash
# Builds a local stand-in for python:3.11-slim-bookworm where registry images cannot be pulled:
# a debootstrap of Debian bookworm (minbase) with python3.11 + venv, imported into podman.
#
#   tools/make_base_image.sh [IMAGE]     (default localhost/debian-bookworm-python:3.11)
#
# Needs root and `apt-get install debootstrap podman`. Does nothing when IMAGE already exists;
# REBUILD=1 makes it anew (e.g. to take in Debian security updates).
set -euo pipefail

IMAGE=${1:-localhost/debian-bookworm-python:3.11}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if [ "${REBUILD:-0}" != 1 ] && podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists"
  exit 0
fi
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing: apt-get install -y $tool" >&2; exit 1; }
done

rootfs=$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
chmod 755 "$rootfs"  # apt's sandbox user (_apt) must reach the chroot's download folder

# minbase: only Essential + apt, the closest Debian gets to the slim image.
debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates \
  bookworm "$rootfs" "$MIRROR"

# debootstrap installs from the release alone; the security suite brings the fixed python3.11/openssl.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
# As Debian's slim images do: no documentation, manuals or translations, now or in later apt installs.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
SLIM
find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
chroot "$rootfs" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q && apt-get clean'
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log "$rootfs"/tmp/*

# Same defaults as the official python image, so the Dockerfile runs unchanged on either base.
tar -C "$rootfs" -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap bookworm minbase + python3.11" - "$IMAGE"
echo "base image $IMAGE built: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
