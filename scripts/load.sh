#!/usr/bin/env bash
# The load run (issue 8; not part of the test suite): 500 /imagine jobs from 50 users through the local
# Discord double against the real bot and engine (tiny models, 64×64), measured; exit status 1 when a
# property fails. A few minutes on 2 cores; run it on an otherwise idle machine. Arguments go to the
# module, e.g. --json, --jobs 100 --users 20, --window 30, --steps 4, --queue-per-guild 100 (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    echo "load: no .venv here; run scripts/setup.sh first" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One compute thread: the figures are about the bot under load, not about torch's thread pool.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
exec .venv/bin/python -m tests.reliability.load_run --jobs 500 --users 50 "$@"
