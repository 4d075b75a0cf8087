/* The `aiorch` module table of one runtime. */
#include "internal.h"

static char module_key;

int aiorch_push_module_cached(lua_State *L)
{
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &module_key) == LUA_TTABLE) return 1;
    lua_pop(L, 1);
    return 0;
}

int aiorch_push_module(aiorch_runtime *rt, lua_State *L)
{
    if (aiorch_push_module_cached(L)) return 1;
    lua_newtable(L);
    aiorch_task_open(rt, L);
    aiorch_http_open(rt, L);
    aiorch_server_open(rt, L);
    aiorch_process_open(rt, L);
    aiorch_shm_open(rt, L);
    aiorch_redis_open(rt, L);
    lua_pushstring(L, rt->root);
    lua_setfield(L, -2, "root");
    if (rt->user_path) {
        lua_pushstring(L, rt->user_path);
        lua_setfield(L, -2, "user_path");
    }
    lua_pushliteral(L, AIORCH_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &module_key);
    /* `require "aiorch"` finds it from any Lua code of this state. */
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "aiorch");
    lua_pop(L, 1);
    return 1;
}
