#!/usr/bin/env bash
# The main job on embedded defaults: set up if needed, build the tiny models if missing, generate one
# image per mode through the engine and storage, and write out/index.html.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/dreamcord tiny-model build
.venv/bin/dreamcord demo --out out "$@"
