#!/bin/sh
# CTest's sdk_clients: the official OpenAI and Anthropic npm clients against
# `aiorch serve`. Exits 77 (skipped) when node, the installed packages
# (`npm ci --prefix tests/sdk`, done by .ci/setup) or the serve command are missing.
cd "$(dirname "$0")/../.." || exit 1
aiorch="${AIORCH_BUILD:-build}/aiorch"
if ! command -v node >/dev/null 2>&1; then
  echo "SKIP sdk_clients: node is not installed (run .ci/setup)"
  exit 77
fi
if [ ! -d tests/sdk/node_modules ]; then
  echo "SKIP sdk_clients: tests/sdk/node_modules is missing (run: npm ci --prefix tests/sdk)"
  exit 77
fi
if ! "$aiorch" --help 2>/dev/null | grep -Eq '^[[:space:]]*serve\b'; then
  echo "SKIP sdk_clients: $aiorch has no 'serve' command yet"
  exit 77
fi
# The files by name: node >= 21 reads --test arguments as globs, older ones as paths.
exec node --test tests/sdk/*.test.mjs
