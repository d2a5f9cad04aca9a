#!/usr/bin/env bash
# One command: install, build the reference bundle for the cpu profile, and run it.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
dspark-export build
dspark-export run ./dspark-bundle --prompt "Explain recursion in two sentences." --max-new-tokens 64
