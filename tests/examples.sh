#!/bin/sh
# Runs one example host of examples/ and checks what it printed. Run beside
# the mock providers (tests/with_mock.sh), optionally under a wrapper:
#   tests/examples.sh hello|ev_host|uv_host BINARY [WRAPPER...]
set -eu
name=$1
bin=$2
shift 2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
fail() {
  echo "FAIL $name: $*"
  sed -n '1,20p' "$out"
  echo "0 passed, 1 failed"
  exit 1
}
case $name in
hello)
  "$@" "$bin" "What is a monad?" >"$out" || fail "exit status $?"
  grep -q '"status":"success"' "$out" || fail "no success"
  grep -q 'You asked: What is a monad?' "$out" || fail "not the answer to the question"
  ;;
ev_host)
  "$@" "$bin" "Tell me a story" >"$out" || fail "exit status $?"
  [ "$(grep -c '^event: .*"type":"text"' "$out")" -ge 2 ] || fail "the answer did not stream"
  grep -q '^result: .*You asked: Tell me a story' "$out" || fail "no result"
  grep -Eq '^[0-9]+ events, [1-9][0-9]* ticks' "$out" || fail "the host's own timer did not run"
  ;;
uv_host)
  n=100
  "$@" "$bin" $n >"$out" || fail "exit status $?"
  [ "$(wc -l <"$out")" -eq $n ] || fail "$(wc -l <"$out") answers, not $n"
  i=0
  while [ $i -lt $n ]; do
    grep -q "^$i .*\"status\":\"success\".*You asked: question $i\"" "$out" ||
      grep -q "^$i .*You asked: question $i\".*\"status\":\"success\"" "$out" ||
      fail "answer $i is missing or wrong"
    i=$((i + 1))
  done
  ;;
*)
  fail "unknown example"
  ;;
esac
echo "1 passed, 0 failed"
