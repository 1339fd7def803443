#!/usr/bin/env bash
# Build the serving image (make image). Labels it with a hash of everything the build reads, so
#   deploy/image/build.sh --if-stale     # builds only when that hash changed (the image test)
#   deploy/image/build.sh --no-cache     # other options go to the engine's build
# Engine: podman when installed (here; deploy/image/base.sh prepares it), else docker. On a machine
# whose pip finds the pinned torch CPU wheel in a local folder (PIP_FIND_LINKS; no PyTorch index
# reachable), the build mounts that folder, a pip.conf naming it and the host's CA bundle into
# every RUN and takes torch's dependencies from PyPI; the Dockerfile itself knows nothing of it.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-stockcast:latest}
TORCH=${TORCH:-torch==2.13.0+cpu}
ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
# the build context as .dockerignore lets it through (keep the two lists together)
INPUTS=(Dockerfile .dockerignore pyproject.toml src configs data handlers train.py backtest.py
        deploy/image/healthcheck.py)

log() { echo "image: $*" >&2; }

context_hash() {
  find "${INPUTS[@]}" -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' \
       ! -path 'data/cache/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

hash=$(context_hash)
if [[ ${1:-} == --if-stale ]]; then
  shift
  built=$("$ENGINE" image inspect --format '{{ index .Config.Labels "stockcast.context" }}' \
          "$IMAGE" 2>/dev/null || true)
  if [[ $built == "$hash" ]]; then
    log "$IMAGE is up to date ($hash)"
    exit 0
  fi
  log "$IMAGE ${built:+is stale ($built != $hash)}${built:-is missing}: building"
fi

args=(build -t "$IMAGE" --label "stockcast.context=$hash")
if [[ $ENGINE == podman ]]; then
  base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile | head -n1)
  if ! podman image exists "docker.io/library/$base" && ! podman image exists "$base"; then
    log "error: base image $base missing: run deploy/image/base.sh (no registry reachable here)"
    exit 1
  fi
  # no registry to pull from; docker format keeps HEALTHCHECK (OCI images have no such field)
  args+=(--pull=never --format docker --network host)
fi

wheels=${PIP_FIND_LINKS:-}
version=${TORCH#torch==}
# (docker build has no -v; a docker machine reaches the PyTorch index or sets TORCH_INDEX itself)
if [[ $ENGINE == podman && -d $wheels ]] && compgen -G "$wheels/torch-${version}-*.whl" >/dev/null; then
  conf=$(mktemp -d)
  trap 'rm -rf "$conf"' EXIT
  printf '[global]\nfind-links = %s\ncert = /etc/pip-host-ca.crt\n' "$wheels" >"$conf/pip.conf"
  args+=(-v "$conf/pip.conf:/etc/pip.conf:ro" -v "$wheels:$wheels:ro"
         -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-host-ca.crt:ro
         --build-arg TORCH_INDEX=https://pypi.org/simple)
  log "torch from $wheels, the rest from PyPI"
fi

start=$SECONDS
"$ENGINE" "${args[@]}" "$@" .
log "built $IMAGE in $((SECONDS - start)) s, $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE") bytes"
