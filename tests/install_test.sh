#!/bin/sh
# aiorch as a user installs it: `cmake --install` into a temporary prefix,
# then, against the mock providers (run by tests/with_mock.sh):
#   - a C host built with pkg-config (examples/hello.c, examples/ev_host.c);
#   - a CMake project with find_package(aiorch): aiorch::aiorch (a host that
#     prints the runtime's root, and examples/uv_host.c) and aiorch::aiorch_static;
#   - lua5.4 with `require "aiorch"` from the installed paths only;
#   - the prefix moved elsewhere: `bin/aiorch demo`, the library and the Lua
#     module all find the moved scripts.
#   tests/install_test.sh BUILD_DIR SOURCE_DIR [EXTRA_CFLAGS]
# EXTRA_CFLAGS: the sanitizers' flags when the build has them (with
# AIORCH_PRELOAD naming the runtime lua5.4 must preload).
set -eu
build=$(cd "$1" && pwd)
src=$(cd "$2" && pwd)
cflags=${3:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
check() { # check DESCRIPTION COMMAND...
  what=$1
  shift
  if "$@" >"$tmp/out" 2>&1; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAIL $what"
    sed -n '1,30p' "$tmp/out"
  fi
}
has() { grep -q -- "$1" "$tmp/out"; }
same() { [ "$1" = "$2" ] || { echo "'$1' is not '$2'"; return 1; }; }
lua_cpath() { echo "$1/lib/lua/5.4/?.so;/usr/lib/x86_64-linux-gnu/lua/5.4/?.so;/usr/lib/lua/5.4/?.so"; }

p=$tmp/prefix
cmake --install "$build" --prefix "$p" >/dev/null
for f in bin/aiorch lib/libaiorch.so lib/libaiorch.so.0 lib/libaiorch.a include/aiorch.h \
  lib/pkgconfig/aiorch.pc lib/cmake/aiorch/aiorchConfig.cmake lib/cmake/aiorch/aiorchConfigVersion.cmake \
  lib/cmake/aiorch/aiorchTargets.cmake lib/lua/5.4/aiorch.so share/aiorch/scripts/aiorch/main.lua \
  share/aiorch/strategies/fallback.lua; do
  check "installed $f" test -e "$p/$f"
done
check "SONAME libaiorch.so.0" sh -c "readelf -d '$p/lib/libaiorch.so' | grep -q 'SONAME.*\[libaiorch.so.0\]'"

# pkg-config, as README says (plus an rpath, the prefix being no system one).
export PKG_CONFIG_PATH="$p/lib/pkgconfig"
pc_flags=$(pkg-config --cflags --libs aiorch)
rpath="-Wl,-rpath,$(pkg-config --variable=libdir aiorch)"
check "pkg-config finds Lua's headers" sh -c "pkg-config --cflags aiorch | grep -q lua5.4"
check "hello.c builds with pkg-config" sh -c "cc $cflags '$src/examples/hello.c' $pc_flags $rpath -o '$tmp/hello'"
check "ev_host.c builds with pkg-config" sh -c "cc $cflags '$src/examples/ev_host.c' $pc_flags -lev $rpath -o '$tmp/ev_host'"
cd "$tmp"
check "hello answers" "$tmp/hello" "installed?"
has '"status":"success"' && has 'You asked: installed?' || check "hello's answer" false
check "ev_host streams" "$tmp/ev_host" "streamed?"
has 'You asked: streamed?' || check "ev_host's answer" false

# find_package(aiorch) from a CMake project.
mkdir -p "$tmp/proj"
cat >"$tmp/proj/root.c" <<'EOF'
#include <stdio.h>
#include <lua.h> /* aiorch::aiorch carries Lua's include directory */
#include <aiorch.h>
static void on_result(void *ud, const char *json, size_t len) { printf("result %.*s\n", (int)len, json); (void)ud; }
int main(void)
{
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    aiorch_job_callbacks cb = {.on_result = on_result};
    const char *code = "return require('aiorch.orchestrate') and 'loaded'";
    printf("root %s\nlua %s\n", aiorch_runtime_root(rt), LUA_VERSION);
    aiorch_job_submit_chunk(rt, code, sizeof "return require('aiorch.orchestrate') and 'loaded'" - 1, NULL, 0, NULL, &cb);
    int status = aiorch_runtime_wait(rt);
    aiorch_runtime_free(rt);
    return status;
}
EOF
cp "$src/examples/uv_host.c" "$tmp/proj/"
cat >"$tmp/proj/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.25)
project(host C)
find_package(aiorch 0.1 REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(UV REQUIRED IMPORTED_TARGET libuv)
add_executable(root root.c)
target_link_libraries(root PRIVATE aiorch::aiorch)
add_executable(root_static root.c)
target_link_libraries(root_static PRIVATE aiorch::aiorch_static)
add_executable(uv_host uv_host.c)
target_link_libraries(uv_host PRIVATE aiorch::aiorch PkgConfig::UV)
EOF
check "find_package(aiorch) configures" cmake -S "$tmp/proj" -B "$tmp/proj/build" "-DCMAKE_PREFIX_PATH=$p" \
  "-DCMAKE_C_FLAGS=$cflags"
check "find_package(aiorch) builds" cmake --build "$tmp/proj/build"
check "the shared library finds the installed scripts" "$tmp/proj/build/root"
same "$(sed -n 's/^root //p' "$tmp/out")" "$p/share/aiorch" && has 'result "loaded"' ||
  check "root of libaiorch.so" false
check "aiorch::aiorch_static links completely and runs" "$tmp/proj/build/root_static"
has 'result "loaded"' || check "static host's job" false
check "uv_host (CMake) answers 20 questions at once" "$tmp/proj/build/uv_host" 20
[ "$(grep -o 'You asked: question [0-9]*' "$tmp/out" | sort -u | wc -l)" -eq 20 ] || check "uv_host's answers" false

# A plain lua5.4 with only the installed module and scripts (and Debian's own modules).
cat >"$tmp/plain.lua" <<'EOF'
local aiorch = require "aiorch"
print("root " .. aiorch.root)
local r = aiorch.run(function()
  return require("aiorch.orchestrate").orchestrate({ user_question = "from plain Lua" }, "fallback")
end)
print("answer " .. r.status .. " " .. r.response_text)
EOF
plain_lua() { # plain_lua PREFIX
  env LUA_CPATH="$(lua_cpath "$1")" LUA_PATH="/usr/share/lua/5.4/?.lua" LD_PRELOAD="${AIORCH_PRELOAD:-}" \
    lua5.4 "$tmp/plain.lua"
}
check "lua5.4 requires the installed module" plain_lua "$p"
same "$(sed -n 's/^root //p' "$tmp/out")" "$p/share/aiorch" && has 'answer success .*You asked: from plain Lua' ||
  check "the Lua module's root and answer" false

# Move the prefix: everything follows it.
q=$tmp/moved
mv "$p" "$q"
echo 'print(require("aiorch").root)' >"$tmp/root.lua"
check "moved: aiorch demo" "$q/bin/aiorch" demo
has "every strategy behaved as expected" || check "moved demo's verdict" false
check "moved: the command's root" "$q/bin/aiorch" run "$tmp/root.lua"
same "$(cat "$tmp/out")" "$q/share/aiorch" || check "moved command root" false
check "moved: the library's root" env LD_LIBRARY_PATH="$q/lib" "$tmp/proj/build/root"
same "$(sed -n 's/^root //p' "$tmp/out")" "$q/share/aiorch" || check "moved library root" false
check "moved: the Lua module" plain_lua "$q"
same "$(sed -n 's/^root //p' "$tmp/out")" "$q/share/aiorch" || check "moved Lua module root" false
check "AIORCH_ROOT overrides" env AIORCH_ROOT="$src" "$q/bin/aiorch" run "$tmp/root.lua"
same "$(cat "$tmp/out")" "$src" || check "AIORCH_ROOT" false

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
