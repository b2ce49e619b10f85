#!/usr/bin/env bash
# The main job on the embedded default model: quantize SmolLM2-135M into several formats and
# print the comparison table (also written to results/demo.json). Extra arguments go to
# `lowbit compare`, e.g. --eval-data FILE or --schemes int8,nf4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m lowbit compare --json results/demo.json "$@"
