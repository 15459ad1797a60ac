#!/usr/bin/env bash
# Create .venv at the repository root and install asystem into it, once.
# Re-running is cheap: it reinstalls only when pyproject.toml or the extras change.
# Usage: scripts/bootstrap.sh [extra,extra...]   (default: dev)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
extras="${1:-dev}"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
stamp="$venv/.asystem-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16) $extras"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    # torch first, pinned: it resolves to the CPU wheel on CPU machines.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -e "$root[$extras]"
    echo "$want" >>"$stamp"
fi
