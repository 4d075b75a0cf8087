#!/bin/sh
# aiorch inside another CMake project (add_subdirectory): its tests stay out
# of that project's ctest, aiorch::aiorch links with every include directory
# (Lua's too), and a host in the build tree finds aiorch's sources' scripts.
# Run beside the mock providers (tests/with_mock.sh).
#   tests/subproject_test.sh SOURCE_DIR
set -eu
src=$(cd "$1" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/proj"
cat >"$tmp/proj/CMakeLists.txt" <<EOF2
cmake_minimum_required(VERSION 3.25)
project(outer C)
include(CTest)
add_subdirectory("$src" aiorch)
add_executable(host host.c)
target_link_libraries(host PRIVATE aiorch::aiorch)
add_test(NAME outer_only COMMAND host)
EOF2
cat >"$tmp/proj/host.c" <<'EOF2'
#include <stdio.h>
#include <lua.h>
#include <aiorch.h>
static void on_result(void *ud, const char *json, size_t len) { printf("result %.*s\n", (int)len, json); (void)ud; }
int main(void)
{
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    aiorch_job_callbacks cb = {.on_result = on_result};
    printf("root %s\n", aiorch_runtime_root(rt));
    aiorch_job_submit_orchestration(rt, "{\"user_question\": \"inside\"}", "single", "openai", &cb);
    int status = aiorch_runtime_wait(rt);
    aiorch_runtime_free(rt);
    return status;
}
EOF2
failed=0
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
cmake -S "$tmp/proj" -B "$tmp/build" >"$tmp/log" 2>&1 || { cat "$tmp/log"; fail "configure"; }
cmake --build "$tmp/build" --target host -j2 >"$tmp/log" 2>&1 || { tail -30 "$tmp/log"; fail "build"; }
tests=$(ctest --test-dir "$tmp/build" -N | sed -n 's/^ *Test *#[0-9]*: //p')
[ "$tests" = "outer_only" ] || fail "the outer ctest lists: $tests"
(cd "$tmp" && "$tmp/build/host") >"$tmp/out" 2>&1 || fail "host: $(cat "$tmp/out")"
grep -qx "root $src" "$tmp/out" || fail "the host's root: $(cat "$tmp/out")"
grep -q 'result .*You asked: inside' "$tmp/out" || fail "the host's answer: $(cat "$tmp/out")"
echo "$((5 - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
