/* luaopen_aiorch: `require "aiorch"` from a plain lua5.4. The runtime then
 * shares the host's lua_State, makes its own loop, and aiorch.run drives it. */
#define _GNU_SOURCE /* dladdr, RTLD_NODELETE */
#include <dlfcn.h>
#include <stdlib.h>

#include "internal.h"

#define GUARD_MT "aiorch.runtime"

/* __gc of the guard: the host closes its state, the runtime goes with it. */
static int guard_gc(lua_State *L)
{
    aiorch_runtime **box = luaL_checkudata(L, 1, GUARD_MT);
    aiorch_runtime *rt = *box;
    if (!rt) return 0;
    *box = NULL;
    aiorch_runtime_teardown(rt);
    ev_loop_destroy(rt->loop);
    free(rt);
    return 0;
}

/* Once loaded, the module stays: closing the Lua state does not unload it,
 * nor libcurl and the libraries with thread-local storage it brings (gnutls,
 * libstdc++...). Unloading them gains nothing at exit, and LeakSanitizer's
 * scan after it reads their freed thread-local storage and crashes. */
int luaopen_aiorch(lua_State *L);

static void stay_loaded(void)
{
    Dl_info info;
    if (dladdr((void *)luaopen_aiorch, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

int luaopen_aiorch(lua_State *L)
{
    if (aiorch_push_module_cached(L)) return 1;
    stay_loaded();
    aiorch_runtime *rt = calloc(1, sizeof *rt);
    if (!rt) return luaL_error(L, "aiorch: out of memory");
    rt->loop = ev_loop_new(EVFLAG_AUTO);
    rt->own_loop = 1;
    if (!rt->loop) {
        free(rt);
        return luaL_error(L, "aiorch: cannot create an event loop");
    }
    aiorch_runtime **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = rt;
    if (luaL_newmetatable(L, GUARD_MT)) {
        lua_pushcfunction(L, guard_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    luaL_ref(L, LUA_REGISTRYINDEX); /* lives until lua_close */
    if (aiorch_runtime_init(rt, L, NULL) != 0)
        return luaL_error(L, "aiorch: cannot start the runtime");
    return aiorch_push_module(rt, L);
}
