#!/usr/bin/env bash
# Run the test suite. Default: the fast selection (everything not marked slow).
#   scripts/test.sh            fast selection (a few minutes on 2 cores)
#   scripts/test.sh --all      everything, slow tests included
#   scripts/test.sh ARGS...    extra arguments go to pytest (e.g. tests/ring -k icepop)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/bootstrap.sh" dev
cd "$root"
marker=(-m "not slow")
if [ "${1:-}" = "--all" ]; then marker=(); shift; fi
# --durations: the slowest tests, printed at the end, tell a slow CI run from a hang.
exec "$root/.venv/bin/python" -m pytest --durations=15 "${marker[@]}" "$@"
