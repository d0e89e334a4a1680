#!/usr/bin/env bash
# Installs what the tests need (nginx, tcpdump, curl, wrk, openssl and systemd's systemd-analyze from Debian;
# clang, bpftool and libbpf-dev, with which the core's build compiles the TLS probes; the agent with its test
# extras, which builds the Rust core) and runs the whole suite: the core's own units (cargo test),
# clippy with warnings as errors, then pytest. Run as root: the live-capture tests open AF_PACKET sockets.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx tcpdump curl wrk procps systemd openssl util-linux \
    clang libbpf-dev bpftool >/dev/null
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
(cd core && cargo test -q && cargo clippy -q --all-targets --features python -- -D warnings)
exec python3 -m pytest -q -p no:cacheprovider "$@"
