#!/usr/bin/env bash
# Create .venv if missing and install dreamcord with its pinned torch; safe to run again (it skips
# what is already done). Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

# Re-install only when pyproject.toml changed since the last successful install.
stamp=.venv/.dreamcord-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing torch 2.14.1 + torchvision 0.29.1 first (pinned; an unpinned torch pulls gigabytes)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
    echo "setup: installing dreamcord and its dependencies"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$want" > "$stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
