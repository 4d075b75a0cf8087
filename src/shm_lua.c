/* aiorch.shm: the shared dictionary of src/shm.c, for Lua.
 *
 *   local d = aiorch.shm.open(8 * 1024 * 1024)   -- a new anonymous segment
 *   local d = aiorch.shm.attach(fd)             -- one a parent passed down
 *   d:incr("hits", 1, 0) --> 1
 *
 * Misuse (a bad key, a closed dictionary) raises; a full dictionary answers
 * nil, "full", message. No call yields: each holds the lock for the few
 * instructions of one operation. */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "shm.h"

#define SHM_MT "aiorch.shm.dict"
#define SHM_MANY_MAX 4096 /* pairs in one incr_many */
#define SHM_FULL_MSG "the shared dictionary is full (its size is the configuration's shared_memory)"

typedef struct shm_ud {
    aiorch_shm *d;
} shm_ud;

static aiorch_shm *check_dict(lua_State *L)
{
    shm_ud *u = luaL_checkudata(L, 1, SHM_MT);
    if (!u->d) luaL_error(L, "shm: the dictionary is closed");
    return u->d;
}

static const char *check_key(lua_State *L, int idx, size_t *len)
{
    const char *k = luaL_checklstring(L, idx, len);
    luaL_argcheck(L, *len >= 1 && *len <= AIORCH_SHM_KEY_MAX, idx, "a key is 1 to 224 bytes");
    return k;
}

static double check_value(lua_State *L, int idx)
{
    double v = luaL_checknumber(L, idx);
    luaL_argcheck(L, !isnan(v), idx, "a value must not be NaN");
    return v;
}

static double check_ttl(lua_State *L, int idx)
{
    double ttl;
    if (lua_isnoneornil(L, idx)) return 0;
    ttl = luaL_checknumber(L, idx);
    luaL_argcheck(L, ttl >= 0 && isfinite(ttl), idx, "ttl must be >= 0 ms (0: never expires)");
    return ttl;
}

/* Integral values come back as integers, so that counters print as such. */
static void push_value(lua_State *L, double v)
{
    if (v == floor(v) && fabs(v) < 9007199254740992.0)
        lua_pushinteger(L, (lua_Integer)v);
    else
        lua_pushnumber(L, v);
}

static int push_fail(lua_State *L, const char *kind, const char *msg)
{
    luaL_pushfail(L);
    lua_pushstring(L, kind);
    lua_pushstring(L, msg);
    return 3;
}

/* The results every method shares: full fails softly, a lock error raises. */
static int push_soft(lua_State *L, int r)
{
    if (r == AIORCH_SHM_FULL) return push_fail(L, "full", SHM_FULL_MSG);
    return luaL_error(L, "shm: the dictionary's lock failed");
}

static int push_dict(lua_State *L, aiorch_shm *d)
{
    shm_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
    u->d = d;
    luaL_setmetatable(L, SHM_MT);
    return 1;
}

/* aiorch.shm.open(size_bytes) → dict | nil, "shm", message */
static int l_open(lua_State *L)
{
    lua_Integer size = luaL_checkinteger(L, 1);
    char err[256];
    aiorch_shm *d;
    luaL_argcheck(L, size >= AIORCH_SHM_MIN_SIZE && (size_t)size <= AIORCH_SHM_MAX_SIZE, 1,
                  "size must be 64 KiB to 1 GiB");
    d = aiorch_shm_create((size_t)size, err, sizeof err);
    if (!d) return push_fail(L, "shm", err);
    return push_dict(L, d);
}

/* aiorch.shm.attach(fd) → dict | nil, "shm", message. The descriptor is
 * closed once mapped. */
static int l_attach(lua_State *L)
{
    lua_Integer fd = luaL_checkinteger(L, 1);
    char err[256];
    aiorch_shm *d;
    luaL_argcheck(L, fd >= 0 && fd <= 1 << 30, 1, "not a descriptor");
    d = aiorch_shm_attach((int)fd, err, sizeof err);
    if (!d) return push_fail(L, "shm", err);
    aiorch_shm_release_fd(d);
    return push_dict(L, d);
}

/* d:get(key) → value | nil */
static int l_get(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    size_t len;
    const char *k = check_key(L, 2, &len);
    double v;
    int r = aiorch_shm_get(d, k, len, &v);
    if (r == AIORCH_SHM_OK) {
        push_value(L, v);
        return 1;
    }
    if (r == AIORCH_SHM_NOT_FOUND) return 0;
    return push_soft(L, r);
}

/* d:set(key, value[, ttl_ms]) → true | nil, "full", message */
static int l_set(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    size_t len;
    const char *k = check_key(L, 2, &len);
    int r = aiorch_shm_set(d, k, len, check_value(L, 3), check_ttl(L, 4));
    if (r != AIORCH_SHM_OK) return push_soft(L, r);
    lua_pushboolean(L, 1);
    return 1;
}

/* d:add(key, value[, ttl_ms]) → true | false (present) | nil, "full", message */
static int l_add(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    size_t len;
    const char *k = check_key(L, 2, &len);
    int r = aiorch_shm_add(d, k, len, check_value(L, 3), check_ttl(L, 4));
    if (r != AIORCH_SHM_OK && r != AIORCH_SHM_EXISTS) return push_soft(L, r);
    lua_pushboolean(L, r == AIORCH_SHM_OK);
    return 1;
}

/* d:incr(key, n[, init[, ttl_ms]]) → value | nil, "not_found", message | nil, "full", message */
static int l_incr(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    size_t len;
    const char *k = check_key(L, 2, &len);
    double n = check_value(L, 3), init = 0, out;
    int has_init = !lua_isnoneornil(L, 4), r;
    if (has_init) init = check_value(L, 4);
    r = aiorch_shm_incr(d, k, len, n, has_init ? &init : NULL, check_ttl(L, 5), &out);
    if (r == AIORCH_SHM_NOT_FOUND)
        return push_fail(L, "not_found", "no such key (and no init value)");
    if (r != AIORCH_SHM_OK) return push_soft(L, r);
    push_value(L, out);
    return 1;
}

/* d:cas(key, old, new[, ttl_ms]) → true | false, current (nil: absent) |
 * nil, "full", message. old nil: set only when absent. */
static int l_cas(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    size_t len;
    const char *k = check_key(L, 2, &len);
    double old = 0, cur = 0;
    int has_old = !lua_isnil(L, 3), r;
    luaL_checkany(L, 3);
    if (has_old) old = check_value(L, 3);
    r = aiorch_shm_cas(d, k, len, has_old ? &old : NULL, check_value(L, 4), check_ttl(L, 5), &cur);
    if (r == AIORCH_SHM_OK) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (r == AIORCH_SHM_CHANGED || r == AIORCH_SHM_NOT_FOUND) {
        lua_pushboolean(L, 0);
        if (r == AIORCH_SHM_NOT_FOUND)
            lua_pushnil(L);
        else
            push_value(L, cur);
        return 2;
    }
    return push_soft(L, r);
}

/* d:delete(key) → true (it was there) | false */
static int l_delete(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    size_t len;
    const char *k = check_key(L, 2, &len);
    int r = aiorch_shm_delete(d, k, len);
    if (r != AIORCH_SHM_OK && r != AIORCH_SHM_NOT_FOUND) return push_soft(L, r);
    lua_pushboolean(L, r == AIORCH_SHM_OK);
    return 1;
}

/* d:incr_many{k1, n1, k2, n2, ...} → v1, v2, ... | nil, "full", message:
 * all under one lock, all or none; absent keys start at 0. */
static int l_incr_many(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    lua_Integer len, i;
    size_t n;
    aiorch_shm_delta *ops;
    double *out;
    int r;
    luaL_checktype(L, 2, LUA_TTABLE);
    len = luaL_len(L, 2);
    luaL_argcheck(L, len % 2 == 0, 2, "a list of key, n pairs");
    luaL_argcheck(L, len / 2 <= SHM_MANY_MAX, 2, "at most 4096 pairs");
    n = (size_t)(len / 2);
    if (n == 0) return 0;
    luaL_checkstack(L, (int)n + 2, "too many results");
    ops = lua_newuserdatauv(L, n * (sizeof *ops + sizeof *out), 0); /* collected with the call */
    out = (double *)(ops + n);
    for (i = 0; i < (lua_Integer)n; i++) {
        size_t klen;
        int tk = lua_rawgeti(L, 2, 2 * i + 1), tn = lua_rawgeti(L, 2, 2 * i + 2);
        if (tk != LUA_TSTRING)
            return luaL_argerror(
                L, 2, lua_pushfstring(L, "item %d: a key must be a string", (int)(2 * i + 1)));
        if (tn != LUA_TNUMBER)
            return luaL_argerror(L, 2,
                                 lua_pushfstring(L, "item %d: must be a number", (int)(2 * i + 2)));
        ops[i].key = lua_tolstring(L, -2, &klen); /* kept alive by the table */
        ops[i].len = klen;
        ops[i].n = lua_tonumber(L, -1);
        if (klen < 1 || klen > AIORCH_SHM_KEY_MAX)
            return luaL_argerror(L, 2, "a key is 1 to 224 bytes");
        if (isnan(ops[i].n)) return luaL_argerror(L, 2, "a value must not be NaN");
        lua_pop(L, 2);
    }
    r = aiorch_shm_incr_many(d, ops, n, out);
    if (r != AIORCH_SHM_OK) return push_soft(L, r);
    for (i = 0; i < (lua_Integer)n; i++)
        push_value(L, out[i]);
    return (int)n;
}

/* d:items([prefix]) → {key = value, ...}: the live entries under prefix */
static int l_items(lua_State *L)
{
    aiorch_shm *d = check_dict(L);
    size_t plen, cap = 64, total, i;
    const char *prefix = luaL_optlstring(L, 2, "", &plen);
    aiorch_shm_item *buf;
    for (;;) {
        int r;
        buf = lua_newuserdatauv(L, cap * sizeof *buf, 0);
        r = aiorch_shm_items(d, prefix, plen, buf, cap, &total);
        if (r != AIORCH_SHM_OK) return push_soft(L, r);
        if (total <= cap) break;
        lua_pop(L, 1);
        cap = total + total / 4; /* room for entries added meanwhile */
    }
    lua_createtable(L, 0, (int)total);
    for (i = 0; i < total; i++) {
        lua_pushlstring(L, buf[i].key, buf[i].len);
        push_value(L, buf[i].value);
        lua_rawset(L, -3);
    }
    return 1;
}

/* d:stats() → {size, capacity, used, repairs, full} */
static int l_stats(lua_State *L)
{
    aiorch_shm_stats st;
    aiorch_shm_stats_get(check_dict(L), &st);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, (lua_Integer)st.size);
    lua_setfield(L, -2, "size");
    lua_pushinteger(L, st.capacity);
    lua_setfield(L, -2, "capacity");
    lua_pushinteger(L, st.used);
    lua_setfield(L, -2, "used");
    lua_pushinteger(L, (lua_Integer)st.repairs);
    lua_setfield(L, -2, "repairs");
    lua_pushinteger(L, (lua_Integer)st.full);
    lua_setfield(L, -2, "full");
    return 1;
}

/* d:fd() → the descriptor to pass to a child (aiorch.process.spawn's
 * pass_fds), or nil for an attached dictionary */
static int l_fd(lua_State *L)
{
    int fd = aiorch_shm_fd(check_dict(L));
    if (fd < 0) return 0;
    lua_pushinteger(L, fd);
    return 1;
}

/* d:close(), __gc and __close: unmaps this process's view */
static int l_close(lua_State *L)
{
    shm_ud *u = luaL_checkudata(L, 1, SHM_MT);
    if (u->d) aiorch_shm_close(u->d);
    u->d = NULL;
    return 0;
}

static int l_tostring(lua_State *L)
{
    shm_ud *u = luaL_checkudata(L, 1, SHM_MT);
    lua_pushfstring(L, "aiorch.shm.dict (%s)", u->d ? "open" : "closed");
    return 1;
}

static const luaL_Reg shm_funcs[] = {
    {"open", l_open},
    {"attach", l_attach},
    {NULL, NULL},
};

static const luaL_Reg dict_methods[] = {
    {"get", l_get},
    {"set", l_set},
    {"add", l_add},
    {"incr", l_incr},
    {"cas", l_cas},
    {"delete", l_delete},
    {"incr_many", l_incr_many},
    {"items", l_items},
    {"stats", l_stats},
    {"fd", l_fd},
    {"close", l_close},
    {NULL, NULL},
};

static const luaL_Reg dict_meta[] = {
    {"__gc", l_close},
    {"__close", l_close},
    {"__tostring", l_tostring},
    {NULL, NULL},
};

void aiorch_shm_open(aiorch_runtime *rt, lua_State *L)
{
    (void)rt;
    if (luaL_newmetatable(L, SHM_MT)) {
        luaL_setfuncs(L, dict_meta, 0);
        luaL_newlib(L, dict_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    luaL_newlib(L, shm_funcs);
    lua_pushinteger(L, AIORCH_SHM_KEY_MAX);
    lua_setfield(L, -2, "key_max");
    lua_setfield(L, -2, "shm");
}
