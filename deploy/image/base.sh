#!/usr/bin/env bash
# Prepare this machine to build and run the image without a container registry (see
# /work/shared/FACTS.md, "Containers"): podman and its helpers from Debian, a containers.conf that
# works here, and the Dockerfile's base image made from Debian packages under the tag its FROM
# names. Each step is skipped when already done, so running it again costs a second.
#   deploy/image/base.sh          # as root; ~3 min the first time (apt + debootstrap)
# On a machine that can pull images none of this is needed: docker build . works as it is.
set -euo pipefail

BASE_TAG=docker.io/library/python:3.11-slim-bookworm  # the Dockerfile's FROM
SUITE=bookworm
CONF=/etc/containers/containers.conf

log() { echo "base.sh: $*" >&2; }

# netavark (podman's network backend) publishes ports with iptables, which is not a dependency
missing=()
for tool in podman buildah debootstrap runc iptables; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" netavark aardvark-dns uidmap >/dev/null
fi

# runc: crun refuses this machine's hybrid cgroups; the default rlimits make runc fail with EPERM;
# no systemd here, so cgroups and events go through plain files
if [[ ! -e $CONF ]]; then
  log "writing $CONF"
  mkdir -p "$(dirname "$CONF")"
  cat >"$CONF" <<'CONFEOF'
# written by stockcast deploy/image/base.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
CONFEOF
elif ! grep -q '^runtime *= *"runc"' "$CONF"; then
  log "error: $CONF exists without runtime = \"runc\"; add it (and the ulimits) by hand, see this script"
  exit 1
fi

if podman image exists "$BASE_TAG"; then
  log "$BASE_TAG exists"
  exit 0
fi
# the Debian mirror this machine's apt uses (deb822 URIs: or one-line deb entries)
mirror=$(grep -hsoE '^URIs: *http\S*/debian/?$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
[[ -n $mirror ]] || mirror=$(grep -hsE '^deb +http\S*/debian/? +bookworm( |$)' \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.list | head -n1 | awk '{print $2}')
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /var/tmp/stockcast-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap $SUITE from $mirror (~1-2 min)"
# what the official python:3.11-slim-bookworm offers the Dockerfile: python, venv, pip's certs
debootstrap --variant=minbase \
  --include=python3.11,python3.11-venv,python3-distutils,python-is-python3,ca-certificates \
  "$SUITE" "$rootfs" "$mirror" >/dev/null
# apt inside the build fetches from the same mirror; no caches or logs in the image
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*
tar -C "$rootfs" -c . | podman import --quiet --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
log "imported $BASE_TAG ($(podman image inspect --format '{{.Size}}' "$BASE_TAG") bytes)"
