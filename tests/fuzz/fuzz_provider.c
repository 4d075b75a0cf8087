/* libFuzzer target: one provider adapter's response parsers
 * (scripts/providers/AIORCH_FUZZ_PROVIDER.lua), checked by provider.lua.
 *
 * Input: a mode byte. Even: parse_response, with the next byte choosing the
 * status, the one after whether the first line of the rest is a Retry-After
 * header, and the rest the body. Odd: the rest is an event stream, parsed
 * by src/sse.c and handed to the stream parser event by event.
 *
 * Lua is not instrumented, so a line hook counts the adapters' line-to-line
 * steps in libFuzzer's extra counters: new paths through the Lua code count
 * as new coverage. Any Lua error aborts with its message. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "aiorch.h"
#include "sse.h"

#define LUA_EDGES (1 << 16)

__attribute__((section("__libfuzzer_extra_counters"), used)) static uint8_t lua_edges[LUA_EDGES];

static const int statuses[16] = {200, 201, 204, 299, 400, 401, 403, 404,
                                 408, 413, 429, 500, 502, 503, 529, 302};

static aiorch_runtime *rt;
static lua_State *L;
static int response_ref, stream_ref;

/* lua_Hook: only lines of scripts/providers, scripts/aiorch/wire and the
 * modules they use (adapter.lua, canonical.lua, json.lua) */
static void line_hook(lua_State *l, lua_Debug *ar)
{
    static const char *src;
    static int wanted;
    static uintptr_t prev;
    uintptr_t at;

    if (!lua_getinfo(l, "S", ar)) return;
    if (ar->source != src) {
        src = ar->source;
        wanted = strstr(src, "/scripts/providers/") || strstr(src, "/scripts/aiorch/wire/") ||
                 strstr(src, "/scripts/aiorch/adapter.lua") || strstr(src, "/scripts/aiorch/canonical.lua") ||
                 strstr(src, "/scripts/aiorch/json.lua");
    }
    if (!wanted) return;
    at = (uintptr_t)src * 31 + (uintptr_t)ar->currentline;
    lua_edges[(at ^ prev) % LUA_EDGES]++;
    prev = at >> 1;
}

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_provider_%s: %s\n", AIORCH_FUZZ_PROVIDER, what);
    abort();
}

static int traceback(lua_State *l)
{
    luaL_traceback(l, l, luaL_tolstring(l, 1, NULL), 1);
    return 1;
}

static void setup(void)
{
    rt = aiorch_runtime_new(NULL);
    if (!rt) fail("no runtime");
    L = aiorch_runtime_lua(rt);
    if (luaL_loadfile(L, AIORCH_FUZZ_DIR "/provider.lua") != LUA_OK ||
        lua_pcall(L, 0, 1, 0) != LUA_OK)
        fail(lua_tostring(L, -1));
    lua_pushliteral(L, AIORCH_FUZZ_PROVIDER);
    if (lua_pcall(L, 1, 2, 0) != LUA_OK) fail(lua_tostring(L, -1));
    stream_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    response_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_sethook(L, line_hook, LUA_MASKLINE, 0);
}

/* The events of an SSE body, as http.c hands them to on_event. */
static void push_events(const char *s, size_t n)
{
    aiorch_sse p;
    aiorch_sse_event *ev;
    lua_Integer i = 0;

    aiorch_sse_init(&p);
    if (aiorch_sse_feed(&p, s, n) != 0) fail("out of memory");
    lua_newtable(L);
    while ((ev = aiorch_sse_pop(&p))) {
        lua_createtable(L, 0, 3);
        lua_pushstring(L, ev->event);
        lua_setfield(L, -2, "event");
        lua_pushlstring(L, ev->data, ev->data_len);
        lua_setfield(L, -2, "data");
        if (ev->id) {
            lua_pushstring(L, ev->id);
            lua_setfield(L, -2, "id");
        }
        lua_rawseti(L, -2, ++i);
        aiorch_sse_event_free(ev);
    }
    aiorch_sse_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    int nargs;

    if (!rt) setup();
    if (size < 1) return 0;
    lua_pushcfunction(L, traceback);
    if (data[0] & 1) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, stream_ref);
        push_events(s + 1, size - 1);
        nargs = 1;
    } else {
        const char *body;
        size_t n;
        if (size < 3) {
            lua_pop(L, 1);
            return 0;
        }
        body = s + 3;
        n = size - 3;
        lua_rawgeti(L, LUA_REGISTRYINDEX, response_ref);
        lua_pushinteger(L, statuses[data[1] & 15]);
        lua_createtable(L, 0, 2);
        lua_pushliteral(L, "application/json");
        lua_setfield(L, -2, "content-type");
        if (data[2] & 1) {
            const char *nl = memchr(body, '\n', n);
            size_t k = nl ? (size_t)(nl - body) : n;
            lua_pushlstring(L, body, k);
            lua_setfield(L, -2, "retry-after");
            body += nl ? k + 1 : k;
            n -= nl ? k + 1 : k;
        }
        lua_pushlstring(L, body, n);
        nargs = 3;
    }
    if (lua_pcall(L, nargs, 0, -nargs - 2) != LUA_OK) fail(lua_tostring(L, -1));
    lua_pop(L, 1);
    /* Frees this input's garbage now, or libFuzzer's per-input leak check
     * would run (slowly) whenever Lua kept more than it freed. */
    lua_gc(L, LUA_GCCOLLECT);
    return 0;
}
