#!/usr/bin/env bash
# Builds ngx_http_aiorch_module.so for the nginx of this machine, the way
# Debian builds its own nginx modules (debhelper's nginx_mod build system,
# from nginx-dev): nginx's configure from /usr/share/nginx/src, with the
# flags Debian's nginx was built with (its conf_flags: the module is then
# binary-compatible), this directory as a dynamic module, and `make
# modules` into a build directory of ours.
#   nginx/build.sh OUT_DIR LIBAIORCH_A INCLUDE_DIR
# OUT_DIR/ngx_http_aiorch_module.so is the result; configure runs once
# (again when this script or nginx/config change).
set -euo pipefail
src=/usr/share/nginx/src
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
lib=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
inc=$(cd "$3" && pwd)

if [ ! -x "$src/configure" ] || [ ! -f "$src/conf_flags" ]; then
  echo "nginx/build.sh: $src is missing: apt-get install nginx-dev" >&2
  exit 1
fi

# libaiorch.a (position-independent) goes into the module whole, with the
# shared libraries it needs.
export AIORCH_INCS="$inc"
export AIORCH_LIBS="$lib $(pkg-config --libs lua5.4 libcurl hiredis) -lev -lhttp_parser -lpthread -lm -ldl"

stamp="$out/configured"
sum=$( (cat "$here/build.sh" "$here/config"; echo "$inc $lib") | sha256sum | cut -d' ' -f1)
if [ ! -f "$out/objs/Makefile" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  # shellcheck disable=SC1091
  . "$src/conf_flags"
  (cd "$src" && ./configure \
    --with-cc-opt="$(dpkg-buildflags --get CFLAGS) -fPIC $(dpkg-buildflags --get CPPFLAGS)" \
    --with-ld-opt="$(dpkg-buildflags --get LDFLAGS) -fPIC" \
    "${NGX_CONF_FLAGS[@]}" \
    --add-dynamic-module="$here" \
    --builddir="$out/objs") >"$out/configure.log" 2>&1 || {
    echo "nginx/build.sh: nginx's configure failed; see $out/configure.log" >&2
    tail -20 "$out/configure.log" >&2
    exit 1
  }
  echo "$sum" >"$stamp"
fi
# The module links libaiorch.a: relink whenever the script runs.
rm -f "$out/objs/ngx_http_aiorch_module.so"
make -s -f "$out/objs/Makefile" -C "$src" modules >"$out/make.log" 2>&1 || {
  cat "$out/make.log" >&2
  exit 1
}
cp "$out/objs/ngx_http_aiorch_module.so" "$out/ngx_http_aiorch_module.so"
