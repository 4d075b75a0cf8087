#!/bin/sh
# Runs a command beside the mock providers (tests/mock_server.lua) on a free
# loopback port, with both providers pointed at them:
#   tests/with_mock.sh AIORCH COMMAND [ARGS...]
# AIORCH is the aiorch binary that runs the mock. Exports OPENAI_API_KEY,
# ANTHROPIC_API_KEY (mock keys), OPENAI_BASE_URL and ANTHROPIC_BASE_URL.
set -eu
aiorch=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp)
"$aiorch" run "$here/mock_server.lua" --port 0 >"$out" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$out"' EXIT
port=
for _ in $(seq 300); do
  port=$(sed -n 's/^PORT //p' "$out")
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.05
done
if [ -z "$port" ]; then
  echo "with_mock.sh: the mock providers did not start" >&2
  exit 1
fi
export OPENAI_API_KEY=sk-mock ANTHROPIC_API_KEY=sk-ant-mock
export OPENAI_BASE_URL="http://127.0.0.1:$port/v1" ANTHROPIC_BASE_URL="http://127.0.0.1:$port"
status=0
"$@" || status=$?
exit "$status"
