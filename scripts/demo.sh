#!/usr/bin/env bash
# The main job on the embedded default model: quantize SmolLM2-135M into several formats, print
# the comparison table sorted by size, what each column means, and a verdict (the smallest
# scheme within each quality budget, and what to try next); also written to results/demo.json.
# Extra arguments go to `lowbit compare`, e.g. --eval-data FILE, --schemes int8,nf4 or --max-kl 0.05.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m lowbit compare --json results/demo.json "$@"
