#!/usr/bin/env bash
# One set-up path for the README, CI and docker/Dockerfile: Debian packages, Node >= 22,
# npm dependencies. Idempotent, and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

# Debian packages: what the agent needs at run time (FUSE, an OCI runtime, overlayfs
# tools), plus, unless SHOAL_SETUP=runtime (the container image), the real tools the
# tests, the fixture builder and the benchmarks use.
packages=(fuse libfuse2 runc ca-certificates)
if [ "${SHOAL_SETUP:-full}" != runtime ]; then
  packages+=(containerd skopeo umoci debootstrap docker-registry squashfuse squashfs-tools fio strace zstd attr apache2-utils openssl iproute2)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "need root to install: ${missing[*]}"; exit 1; }
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node: libp2p 3 and better-sqlite3 13 need Node >= 22; the machine may ship 20.
node_major() { "${1:-node}" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if [ "$(node_major)" -lt 22 ]; then
  if [ -x /usr/local/bin/node ] && [ "$(node_major /usr/local/bin/node)" -ge 22 ]; then
    log "using /usr/local/bin/node; put /usr/local/bin first in PATH"
  else
    log "installing Node 24 from the npm registry into /usr/local"
    npm install -g --prefix /usr/local node@24 >/dev/null 2>&1
  fi
  export PATH="/usr/local/bin:$PATH"
  hash -r
fi
[ "$(node_major)" -ge 22 ] || { log "node $(node --version) is too old; need >= 22"; exit 1; }

# npm dependencies, reinstalled only when the lock file or the Node ABI changed.
stamp=node_modules/.shoal-setup
want="$(sha256sum package-lock.json | cut -c1-64) $(node -p process.versions.modules)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing npm dependencies"
  if [ "${SHOAL_SETUP:-full}" = runtime ]; then
    npm ci --omit=dev --no-audit --no-fund --loglevel=error
  else
    npm ci --no-audit --no-fund --loglevel=error
  fi
  echo "$want" > "$stamp"
fi
# Native addons must load in the Node that runs them (a Node 20 build crashes on 24).
node -e "new (require('better-sqlite3'))(':memory:').prepare('select 1').get()" \
  || { log "better-sqlite3 does not load on $(node --version); delete node_modules and re-run"; exit 1; }
# libp2p as one bundled module (src/p2p/libp2p.ts loads it when it is newer than the
# files it is built from): an agent with peers starts on a fraction of the CPU. Without
# it (a runtime install has no esbuild, or the build failed) the agent loads the packages.
bundle=node_modules/.cache/shoal/libp2p.mjs
if [ ! "$bundle" -nt src/p2p/libp2p-packages.ts ] || [ ! "$bundle" -nt package-lock.json ]; then
  if out=$(node scripts/bundle-libp2p.ts 2>&1); then log "$out"
  else log "libp2p bundle not built (npm run build:libp2p says why): the agent loads libp2p from its packages"; fi
fi
log "ready: node $(node --version)"
