#!/usr/bin/env bash
# Creates .venv (once) and installs the project into it: the SDK distribution (./client, which also carries the
# generated gRPC code) and the server with its worker, dev and tune extras. CPU torch only when no torch is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.installed-$(cat pyproject.toml client/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    # A CPU build: GPU users install their CUDA torch into .venv before running this.
    python -m pip install -q "torch==2.13.0"
  fi
  # pip's build chatter goes to a log; a failure prints it and stops the set-up.
  # One pip command: the server's dependency rwkv-serve-client resolves to the local ./client.
  if ! python -m pip install -q -e ./client -e ".[worker,dev,tune]" > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
  # A .venv from before the SDK was its own distribution: uninstalling the old rwkv-serve (which owned rwkv-chat)
  # removed the script the client had just installed.
  [ -x .venv/bin/rwkv-chat ] || python -m pip install -q --no-deps --force-reinstall -e ./client >> .venv/install.log 2>&1
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The native CPU matmul kernels: built once here (~20 s) rather than by the first worker; a failure only warns
# (the engine then uses oneDNN / torch and logs why).
python -m worker.cpu_kernels || true
