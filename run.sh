#!/usr/bin/env bash
# ./run.sh         -> set up .venv (first time) and start the whole stack: Redis (REDIS_URL or embedded), front, one worker
# ./run.sh test    -> set up .venv (first time) and run the test suite with pytest
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
if [ "${1:-}" = "test" ]; then
  shift
  exec python -m pytest -q "$@"
fi
exec rwkv-stack "$@"
