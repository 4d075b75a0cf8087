#!/bin/sh
# CTest's layers: the runtime's C files form the layers of src/internal.h,
# each using only the layers below it. Reads the symbols each object file
# defines and takes from the others (nm), and fails on any use of a file of
# the same layer or above, naming the symbol.
#   sh tests/layers.sh OBJECT...
set -eu

# file -> layer, bottom first (src/internal.h draws the same).
rank() {
  case "$1" in
    base) echo 0 ;;
    watch | http1 | sse | loop | root | shm) echo 1 ;;
    curl_glue | server_conn) echo 2 ;;
    task) echo 3 ;;
    http | process | server | shm_lua | redis) echo 4 ;;
    module | job) echo 5 ;;
    runtime) echo 6 ;;
    main | lua_module) echo 7 ;;
    *) echo "layers: $1.c is in no layer: add it to tests/layers.sh and src/internal.h" >&2; exit 1 ;;
  esac
}

defs=$(mktemp)
trap 'rm -f "$defs"' EXIT
for o in "$@"; do
  f=$(basename "$o" | sed 's/\.c\.o$//; s/\.o$//')
  nm -g --defined-only "$o" | awk -v f="$f" '$2 ~ /^[TDBR]$/ {print $3, f}' >> "$defs"
done

bad=0
edges=0
for o in "$@"; do
  f=$(basename "$o" | sed 's/\.c\.o$//; s/\.o$//')
  r=$(rank "$f")
  for sym in $(nm -u "$o" | awk '{print $2}'); do
    g=$(awk -v s="$sym" '$1 == s {print $2; exit}' "$defs")
    [ -n "$g" ] && [ "$g" != "$f" ] || continue
    edges=$((edges + 1))
    rg=$(rank "$g")
    if [ "$rg" -ge "$r" ]; then
      echo "layers: $f.c (layer $r) uses $sym of $g.c (layer $rg)"
      bad=1
    fi
  done
done
[ "$edges" -gt 0 ] || { echo "layers: no uses found between the files: wrong input?"; exit 1; }
[ "$bad" -eq 0 ] && echo "layers: $edges uses between $# files, each downward"
exit $bad
