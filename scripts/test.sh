#!/usr/bin/env bash
# The whole test suite: set up if needed, lint and type-check, then pytest (the tiny models are built on
# first use).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check .
.venv/bin/mypy --strict bot.py cogs pipelines models storage
.venv/bin/python -m pytest -q "$@"
