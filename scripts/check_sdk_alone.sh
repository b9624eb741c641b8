#!/usr/bin/env bash
# CI check: the SDK installs and works on its own. A fresh venv gets `pip install ./client` and nothing else; the
# server's packages (torch, redis, common, worker, service) must not import there, and a real turn against the
# stack (started with the project's .venv, on a free port) must come back through rwkv_serve_client.
# Usage: bash scripts/check_sdk_alone.sh   (after scripts/setup.sh; ~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
work=$(mktemp -d)
stack_pid=""
cleanup() {
  if [ -n "$stack_pid" ] && kill -0 "$stack_pid" 2>/dev/null; then
    kill -TERM "$stack_pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$stack_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$stack_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "check_sdk_alone: FAIL: $*" >&2; exit 1; }

echo "check_sdk_alone: fresh venv, pip install ./client"
"$PY" -m venv "$work/venv"
VPY=$work/venv/bin/python
had_build=$([ -d client/build ] && echo 1 || true)
if ! "$VPY" -m pip install -q ./client > "$work/pip.log" 2>&1; then
  cat "$work/pip.log" >&2
  fail "pip install ./client"
fi
[ -n "$had_build" ] || rm -rf client/build  # setuptools' scratch directory: stale files there would reach wheels

# Isolated mode (-I) from outside the checkout: neither the working directory nor PYTHONPATH can lend a package.
cd "$work"
for module in torch redis common worker service numpy; do
  if "$VPY" -I -c "import $module" 2>/dev/null; then
    fail "'import $module' works in the SDK-only venv: the SDK pulled in a server dependency"
  fi
done
"$VPY" -I -c "
import rwkv_serve, rwkv_serve_client, sys
for module in (rwkv_serve, rwkv_serve_client):
    assert module.__file__.startswith(sys.prefix), f'{module.__name__} comes from {module.__file__}, not the venv'
" || fail "the SDK's packages are not the installed ones"
# rwkv-chat is installed; without the cli extra it names the extra instead of a traceback.
[ -x "$work/venv/bin/rwkv-chat" ] || fail "no rwkv-chat console script"
if "$work/venv/bin/rwkv-chat" --help > "$work/chat.out" 2>&1 || ! grep -q "cli" "$work/chat.out"; then
  cat "$work/chat.out" >&2
  fail "rwkv-chat without the cli extra should exit non-zero naming the extra"
fi
cd "$ROOT"

port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
redis_port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
echo "check_sdk_alone: starting the stack on port $port"
# A Redis URL where none answers: the stack starts a private Redis, so this check shares nothing with others.
.venv/bin/rwkv-stack --port "$port" --redis-url "redis://127.0.0.1:$redis_port/0" > "$work/stack.log" 2>&1 &
stack_pid=$!
ready=""
for _ in $(seq 450); do  # up to 90 s (the first run writes the random-init checkpoint)
  if grep -q "front listening on" "$work/stack.log"; then ready=1; break; fi
  kill -0 "$stack_pid" 2>/dev/null || break
  sleep 0.2
done
if [ -z "$ready" ]; then
  cat "$work/stack.log" >&2
  fail "the stack did not come up"
fi

echo "check_sdk_alone: a turn through rwkv_serve_client from the SDK-only venv"
(cd "$work" && "$VPY" -I - "127.0.0.1:$port") <<'EOF' || { cat "$work/stack.log" >&2; fail "the turn through the SDK"; }
import sys

from rwkv_serve_client import RWKVClient, StopReason, TurnResult

with RWKVClient(sys.argv[1], timeout=60) as rwkv:
    models = rwkv.list_models()
    assert models, "the stack serves no model"
    session = rwkv.create_session(models[0].id)
    assert session.state_version == 0, session
    result = rwkv.say(session.session_id, "Hello!", temperature=0, max_tokens=4)
    assert isinstance(result, TurnResult), result
    assert result.state_version == 1, result
    assert isinstance(result.stop_reason, StopReason) and result.usage.generated_tokens >= 1, result
    assert rwkv.get_session(session.session_id).state_version == 1
    rwkv.delete_session(session.session_id)
print(f"check_sdk_alone: turn ok: {result.usage.generated_tokens} tokens, stop {result.stop_reason.label}, "
      f"state_version {result.state_version}")
EOF
echo "check_sdk_alone: OK ($(du -sh "$work/venv/lib/"python*/site-packages | cut -f1) installed)"
