#!/usr/bin/env bash
# The distribution's servers the tests run for real: redis-server (the distributed store),
# HAProxy (the gRPC load balancer in front of broker replicas) and promtool (alert-rule tests,
# package prometheus). Installed with apt-get where they are missing and we are root; otherwise
# each test that needs one says loudly that it is skipping and why.
set -euo pipefail

want=()
command -v redis-server >/dev/null || want+=(redis-server)
command -v haproxy >/dev/null || want+=(haproxy)
command -v promtool >/dev/null || want+=(prometheus)
[ ${#want[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: cannot install ${want[*]} (needs root and apt-get);" \
         "the tests that need them will skip and say so" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null; }
if ! install 2>/dev/null; then
    apt-get update -q >/dev/null
    install
fi
# The packages start their services; the tests start their own on free ports instead.
for unit in redis-server haproxy prometheus; do
    systemctl disable --now "$unit" >/dev/null 2>&1 || service "$unit" stop >/dev/null 2>&1 || true
done
echo "system-deps: installed ${want[*]}"
