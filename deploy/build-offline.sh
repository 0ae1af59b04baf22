#!/usr/bin/env bash
# Builds the raftmq image (and, with --prometheus, a Prometheus image) on a machine whose
# Docker engine cannot pull from a registry. The image is deploy/Dockerfile's target
# `prebuilt`, with RUNTIME a base imported from this host's Debian libraries (the dynamic
# loader, libc, libm, libgcc_s: all the binary links; `docker import`) and the binary
# compiled on this host (cargo) copied into the build context at deploy/prebuilt/raftmq.
#
#   deploy/build-offline.sh                      # release build, tag raftmq:local
#   deploy/build-offline.sh --binary target/debug/raftmq --tag raftmq:test --prometheus
#
# --prometheus also makes raftmq-prometheus:local from Debian's prometheus package
# (installed when missing and possible) for docker-compose's PROMETHEUS_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=raftmq:local
binary=
prometheus=false
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --prometheus) prometheus=true; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [ -z "$binary" ]; then
  cargo build --release --locked -p raftmq-node --bin raftmq
  binary=target/release/raftmq
fi

# A base image holding exactly the files a binary loads: its loader and shared libraries,
# taken from this host's Debian packages (symbolic links followed).
import_base() { # binary image
  local libs
  libs=$(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
  # shellcheck disable=SC2086
  tar -C / -chf - $(printf '%s\n' $libs | sed 's|^/||') | docker import - "$2" >/dev/null
}

base="raftmq-runtime-base:local"
import_base "$binary" "$base"
mkdir -p deploy/prebuilt
cp "$binary" deploy/prebuilt/raftmq
docker build -q -f deploy/Dockerfile --target prebuilt --build-arg RUNTIME="$base" -t "$tag" . >/dev/null
rm -f deploy/prebuilt/raftmq
echo "built $tag"

if $prometheus; then
  if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  promtool_bin=$(command -v prometheus)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/bin" "$work/prometheus" "$work/etc/prometheus"
  cp "$promtool_bin" "$work/bin/prometheus"
  libs=$(ldd "$promtool_bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
  # shellcheck disable=SC2086
  tar -C / -chf - $(printf '%s\n' $libs | sed 's|^/||') | tar -C "$work" -xf -
  tar -C "$work" -cf - . | docker import \
    -c 'ENTRYPOINT ["/bin/prometheus"]' \
    -c 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    -c 'EXPOSE 9090' - raftmq-prometheus:local >/dev/null
  echo "built raftmq-prometheus:local ($(prometheus --version 2>&1 | head -1))"
fi
