#!/usr/bin/env bash
# Apply ruff's automatic fixes and formatting in place, then report what is left for a person.
# Usage: tools/lint-fix.sh [PATH ...]   (default: flaxcam benchmarks experiments tests tools)
# RUFF and MYPY override the executables (default: the ones on PATH, else .venv/bin/...).
set -uo pipefail
cd "$(dirname "$0")/.."
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(flaxcam benchmarks experiments tests tools)
RUFF=${RUFF:-$(command -v ruff || echo .venv/bin/ruff)}
MYPY=${MYPY:-$(command -v mypy || echo .venv/bin/mypy)}

"$RUFF" check --fix --silent "${paths[@]}"
"$RUFF" format --quiet "${paths[@]}"
echo "--- ruff: findings left after the automatic fixes"
"$RUFF" check --statistics "${paths[@]}"
ruff_status=$?
echo "--- mypy (no automatic fixes)"
"$MYPY"
mypy_status=$?
exit $(( ruff_status || mypy_status ))
