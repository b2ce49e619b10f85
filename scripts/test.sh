#!/usr/bin/env bash
# The test suite (what CI runs). `--heavy` runs the real-model quality checks instead
# (dev protocol on SmolLM2-135M; needs ../shared/data beside the repository, and fails
# saying so when it is missing rather than skipping everything).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
marker="not heavy"
if [[ "${1:-}" == "--heavy" ]]; then
  marker="heavy"; shift
  data="$(cd .. && pwd)/shared/data"
  if [[ ! -f "$data/wikitext2-valid-dev.txt" || ! -f "$data/wikitext2-valid-calib.txt" ]]; then
    echo "error: the heavy checks need the dev-protocol texts in $data (wikitext2-valid-dev.txt and" >&2
    echo "       wikitext2-valid-calib.txt, from the project's shared/ folder); put shared/ beside the repository" >&2
    exit 2
  fi
fi
exec "${PYTHON:-python3}" -m pytest -m "$marker" -q "$@"
