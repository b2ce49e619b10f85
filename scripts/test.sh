#!/usr/bin/env bash
# The test suite (what CI runs). `--heavy` runs the real-model quality checks instead
# (dev protocol on SmolLM2-135M; needs ../shared/data beside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
marker="not heavy"
if [[ "${1:-}" == "--heavy" ]]; then marker="heavy"; shift; fi
exec "${PYTHON:-python3}" -m pytest -m "$marker" -q "$@"
