#!/usr/bin/env bash
# The whole test suite: set up if needed, lint, then pytest (the tiny models are built on first use).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
