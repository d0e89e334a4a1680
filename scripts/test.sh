#!/usr/bin/env bash
# Installs what the tests need (nginx, tcpdump, curl, wrk from Debian; the agent with its test extras)
# and runs the whole suite. Run as root: the live-capture tests open AF_PACKET sockets.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx tcpdump curl wrk procps >/dev/null
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
