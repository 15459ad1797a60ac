#!/usr/bin/env bash
# The main job. Creates .venv on first use, then runs `asystem` with the given arguments.
#   scripts/run.sh            the default job
#   scripts/run.sh --help     what else it can do
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/bootstrap.sh" dev
exec "$root/.venv/bin/asystem" "$@"
