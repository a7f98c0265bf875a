#!/usr/bin/env bash
# Checks of the deployment artifacts: the Helm chart, the alert rules, the Grafana
# dashboard and the generated CRD (see check.py). Runs from any directory.
#
# Python packages go into a virtualenv, reused across runs:
#   ARTIFACTS_VENV (default: ~/.cache/parley-artifacts-venv)
# promtool comes from the Debian package `prometheus`, installed when missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${ARTIFACTS_VENV:-$HOME/.cache/parley-artifacts-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Install again only when the requirements changed since the last install.
stamp="$venv/.parley-requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" >"$stamp"
fi

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool missing: installing the Debian package prometheus"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
fi

exec "$venv/bin/python" "$here/check.py" "$@"
