/* The request object and the response writer that every host shares, and
 * aiorch.server, the Lua binding of the runtime's own HTTP/1.1 server.
 *
 * A handler (aiorch_handler) is the Lua side of a server: handler(req,
 * res) with its hooks on_headers and on_refuse. An exchange is one request
 * to it: the res userdata itself. From its head on, an exchange holds
 * registry references to its req table, its res and (once started) its
 * handler task, and writes through the host's aiorch_http_sink, until its
 * response ends or the host drops it. The task runs handler_task, which
 * completes the response when the handler returns or raises; a guard
 * closed with the task covers the handler being cancelled.
 *
 * The hosts: server_conn.c (HTTP/1.1 on the runtime's loop, through the
 * srv_hooks below) and, through aiorch.h, the nginx module. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http1.h"
#include "internal.h"
#include "server_conn.h"

#define SRV_MT "aiorch.server"
#define RES_MT "aiorch.server.response"
#define GUARD_MT "aiorch.server.guard"

/* The defaults of the limits (docs/limits.md lists them all). */
#define SRV_DEFAULT_MAX_BODY (1024 * 1024)
#define SRV_DEFAULT_MAX_HEADER (32 * 1024) /* request line + headers; 431 beyond */
#define SRV_DEFAULT_MAX_CONNS 10000
#define SRV_DEFAULT_MAX_BUFFERED (256 * 1024 * 1024)
#define SRV_DEFAULT_HEADER_TIMEOUT_MS 10000
#define SRV_DEFAULT_BODY_TIMEOUT_MS 60000
#define SRV_DEFAULT_READ_TIMEOUT_MS 30000
#define SRV_DEFAULT_IDLE_TIMEOUT_MS 75000
#define SRV_DEFAULT_SEND_TIMEOUT_MS 60000

#define STACK_HEADERS 32

struct aiorch_handler {
    aiorch_runtime *rt;
    int fn_ref, headers_ref, refuse_ref; /* LUA_NOREF when absent */
    size_t max_body;
    lua_Integer next_id, requests, aborted;
    int in_hook; /* inside on_headers or on_refuse */
    long nopen;  /* exchanges not ended */
    int loaded;  /* by aiorch_handler_load: on rt->handlers, freed with it */
    int dying;   /* freed while exchanges were open: goes with the last */
    aiorch_handler *prev, *next;
};

/* A task blocked in res:write until the host's backlog drains. */
typedef struct srv_waiter {
    aiorch_op op; /* first member: the scheduler hands back &op */
    aiorch_task *task;
    struct srv_waiter *next, **pprev;
} srv_waiter;

struct aiorch_exchange {
    aiorch_runtime *rt;
    aiorch_handler *h;
    aiorch_exchange *prev, *next; /* rt->exchanges: the open ones */
    const aiorch_http_sink *sink;
    void *ud; /* the host's; NULL once the exchange ended */
    int req_ref, self_ref, task_ref;
    aiorch_task *task;
    srv_waiter *waiters;
    int status;
    uint64_t length, sent;
    unsigned started : 1, finished : 1, has_length : 1, no_body : 1, head : 1, running : 1;
};

/* Closed with the handler task; still armed then means it never finished. */
typedef struct srv_guard {
    aiorch_exchange *x;
} srv_guard;

/* The Lua userdata of aiorch.server.listen. */
typedef struct srv_lua {
    aiorch_handler h;
    aiorch_runtime *rt;
    srv_listener *l; /* NULL once closed */
    int self_ref;
    struct srv_lua *prev, *next; /* rt->servers */
    aiorch_task *shut_task;
    aiorch_op shut_op;
    int port;
    char host[256];
} srv_lua;

static const srv_hooks conn_hooks;

/* ---- handlers --------------------------------------------------------- */

static void handler_init(aiorch_handler *h, aiorch_runtime *rt)
{
    memset(h, 0, sizeof *h);
    h->rt = rt;
    h->fn_ref = h->headers_ref = h->refuse_ref = LUA_NOREF;
}

static void handler_unref(aiorch_handler *h)
{
    lua_State *S = h->rt->S;
    luaL_unref(S, LUA_REGISTRYINDEX, h->fn_ref);
    luaL_unref(S, LUA_REGISTRYINDEX, h->headers_ref);
    luaL_unref(S, LUA_REGISTRYINDEX, h->refuse_ref);
    h->fn_ref = h->headers_ref = h->refuse_ref = LUA_NOREF;
}

static void handler_release(aiorch_handler *h)
{
    aiorch_runtime *rt = h->rt;
    if (h->prev)
        h->prev->next = h->next;
    else
        rt->handlers = h->next;
    if (h->next) h->next->prev = h->prev;
    handler_unref(h);
    free(h);
}

/* ---- backpressure waiters --------------------------------------------- */

static void waiter_unlink(srv_waiter *w)
{
    *w->pprev = w->next;
    if (w->next) w->next->pprev = w->pprev;
}

/* aiorch_op.cancel: the waiting task was cancelled; forget it */
static void waiter_cancel(aiorch_op *op)
{
    srv_waiter *w = (srv_waiter *)op;
    waiter_unlink(w);
    free(w);
}

/* Resumes a task blocked in res:write with true or nil, "closed", message. */
static void waiter_wake(srv_waiter *w, int ok)
{
    aiorch_task *t = w->task;
    lua_State *co = aiorch_task_thread(t);
    waiter_unlink(w);
    free(w);
    lua_checkstack(co, 3);
    if (ok) {
        lua_pushboolean(co, 1);
        aiorch_task_wake(t, 1);
    } else {
        luaL_pushfail(co);
        lua_pushliteral(co, "closed");
        lua_pushliteral(co, "the client closed the connection");
        aiorch_task_wake(t, 3);
    }
}

/* ---- the end of an exchange ------------------------------------------- */

/* x ends: the host is not called again; writers still waiting hear it is
 * closed; the references go (the task keeps itself and res alive). */
static void exchange_end(aiorch_exchange *x)
{
    lua_State *S = x->rt->S;
    aiorch_handler *h = x->h;

    x->ud = NULL;
    x->sink = NULL;
    if (x->prev)
        x->prev->next = x->next;
    else
        x->rt->exchanges = x->next;
    if (x->next) x->next->prev = x->prev;
    x->prev = x->next = NULL;
    while (x->waiters)
        waiter_wake(x->waiters, 0);
    luaL_unref(S, LUA_REGISTRYINDEX, x->req_ref);
    luaL_unref(S, LUA_REGISTRYINDEX, x->task_ref);
    x->req_ref = x->task_ref = LUA_NOREF;
    x->task = NULL;
    if (h) {
        x->h = NULL;
        h->nopen--;
        if (h->dying && h->nopen == 0) handler_release(h);
    }
    luaL_unref(S, LUA_REGISTRYINDEX, x->self_ref); /* last: x may be collected from here */
    x->self_ref = LUA_NOREF;
}

/* The host dropped x: the client went away (aborted: its request marked,
 * and counted) or the server closes. A handler still running is cancelled. */
static void exchange_drop(aiorch_exchange *x, int aborted)
{
    aiorch_task *task = x->task;
    lua_State *S = x->rt->S;

    if (!x->ud) return;
    x->ud = NULL; /* Lua run by the cancellation below must not reach the host */
    x->sink = NULL;
    if (x->running && aborted) {
        if (x->h) x->h->aborted++;
        lua_checkstack(S, 3);
        if (lua_rawgeti(S, LUA_REGISTRYINDEX, x->req_ref) == LUA_TTABLE) {
            lua_pushliteral(S, "aborted_at");
            lua_pushnumber(S, aiorch_now_ms());
            lua_rawset(S, -3);
        }
        lua_pop(S, 1);
    }
    if (x->running && task) aiorch_task_cancel(task);
    exchange_end(x);
}

/* ---- headers: Lua tables to the host's arrays --------------------------- */

/* The header arrays of one response, anchored on the Lua stack. */
typedef struct hdr_list {
    aiorch_header *v;
    size_t n, cap;
    aiorch_header stack[STACK_HEADERS];
    int anchor; /* a table on the stack keeping converted strings alive */
} hdr_list;

static void hdrs_init(lua_State *L, hdr_list *hl)
{
    hl->v = hl->stack;
    hl->n = 0;
    hl->cap = STACK_HEADERS;
    lua_newtable(L);
    hl->anchor = lua_gettop(L);
}

/* Adds a header; raises when out of memory. */
static void hdrs_add(lua_State *L, hdr_list *hl, const char *name, size_t nl, const char *val,
                     size_t vl)
{
    if (hl->n == hl->cap) {
        size_t cap = hl->cap * 2;
        aiorch_header *nv = lua_newuserdatauv(L, cap * sizeof *nv, 0);
        memcpy(nv, hl->v, hl->n * sizeof *nv);
        lua_rawseti(L, hl->anchor, (lua_Integer)lua_rawlen(L, hl->anchor) + 1);
        hl->v = nv;
        hl->cap = cap;
    }
    hl->v[hl->n].name = name;
    hl->v[hl->n].name_len = nl;
    hl->v[hl->n].value = val;
    hl->v[hl->n].value_len = vl;
    hl->n++;
}

/* The value at -1 as a string that stays alive (a number is converted
 * and anchored). NULL when it is neither. */
static const char *hdr_value(lua_State *L, hdr_list *hl, size_t *vl)
{
    const char *v;
    if (lua_type(L, -1) == LUA_TSTRING) return lua_tolstring(L, -1, vl);
    if (lua_type(L, -1) != LUA_TNUMBER) return NULL;
    lua_pushvalue(L, -1);
    v = lua_tolstring(L, -1, vl);
    lua_rawseti(L, hl->anchor, (lua_Integer)lua_rawlen(L, hl->anchor) + 1);
    return v;
}

/* One entry of a res:start / res:respond headers table: key at -2, value
 * at -1. The framing headers are the host's: content-length sets the
 * length (a body of known length takes its own), transfer-encoding is
 * dropped, connection: close closes. Returns an error message or NULL. */
static const char *res_header(lua_State *L, aiorch_exchange *x, hdr_list *hl, int64_t body_len,
                              int *close)
{
    const char *name, *val;
    size_t nl, vl;

    if (lua_type(L, -2) != LUA_TSTRING) return "header names must be strings";
    name = lua_tolstring(L, -2, &nl);
    if (!aiorch_h1_is_token(name, nl)) return "invalid header name";
    if (lua_type(L, -1) == LUA_TTABLE) { /* repeated header: one line each */
        lua_Integer i, n = luaL_len(L, -1);
        if (aiorch_h1_name_is(name, nl, "content-length") ||
            aiorch_h1_name_is(name, nl, "transfer-encoding") ||
            aiorch_h1_name_is(name, nl, "connection"))
            return "invalid header value";
        for (i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            val = hdr_value(L, hl, &vl);
            if (!val) return "header values must be strings";
            if (!aiorch_h1_is_field_value(val, vl)) return "invalid header value";
            hdrs_add(L, hl, name, nl, val, vl);
            lua_pop(L, 1);
        }
        return NULL;
    }
    val = hdr_value(L, hl, &vl);
    if (!val) return "header values must be strings or numbers";
    if (!aiorch_h1_is_field_value(val, vl)) return "invalid header value";
    if (aiorch_h1_name_is(name, nl, "content-length")) {
        uint64_t v = 0;
        size_t i;
        if (vl == 0 || vl > 19) return "invalid content-length";
        for (i = 0; i < vl; i++) {
            if (val[i] < '0' || val[i] > '9') return "invalid content-length";
            v = v * 10 + (uint64_t)(val[i] - '0');
        }
        if (body_len >= 0 && !x->head) return NULL; /* ours, from the body, is sent */
        x->has_length = 1;
        x->length = v;
        return NULL;
    }
    if (aiorch_h1_name_is(name, nl, "transfer-encoding")) return NULL; /* the framing is ours */
    if (aiorch_h1_name_is(name, nl, "connection")) {
        if (aiorch_h1_has_token(val, vl, "close")) *close = 1;
        return NULL;
    }
    hdrs_add(L, hl, name, nl, val, vl);
    return NULL;
}

/* ---- responses -------------------------------------------------------- */

/* Sends the status and headers (hidx: the headers table or 0; type: a
 * content type of ours, or NULL). body_len < 0: the length is not known
 * (res:start). Returns an error message (the head was not sent), NULL, or
 * "" when the client is gone. */
static const char *res_head(lua_State *L, aiorch_exchange *x, int status, int hidx,
                            int64_t body_len, const char *type)
{
    aiorch_http_response res;
    hdr_list hl;
    int close = 0, top = lua_gettop(L), rc;
    const char *err = NULL;

    lua_checkstack(L, 8);
    hdrs_init(L, &hl);
    x->has_length = 0;
    if (type) hdrs_add(L, &hl, "content-type", 12, type, strlen(type));
    if (hidx) {
        lua_pushnil(L);
        while (lua_next(L, hidx)) {
            if ((err = res_header(L, x, &hl, body_len, &close)) != NULL) break;
            lua_pop(L, 1);
        }
    }
    if (err) {
        lua_settop(L, top);
        x->has_length = 0;
        return err;
    }
    x->no_body = x->head || status < 200 || status == 204 || status == 304;
    res.status = status;
    res.headers = hl.v;
    res.nheaders = hl.n;
    res.length = x->has_length ? (long long)x->length : body_len >= 0 ? body_len : -1;
    res.close = close;
    x->started = 1;
    x->status = status;
    rc = x->sink->head(x->ud, &res);
    lua_settop(L, top);
    return rc < 0 || !x->ud ? "" : NULL;
}

/* Sends body bytes; last ends the body (and the exchange). Returns the
 * host's backlog, or -1 when the client is gone. */
static long res_body(aiorch_exchange *x, const char *data, size_t n, int last)
{
    long pending;
    if (x->no_body) n = 0;
    x->sent += n;
    pending = x->sink->body(x->ud, data, n, last);
    if (pending < 0 || !x->ud) return -1;
    if (last) {
        x->finished = 1;
        exchange_end(x);
    }
    return pending;
}

/* Cuts the response short: the host closes the connection. */
static void res_cut(aiorch_exchange *x)
{
    const aiorch_http_sink *sink = x->sink;
    void *ud = x->ud;
    if (!ud) return;
    exchange_end(x);
    sink->abort(ud);
}

/* The handler task ended and its response is still open. */
static void res_end(lua_State *L, aiorch_exchange *x, int failed, int res_idx)
{
    static const char oops[] = "internal server error\n";

    if (!x->started) {
        const char *body = failed ? oops : "", *type = failed ? "text/plain" : NULL;
        size_t n = failed ? sizeof oops - 1 : 0;
        const char *err;
        /* A failed handler's answer may be set beforehand (res:on_error). */
        if (failed && lua_getiuservalue(L, res_idx, 1) == LUA_TSTRING) {
            body = lua_tolstring(L, -1, &n);
            lua_getiuservalue(L, res_idx, 2);
            type = lua_tostring(L, -1);
        }
        err = res_head(L, x, failed ? 500 : x->status, 0, (int64_t)n, type);
        if (err && *err) res_cut(x);
        if (!err) res_body(x, body, n, 1);
        return;
    }
    /* A cut-short body must not look complete: close instead. */
    if (failed || (x->has_length && !x->no_body && x->sent != x->length)) {
        res_cut(x);
        return;
    }
    res_body(x, NULL, 0, 1);
}

static aiorch_exchange *res_check(lua_State *L, int i)
{
    return luaL_checkudata(L, i, RES_MT);
}

static int res_status_arg(lua_State *L, int i)
{
    lua_Integer st = luaL_checkinteger(L, i);
    luaL_argcheck(L, st >= 200 && st <= 999, i, "status must be in 200..999");
    return (int)st;
}

static void res_usable(lua_State *L, aiorch_exchange *x)
{
    if (x->finished) luaL_error(L, "response already finished");
}

static int res_closed(lua_State *L)
{
    luaL_pushfail(L);
    lua_pushliteral(L, "closed");
    lua_pushliteral(L, "the client closed the connection");
    return 3;
}

/* res:start(status[, headers]) */
static int res_start(lua_State *L)
{
    aiorch_exchange *x = res_check(L, 1);
    int status = res_status_arg(L, 2);
    const char *err;

    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    res_usable(L, x);
    if (x->started) return luaL_error(L, "response already started");
    if (!x->ud) return res_closed(L);
    err = res_head(L, x, status, lua_istable(L, 3) ? 3 : 0, -1, NULL);
    if (err && *err) return luaL_argerror(L, 3, err);
    if (err || res_body(x, NULL, 0, 0) < 0) return res_closed(L); /* the head goes out now */
    lua_pushboolean(L, 1);
    return 1;
}

/* res:write(data): waits while more than AIORCH_HTTP_BACKLOG is unsent */
static int res_write(lua_State *L)
{
    aiorch_exchange *x = res_check(L, 1);
    size_t n;
    const char *data = luaL_checklstring(L, 2, &n);
    aiorch_task *t;
    srv_waiter *w;
    long pending;

    res_usable(L, x);
    t = aiorch_task_require(x->rt, L, "response:write");
    if (!x->ud) return res_closed(L);
    if (!x->started) {
        const char *err = res_head(L, x, x->status, 0, -1, NULL);
        if (err && *err) return luaL_error(L, "%s", err);
        if (err) return res_closed(L);
    }
    if (x->has_length && !x->no_body && n > x->length - x->sent)
        return luaL_error(L, "body exceeds its content-length");
    pending = res_body(x, data, n, 0);
    if (pending < 0) return res_closed(L);
    if (pending <= AIORCH_HTTP_BACKLOG) {
        lua_pushboolean(L, 1);
        return 1;
    }
    w = malloc(sizeof *w);
    if (!w) return luaL_error(L, "out of memory");
    w->op.cancel = waiter_cancel;
    w->task = t;
    w->next = x->waiters;
    if (w->next) w->next->pprev = &w->next;
    w->pprev = &x->waiters;
    x->waiters = w;
    aiorch_task_wait(t, &w->op);
    return lua_yield(L, 0);
}

/* res:finish([data]) */
static int res_finish(lua_State *L)
{
    aiorch_exchange *x = res_check(L, 1);
    size_t n = 0;
    const char *data = luaL_optlstring(L, 2, NULL, &n);

    res_usable(L, x);
    if (!x->ud) return res_closed(L);
    if (!x->started) {
        const char *err = res_head(L, x, x->status, 0, (int64_t)n, NULL);
        if (err && *err) return luaL_error(L, "%s", err);
        if (err) return res_closed(L);
    } else if (x->has_length && !x->no_body && x->sent + n != x->length) {
        return luaL_error(L, x->sent + n > x->length ? "body exceeds its content-length"
                                                     : "body shorter than its content-length");
    }
    if (res_body(x, data, n, 1) < 0) return res_closed(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* res:respond(status, headers, body) */
static int res_respond(lua_State *L)
{
    aiorch_exchange *x = res_check(L, 1);
    int status = res_status_arg(L, 2);
    size_t n;
    const char *body, *err;

    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    body = luaL_optlstring(L, 4, "", &n);
    res_usable(L, x);
    if (x->started) return luaL_error(L, "response already started");
    if (!x->ud) return res_closed(L);
    err = res_head(L, x, status, lua_istable(L, 3) ? 3 : 0, (int64_t)n, NULL);
    if (err && *err) return luaL_argerror(L, 3, err);
    if (err || res_body(x, body, n, 1) < 0) return res_closed(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* res:on_error(body[, content_type]): what a 500 carries if the handler
 * fails before it starts the response (default: a plain-text line). */
static int res_on_error(lua_State *L)
{
    res_check(L, 1);
    luaL_checkstring(L, 2);
    size_t tl;
    const char *type = luaL_optlstring(L, 3, "application/json", &tl);
    luaL_argcheck(L, tl < 100 && !strpbrk(type, "\r\n"), 3, "bad content type");
    lua_settop(L, 3);
    lua_pushstring(L, type);
    lua_setiuservalue(L, 1, 2);
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, 1, 1);
    return 0;
}

/* res:abort(): cuts the connection, whatever was sent */
static int res_abort(lua_State *L)
{
    res_cut(res_check(L, 1));
    return 0;
}

static int res_tostring(lua_State *L)
{
    aiorch_exchange *x = res_check(L, 1);
    lua_pushfstring(L, "aiorch.server.response (%s)",
                    x->finished ? "finished"
                    : x->ud     ? "open"
                                : "closed");
    return 1;
}

/* ---- the handler task ------------------------------------------------- */

static int handler_traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void handler_report(lua_State *L, aiorch_runtime *rt)
{
    const char *msg = lua_tostring(L, -1), *method, *path;
    lua_checkstack(L, 2);
    lua_pushliteral(L, "method");
    lua_rawget(L, 2);
    method = lua_tostring(L, -1);
    lua_pushliteral(L, "path");
    lua_rawget(L, 2);
    path = lua_tostring(L, -1);
    aiorch_report(rt, "aiorch.server: handler for %s %s failed: %s", method ? method : "?",
                  path ? path : "?", msg ? msg : "(error object is not a string)");
    lua_pop(L, 2);
}

/* lua_pcallk continuation: the handler returned or raised. */
static int handler_done(lua_State *L, int status, lua_KContext ctx)
{
    srv_guard *g = lua_touserdata(L, 4);
    aiorch_exchange *x = g->x;
    int failed = status != LUA_OK && status != LUA_YIELD;

    (void)ctx;
    if (!x) return 0;
    g->x = NULL; /* disarm: the guard's __close runs as we return */
    if (failed) handler_report(L, x->rt);
    if (x->ud) res_end(L, x, failed, 3);
    return 0;
}

/* The body of each request's task: handler(req, res), then the response
 * is completed from the continuation, whether the handler returned or
 * raised, after any number of yields. */
static int handler_task(lua_State *L)
{
    /* 1 handler, 2 req, 3 res, 4 guard */
    lua_toclose(L, 4);
    lua_pushcfunction(L, handler_traceback);
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    return handler_done(L, lua_pcallk(L, 2, 0, 5, 0, handler_done), 0);
}

/* __close and __gc of a request's guard: still armed means the handler
 * task ended without handler_done (it was cancelled or dropped), so the
 * response can't be completed; the connection is closed. */
static int guard_close(lua_State *L)
{
    srv_guard *g = luaL_checkudata(L, 1, GUARD_MT);
    aiorch_exchange *x = g->x;
    g->x = NULL;
    if (x) res_cut(x);
    return 0;
}

/* ---- exchanges: what a host calls --------------------------------------- */

/* Run protected: makes the req table (kept as x->req_ref) and res (x). */
static int open_call(lua_State *L)
{
    aiorch_handler *h = lua_touserdata(L, 1);
    const aiorch_http_request *req = lua_touserdata(L, 2);
    aiorch_exchange *x;
    size_t i, j;

    lua_createtable(L, 0, 7);
    lua_pushstring(L, req->method);
    lua_setfield(L, -2, "method");
    lua_pushlstring(L, req->target, req->target_len);
    lua_setfield(L, -2, "path");
    lua_createtable(L, 0, (int)req->nheaders);
    for (i = 0; i < req->nheaders; i++) {
        const aiorch_header *hd = &req->headers[i];
        luaL_Buffer b;
        char *name = luaL_buffinitsize(L, &b, hd->name_len);
        for (j = 0; j < hd->name_len; j++) {
            char ch = hd->name[j];
            name[j] = ch >= 'A' && ch <= 'Z' ? (char)(ch - 'A' + 'a') : ch;
        }
        luaL_pushresultsize(&b, hd->name_len);
        lua_pushvalue(L, -1);
        if (lua_rawget(L, -3) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushlstring(L, hd->value, hd->value_len);
        } else { /* a repeated header: values joined as HTTP allows */
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, hd->value, hd->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "headers");
    lua_pushinteger(L, ++h->next_id);
    lua_setfield(L, -2, "id");
    lua_pushnumber(L, aiorch_now_ms());
    lua_setfield(L, -2, "received_at");
    x = lua_newuserdatauv(L, sizeof *x, 2); /* res:on_error's body and type */
    memset(x, 0, sizeof *x);
    x->rt = h->rt;
    x->status = 200;
    x->head = strcmp(req->method, "HEAD") == 0;
    x->req_ref = x->self_ref = x->task_ref = LUA_NOREF;
    luaL_setmetatable(L, RES_MT);
    x->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    x->req_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, x);
    return 1;
}

/* Answers x with a plain body of ours, or what a hook gave (hidx: its
 * headers table, or 0); x ends. The connection closes after it. Returns
 * an error message when hidx holds what a hook may not set, else NULL. */
static const char *answer(lua_State *L, aiorch_exchange *x, int status, const char *type,
                          const char *body, size_t len, int hidx)
{
    aiorch_http_response res;
    hdr_list hl;
    int top = lua_gettop(L);

    lua_checkstack(L, 8);
    hdrs_init(L, &hl);
    hdrs_add(L, &hl, "content-type", 12, type, strlen(type));
    if (hidx) {
        lua_pushnil(L);
        while (lua_next(L, hidx)) {
            const char *name, *val;
            size_t nl, vl;
            const char *err = NULL;
            if (lua_type(L, -2) != LUA_TSTRING) {
                err = "header names must be strings";
            } else {
                name = lua_tolstring(L, -2, &nl);
                if (!aiorch_h1_is_token(name, nl))
                    err = "invalid header name";
                else if (aiorch_h1_name_is(name, nl, "content-length") ||
                         aiorch_h1_name_is(name, nl, "transfer-encoding") ||
                         aiorch_h1_name_is(name, nl, "connection") ||
                         aiorch_h1_name_is(name, nl, "content-type"))
                    err = "the server sets content-length, transfer-encoding, connection, "
                          "content-type";
                else if (!(val = hdr_value(L, &hl, &vl)))
                    err = "header values must be strings or numbers";
                else if (!aiorch_h1_is_field_value(val, vl))
                    err = "invalid header value";
            }
            if (err) {
                lua_settop(L, top);
                return err;
            }
            hdrs_add(L, &hl, name, nl, val, vl);
            lua_pop(L, 1);
        }
    }
    x->no_body = x->head;
    x->started = 1;
    x->status = status;
    res.status = status;
    res.headers = hl.v;
    res.nheaders = hl.n;
    res.length = (long long)len;
    res.close = 1;
    if (x->sink->head(x->ud, &res) == 0 && x->ud)
        res_body(x, body, len, 1);
    else
        res_cut(x);
    lua_settop(L, top);
    return NULL;
}

/* Run protected: on_refuse(status, req) -> body[, content type], req
 * holding the body read so far. */
static int refuse_call(lua_State *L)
{
    aiorch_exchange *x = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->h->refuse_ref);
    lua_pushvalue(L, 2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->req_ref);
    lua_pushvalue(L, 3);
    lua_setfield(L, -2, "body");
    lua_call(L, 2, 2);
    return 2;
}

static void exchange_refuse(aiorch_exchange *x, int status, const char *rbody, size_t rlen)
{
    aiorch_handler *h = x->h;
    lua_State *L = x->rt->S;
    const char *body = status == 413   ? "payload too large\n"
                       : status == 500 ? "internal server error\n"
                       : status == 408 ? "request timeout\n"
                       : status == 431 ? "request header fields too large\n"
                       : status == 503 ? "service unavailable\n"
                                       : "bad request\n";
    const char *type = "text/plain";
    size_t len = strlen(body), tlen;
    int top = lua_gettop(L);

    if (!x->ud) return;
    if (h && h->refuse_ref != LUA_NOREF) {
        lua_checkstack(L, 6);
        lua_pushcfunction(L, refuse_call);
        lua_pushlightuserdata(L, x);
        lua_pushinteger(L, status);
        lua_pushlstring(L, rbody ? rbody : "", rbody ? rlen : 0);
        h->in_hook = 1;
        int rc = lua_pcall(L, 3, 2, 0);
        h->in_hook = 0;
        if (rc != LUA_OK) {
            aiorch_report(x->rt, "aiorch.server: on_refuse: %s", lua_tostring(L, -1));
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            body = lua_tolstring(L, -2, &len);
            if (lua_type(L, -1) == LUA_TSTRING) {
                const char *t = lua_tolstring(L, -1, &tlen);
                if (tlen > 0 && aiorch_h1_is_field_value(t, tlen) && strlen(t) == tlen) type = t;
            }
        }
    }
    if (x->ud) answer(L, x, status, type, body, len, 0);
    lua_settop(L, top);
    exchange_drop(x, 0); /* the answer could not go out: x ends all the same */
}

/* Run protected: on_headers(req) -> nothing, or status, body[, content
 * type[, headers]]. */
static int headers_call(lua_State *L)
{
    aiorch_exchange *x = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->h->headers_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->req_ref);
    lua_call(L, 1, 4);
    return 4;
}

/* Calls on_headers, which must not yield. Returns 1 when it answered (or
 * failed, and a 500 went out), 0 to go on. */
static int headers_hook(aiorch_exchange *x)
{
    aiorch_handler *h = x->h;
    lua_State *L = x->rt->S;
    int top = lua_gettop(L), rc, isnum;
    const char *err = NULL, *body = "", *type = "text/plain";
    lua_Integer status;
    size_t len = 0, tlen;

    lua_checkstack(L, 8);
    lua_pushcfunction(L, headers_call);
    lua_pushlightuserdata(L, x);
    h->in_hook = 1;
    rc = lua_pcall(L, 1, 4, 0);
    h->in_hook = 0;
    if (rc != LUA_OK) {
        aiorch_report(x->rt, "aiorch.server: on_headers: %s", lua_tostring(L, -1));
        lua_settop(L, top);
        exchange_refuse(x, 500, NULL, 0);
        return 1;
    }
    if (lua_isnil(L, top + 1)) {
        lua_settop(L, top);
        return 0;
    }
    status = lua_tointegerx(L, top + 1, &isnum);
    if (!isnum || status < 200 || status > 999)
        err = "the status must be an integer in 200..999";
    else if (!lua_isnil(L, top + 2) && lua_type(L, top + 2) != LUA_TSTRING)
        err = "the body must be a string";
    else if (!lua_isnil(L, top + 3) && lua_type(L, top + 3) != LUA_TSTRING)
        err = "the content type must be a string";
    else if (!lua_isnil(L, top + 4) && lua_type(L, top + 4) != LUA_TTABLE)
        err = "the headers must be a table";
    if (!err) {
        if (!lua_isnil(L, top + 2)) body = lua_tolstring(L, top + 2, &len);
        if (!lua_isnil(L, top + 3)) {
            type = lua_tolstring(L, top + 3, &tlen);
            if (tlen == 0 || !aiorch_h1_is_field_value(type, tlen) || strlen(type) != tlen)
                err = "bad content type";
        }
    }
    if (!err)
        err = answer(L, x, (int)status, type, body, len, lua_istable(L, top + 4) ? top + 4 : 0);
    lua_settop(L, top);
    if (err) {
        aiorch_report(x->rt, "aiorch.server: on_headers: %s", err);
        exchange_refuse(x, 500, NULL, 0);
    }
    exchange_drop(x, 0); /* the answer could not go out: x ends all the same */
    return 1;
}

aiorch_exchange *aiorch_exchange_open(aiorch_handler *h, const aiorch_http_request *req,
                                      const aiorch_http_sink *sink, void *ud)
{
    lua_State *L = h->rt->S;
    aiorch_exchange *x;

    lua_checkstack(L, 4);
    lua_pushcfunction(L, open_call);
    lua_pushlightuserdata(L, h);
    lua_pushlightuserdata(L, (void *)req);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        static const char oops[] = "internal server error\n";
        aiorch_header ct = {"content-type", 12, "text/plain", 10};
        aiorch_http_response res = {500, &ct, 1, sizeof oops - 1, 1};
        aiorch_report(h->rt, "aiorch.server: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        if (sink->head(ud, &res) == 0)
            sink->body(ud, oops, sizeof oops - 1, 1);
        else
            sink->abort(ud);
        return NULL;
    }
    x = lua_touserdata(L, -1);
    lua_pop(L, 1);
    x->h = h;
    x->sink = sink;
    x->ud = ud;
    x->next = h->rt->exchanges;
    if (x->next) x->next->prev = x;
    h->rt->exchanges = x;
    h->nopen++;
    if (h->headers_ref != LUA_NOREF && headers_hook(x)) return NULL;
    return x;
}

/* Run protected: adds the body to req and starts the handler's task. */
static int start_call(lua_State *L)
{
    aiorch_exchange *x = lua_touserdata(L, 1);
    srv_guard *g;

    lua_pushcfunction(L, handler_task);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->h->fn_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->req_ref);
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "body");
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->self_ref);
    g = lua_newuserdatauv(L, sizeof *g, 1);
    g->x = NULL;
    lua_pushvalue(L, -2); /* the guard keeps res alive while it may read it */
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, GUARD_MT);
    x->task = aiorch_task_spawn(x->rt, L, 4);
    x->task_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    g->x = x;
    return 0;
}

static void exchange_start(aiorch_exchange *x, const char *body, size_t len)
{
    lua_State *L = x->rt->S;
    if (!x->ud) return;
    lua_checkstack(L, 8);
    lua_pushcfunction(L, start_call);
    lua_pushlightuserdata(L, x);
    lua_pushlstring(L, body ? body : "", body ? len : 0);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        aiorch_report(x->rt, "aiorch.server: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        res_cut(x);
        return;
    }
    x->running = 1;
    if (x->h) x->h->requests++;
}

static void exchange_writable(aiorch_exchange *x)
{
    while (x->waiters)
        waiter_wake(x->waiters, 1);
}

void aiorch_exchange_start(aiorch_exchange *x, const char *body, size_t len)
{
    exchange_start(x, body, len);
    aiorch_sched_soon(x->rt);
}

void aiorch_exchange_refuse(aiorch_exchange *x, int status)
{
    exchange_refuse(x, status, NULL, 0);
}

void aiorch_exchange_writable(aiorch_exchange *x)
{
    exchange_writable(x);
    aiorch_sched_soon(x->rt);
}

void aiorch_exchange_gone(aiorch_exchange *x)
{
    aiorch_runtime *rt = x->rt;
    exchange_drop(x, 1);
    aiorch_sched_soon(rt);
}

/* ---- handlers a host loads ---------------------------------------------- */

/* A handler's field at -1 (nil or a function) as a reference. */
static int hook_ref(lua_State *L, const char *name, char *err, size_t errsz)
{
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return LUA_NOREF;
    }
    if (!lua_isfunction(L, -1)) {
        snprintf(err, errsz, "'%s' must be a function", name);
        lua_pop(L, 1);
        return LUA_REFNIL;
    }
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

aiorch_handler *aiorch_handler_load(aiorch_runtime *rt, const char *path, int argc,
                                    const char *const *argv)
{
    lua_State *L = rt->S;
    aiorch_handler *h = calloc(1, sizeof *h);
    int top = lua_gettop(L);
    char err[256] = "";

    rt->error[0] = '\0';
    if (!h) {
        snprintf(rt->error, sizeof rt->error, "out of memory");
        return NULL;
    }
    handler_init(h, rt);
    if (luaL_loadfile(L, path) != LUA_OK) goto fail;
    lua_checkstack(L, argc + 4);
    for (int i = 0; i < argc; i++)
        lua_pushstring(L, argv[i]);
    if (lua_pcall(L, argc, 1, 0) != LUA_OK) goto fail;
    if (lua_isfunction(L, -1)) {
        h->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else if (lua_istable(L, -1)) {
        lua_Integer max;
        int isnum;
        lua_getfield(L, -1, "handler");
        if (!lua_isfunction(L, -1)) {
            snprintf(err, sizeof err, "'handler' must be a function");
            goto fail_msg;
        }
        h->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_getfield(L, -1, "on_headers");
        if ((h->headers_ref = hook_ref(L, "on_headers", err, sizeof err)) == LUA_REFNIL)
            goto fail_msg;
        lua_getfield(L, -1, "on_refuse");
        if ((h->refuse_ref = hook_ref(L, "on_refuse", err, sizeof err)) == LUA_REFNIL)
            goto fail_msg;
        lua_getfield(L, -1, "max_body");
        max = lua_tointegerx(L, -1, &isnum);
        if (!lua_isnil(L, -1) && (!isnum || max < 0)) {
            snprintf(err, sizeof err, "'max_body' must be a non-negative integer");
            goto fail_msg;
        }
        h->max_body = isnum ? (size_t)max : 0;
        lua_pop(L, 2);
    } else {
        snprintf(err, sizeof err, "it returned a %s, not a handler (a function or a table)",
                 luaL_typename(L, -1));
        goto fail_msg;
    }
    h->loaded = 1;
    h->next = rt->handlers;
    if (h->next) h->next->prev = h;
    rt->handlers = h;
    lua_settop(L, top);
    return h;

fail:
    snprintf(rt->error, sizeof rt->error, "%s", lua_tostring(L, -1));
    goto out;
fail_msg:
    snprintf(rt->error, sizeof rt->error, "%s: %s", path, err);
out:
    if (h->headers_ref == LUA_REFNIL) h->headers_ref = LUA_NOREF;
    if (h->refuse_ref == LUA_REFNIL) h->refuse_ref = LUA_NOREF;
    lua_settop(L, top);
    handler_unref(h);
    free(h);
    return NULL;
}

size_t aiorch_handler_max_body(const aiorch_handler *h)
{
    return h->max_body;
}

void aiorch_handler_free(aiorch_handler *h)
{
    if (!h) return;
    if (h->nopen > 0)
        h->dying = 1;
    else
        handler_release(h);
}

/* ---- aiorch.server: the runtime's own HTTP/1.1 server ------------------- */

static void hook_start(aiorch_exchange *x, const char *body, size_t len)
{
    exchange_start(x, body, len);
}

static void hook_refuse(aiorch_exchange *x, int status, const char *body, size_t len)
{
    exchange_refuse(x, status, body, len);
}

static void hook_gone(aiorch_exchange *x)
{
    exchange_drop(x, 1);
}

static void hook_cancel(aiorch_exchange *x)
{
    exchange_drop(x, 0);
}

static void hook_settle(aiorch_runtime *rt)
{
    aiorch_sched_drain(rt);
}

/* A shutdown ended: its caller wakes with the count cut. */
static void hook_shut_done(aiorch_handler *h, long long cut)
{
    srv_lua *s = (srv_lua *)((char *)h - offsetof(srv_lua, h));
    aiorch_task *t = s->shut_task;
    if (!t) return;
    s->shut_task = NULL;
    lua_State *co = aiorch_task_thread(t);
    lua_checkstack(co, 1);
    lua_pushinteger(co, (lua_Integer)cut);
    aiorch_task_wake(t, 1);
}

static const srv_hooks conn_hooks = {
    .open = aiorch_exchange_open,
    .start = hook_start,
    .refuse = hook_refuse,
    .writable = exchange_writable,
    .gone = hook_gone,
    .cancel = hook_cancel,
    .settle = hook_settle,
    .shut_done = hook_shut_done,
};

static srv_lua *srv_check(lua_State *L, int i)
{
    return luaL_checkudata(L, i, SRV_MT);
}

static srv_lua *srv_check_open(lua_State *L, int i)
{
    srv_lua *s = srv_check(L, i);
    if (!s->l) luaL_error(L, "attempt to use a closed server");
    return s;
}

/* Stops listening, closes every connection (cancelling the handlers of
 * unfinished responses) and drops the server's references. */
static void srv_close(srv_lua *s)
{
    aiorch_runtime *rt = s->rt;
    lua_State *L = rt->S;
    int self_ref = s->self_ref;

    if (!s->l) return;
    srv_listener *l = s->l;
    s->l = NULL;
    if (s->prev)
        s->prev->next = s->next;
    else
        rt->servers = s->next;
    if (s->next) s->next->prev = s->prev;
    s->prev = s->next = NULL;
    aiorch_srv_close(l); /* a shutdown waiting hears it first */
    handler_unref(&s->h);
    s->self_ref = LUA_NOREF;
    luaL_unref(L, LUA_REGISTRYINDEX, self_ref); /* last: s may be collected from here */
}

static void srv_check_options(lua_State *L)
{
    static const char *const known[] = {"host",
                                        "port",
                                        "max_body",
                                        "handler",
                                        "reuseport",
                                        "max_connections",
                                        "max_header",
                                        "header_timeout_ms",
                                        "idle_timeout_ms",
                                        "read_timeout_ms",
                                        "body_timeout_ms",
                                        "send_timeout_ms",
                                        "max_buffered",
                                        "raise_nofile",
                                        "on_refuse",
                                        "on_headers",
                                        NULL};
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        int i = 0;
        while (k && known[i] && strcmp(k, known[i]) != 0)
            i++;
        if (!k || !known[i])
            luaL_argerror(L, 1,
                          lua_pushfstring(L, "unknown option '%s'", k ? k : luaL_typename(L, -2)));
        lua_pop(L, 1);
    }
}

/* An optional non-negative integer option; def when absent. */
static lua_Integer opt_count(lua_State *L, const char *name, lua_Integer def)
{
    lua_Integer v;
    int isnum;
    if (lua_getfield(L, 1, name) == LUA_TNIL) {
        lua_pop(L, 1);
        return def;
    }
    v = lua_tointegerx(L, -1, &isnum);
    if (!isnum || lua_type(L, -1) != LUA_TNUMBER || v < 0)
        luaL_argerror(L, 1, lua_pushfstring(L, "'%s' must be a non-negative integer", name));
    lua_pop(L, 1);
    return v;
}

/* An optional timeout in ms, as seconds; def_ms when absent (0: none). */
static double opt_timeout_s(lua_State *L, const char *name, double def_ms)
{
    double v;
    if (lua_getfield(L, 1, name) == LUA_TNIL) {
        lua_pop(L, 1);
        return def_ms / 1000.0;
    }
    v = lua_tonumber(L, -1);
    if (lua_type(L, -1) != LUA_TNUMBER || v < 0 || v != v)
        luaL_argerror(L, 1, lua_pushfstring(L, "'%s' must be a number >= 0", name));
    lua_pop(L, 1);
    return v / 1000.0;
}

/* An optional boolean option. */
static int opt_bool(lua_State *L, const char *name)
{
    int v = 0;
    if (lua_getfield(L, 1, name) != LUA_TNIL) {
        if (!lua_isboolean(L, -1))
            luaL_argerror(L, 1, lua_pushfstring(L, "'%s' must be a boolean", name));
        v = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* aiorch.server.listen{host, port, handler, ...limits} */
static int srv_listen(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    const char *host = "127.0.0.1";
    lua_Integer port = 0, max_body = SRV_DEFAULT_MAX_BODY;
    srv_limits lim;
    int reuseport, raise_nofile, isnum;
    srv_lua *s;
    char err[512];

    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    if (!rt->loop)
        return luaL_error(L, "aiorch.server.listen: this runtime runs on a host's loop, which "
                             "serves HTTP itself");
    srv_check_options(L);
    memset(&lim, 0, sizeof lim);
    lim.max_conns = opt_count(L, "max_connections", SRV_DEFAULT_MAX_CONNS);
    lim.max_header = (size_t)opt_count(L, "max_header", SRV_DEFAULT_MAX_HEADER);
    lim.max_buffered = (size_t)opt_count(L, "max_buffered", SRV_DEFAULT_MAX_BUFFERED);
    lim.header_to = opt_timeout_s(L, "header_timeout_ms", SRV_DEFAULT_HEADER_TIMEOUT_MS);
    lim.body_to = opt_timeout_s(L, "body_timeout_ms", SRV_DEFAULT_BODY_TIMEOUT_MS);
    lim.read_to = opt_timeout_s(L, "read_timeout_ms", SRV_DEFAULT_READ_TIMEOUT_MS);
    lim.idle_to = opt_timeout_s(L, "idle_timeout_ms", SRV_DEFAULT_IDLE_TIMEOUT_MS);
    lim.send_to = opt_timeout_s(L, "send_timeout_ms", SRV_DEFAULT_SEND_TIMEOUT_MS);
    reuseport = opt_bool(L, "reuseport");
    raise_nofile = opt_bool(L, "raise_nofile");
    lua_getfield(L, 1, "host"); /* 2 */
    if (!lua_isnil(L, 2)) {
        size_t n;
        luaL_argcheck(L, lua_type(L, 2) == LUA_TSTRING, 1, "'host' must be a string");
        host = lua_tolstring(L, 2, &n);
        luaL_argcheck(L, n > 0 && n < sizeof s->host, 1, "'host' has a bad length");
    }
    lua_getfield(L, 1, "port"); /* 3 */
    if (!lua_isnil(L, 3)) {
        port = lua_tointegerx(L, 3, &isnum);
        luaL_argcheck(L, isnum && lua_type(L, 3) == LUA_TNUMBER && port >= 0 && port <= 65535, 1,
                      "'port' must be an integer in 0..65535");
    }
    lua_getfield(L, 1, "max_body"); /* 4 */
    if (!lua_isnil(L, 4)) {
        max_body = lua_tointegerx(L, 4, &isnum);
        luaL_argcheck(L, isnum && lua_type(L, 4) == LUA_TNUMBER && max_body >= 0, 1,
                      "'max_body' must be a non-negative integer");
    }
    lim.max_body = (size_t)max_body;
    lua_getfield(L, 1, "handler"); /* 5 */
    luaL_argcheck(L, lua_type(L, 5) == LUA_TFUNCTION, 1, "'handler' must be a function");
    lua_getfield(L, 1, "on_refuse"); /* 6 */
    luaL_argcheck(L, lua_isnil(L, 6) || lua_type(L, 6) == LUA_TFUNCTION, 1,
                  "'on_refuse' must be a function");
    lua_getfield(L, 1, "on_headers"); /* 7 */
    luaL_argcheck(L, lua_isnil(L, 7) || lua_type(L, 7) == LUA_TFUNCTION, 1,
                  "'on_headers' must be a function");

    s = lua_newuserdatauv(L, sizeof *s, 0); /* 8 */
    memset(s, 0, sizeof *s);
    handler_init(&s->h, rt);
    s->rt = rt;
    s->self_ref = LUA_NOREF;
    s->h.max_body = (size_t)max_body;
    luaL_setmetatable(L, SRV_MT);
    s->l = aiorch_srv_listen(rt, host, (int)port, reuseport, &lim, &conn_hooks, &s->h, err,
                             sizeof err);
    if (!s->l) {
        luaL_pushfail(L);
        lua_pushliteral(L, "listen");
        lua_pushstring(L, err);
        return 3;
    }
    if (raise_nofile) aiorch_srv_fit_nofile(s->l);
    s->port = aiorch_srv_port(s->l);
    snprintf(s->host, sizeof s->host, "%s", host);
    lua_pushvalue(L, 5);
    s->h.fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, 6)) {
        lua_pushvalue(L, 6);
        s->h.refuse_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (!lua_isnil(L, 7)) {
        lua_pushvalue(L, 7);
        s->h.headers_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    /* A listening server stays alive without a Lua reference, until closed. */
    lua_pushvalue(L, 8);
    s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->next = rt->servers;
    if (s->next) s->next->prev = s;
    rt->servers = s;
    return 1;
}

/* aiorch_op.cancel of srv:shutdown: its caller went, so close at once */
static void srv_shut_cancel(aiorch_op *op)
{
    srv_lua *s = (srv_lua *)((char *)op - offsetof(srv_lua, shut_op));
    s->shut_task = NULL;
    if (s->l) aiorch_srv_shutdown_now(s->l);
}

/* server:shutdown([drain_timeout_ms]): stops accepting at once, closes idle
 * connections, lets the requests in flight finish (with connection: close),
 * cuts the rest at the deadline. Yields; returns the number cut. The
 * server stays open (stats) until close(). */
static int srv_shutdown(lua_State *L)
{
    srv_lua *s = srv_check_open(L, 1);
    double ms = luaL_optnumber(L, 2, 30000);
    aiorch_task *t;
    int rc;

    luaL_argcheck(L, ms >= 0 && ms == ms, 2, "drain timeout must be >= 0 ms");
    if (aiorch_srv_shutting(s->l) == 1)
        return luaL_error(L, "server:shutdown: already shutting down");
    if (aiorch_srv_shutting(s->l)) {
        lua_pushinteger(L, 0);
        return 1;
    }
    t = aiorch_task_require(s->rt, L, "server:shutdown");
    rc = aiorch_srv_shutdown(s->l, ms);
    if (rc <= 0) {
        lua_pushinteger(L, 0);
        return 1;
    }
    s->shut_task = t;
    s->shut_op.cancel = srv_shut_cancel;
    aiorch_task_wait(t, &s->shut_op);
    return lua_yield(L, 0);
}

/* server:close() */
static int srv_close_m(lua_State *L)
{
    srv_lua *s = srv_check_open(L, 1);
    if (s->h.in_hook)
        return luaL_error(L, "aiorch.server: close: not from inside on_refuse or on_headers");
    srv_close(s);
    return 0;
}

/* __gc and __close: closes the server if it is still open */
static int srv_gc(lua_State *L)
{
    srv_close(srv_check(L, 1));
    return 0;
}

/* server:stats() */
static int srv_stats_m(lua_State *L)
{
    srv_lua *s = srv_check_open(L, 1);
    srv_stats st;
    aiorch_srv_stats(s->l, &st);
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, st.refused);
    lua_setfield(L, -2, "refused");
    lua_pushinteger(L, st.timed_out);
    lua_setfield(L, -2, "timed_out");
    lua_pushinteger(L, st.accepted);
    lua_setfield(L, -2, "accepted");
    lua_pushinteger(L, st.open);
    lua_setfield(L, -2, "open");
    lua_pushinteger(L, s->h.requests);
    lua_setfield(L, -2, "requests");
    lua_pushinteger(L, s->h.aborted);
    lua_setfield(L, -2, "aborted");
    lua_pushinteger(L, st.buffered);
    lua_setfield(L, -2, "buffered");
    lua_pushinteger(L, st.accept_failed);
    lua_setfield(L, -2, "accept_failed");
    return 1;
}

static void limit_ms(lua_State *L, const char *name, double secs)
{
    lua_pushinteger(L, (lua_Integer)(secs * 1000 + 0.5));
    lua_setfield(L, -2, name);
}

/* server:limits(): the limits in force (0: none) */
static int srv_limits_m(lua_State *L)
{
    srv_lua *s = srv_check_open(L, 1);
    srv_limits lim;
    aiorch_srv_limits(s->l, &lim);
    lua_createtable(L, 0, 10);
    lua_pushinteger(L, lim.max_conns);
    lua_setfield(L, -2, "max_connections");
    lua_pushinteger(L, (lua_Integer)lim.max_header);
    lua_setfield(L, -2, "max_header");
    lua_pushinteger(L, (lua_Integer)lim.max_body);
    lua_setfield(L, -2, "max_body");
    lua_pushinteger(L, (lua_Integer)lim.max_buffered);
    lua_setfield(L, -2, "max_buffered");
    limit_ms(L, "header_timeout_ms", lim.header_to);
    limit_ms(L, "body_timeout_ms", lim.body_to);
    limit_ms(L, "read_timeout_ms", lim.read_to);
    limit_ms(L, "idle_timeout_ms", lim.idle_to);
    limit_ms(L, "send_timeout_ms", lim.send_to);
    return 1;
}

/* __index: the fields port and host, then the methods */
static int srv_index(lua_State *L)
{
    srv_lua *s = srv_check(L, 1);
    const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "";
    if (strcmp(k, "port") == 0)
        lua_pushinteger(L, s->port);
    else if (strcmp(k, "host") == 0)
        lua_pushstring(L, s->host);
    else {
        lua_settop(L, 2);
        lua_rawget(L, lua_upvalueindex(1));
    }
    return 1;
}

static int srv_tostring(lua_State *L)
{
    srv_lua *s = srv_check(L, 1);
    if (!s->l)
        lua_pushliteral(L, "aiorch.server (closed)");
    else
        lua_pushfstring(L, "aiorch.server (%s:%d)", s->host, s->port);
    return 1;
}

static const luaL_Reg srv_functions[] = {
    {"listen", srv_listen},
    {NULL, NULL},
};

static const luaL_Reg srv_methods[] = {
    {"close", srv_close_m},     {"stats", srv_stats_m}, {"limits", srv_limits_m},
    {"shutdown", srv_shutdown}, {NULL, NULL},
};

static const luaL_Reg srv_metamethods[] = {
    {"__index", NULL}, /* placeholder: a closure over the methods */
    {"__gc", srv_gc},  {"__close", srv_gc}, {"__tostring", srv_tostring}, {NULL, NULL},
};

static const luaL_Reg res_methods[] = {
    {"start", res_start},   {"write", res_write},
    {"finish", res_finish}, {"respond", res_respond},
    {"abort", res_abort},   {"on_error", res_on_error},
    {NULL, NULL},
};

static const luaL_Reg res_metamethods[] = {
    {"__index", NULL}, /* placeholder: the methods */
    {"__tostring", res_tostring},
    {NULL, NULL},
};

static const luaL_Reg guard_metamethods[] = {
    {"__gc", guard_close},
    {"__close", guard_close},
    {NULL, NULL},
};

void aiorch_server_open(aiorch_runtime *rt, lua_State *L)
{
    luaL_checkstack(L, 4, NULL);
    if (luaL_newmetatable(L, SRV_MT)) {
        luaL_setfuncs(L, srv_metamethods, 0);
        luaL_newlib(L, srv_methods);
        lua_pushcclosure(L, srv_index, 1);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, RES_MT)) {
        luaL_setfuncs(L, res_metamethods, 0);
        luaL_newlib(L, res_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, GUARD_MT)) {
        luaL_setfuncs(L, guard_metamethods, 0);
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, srv_functions, 1);
    lua_setfield(L, -2, "server");
}

void aiorch_server_close_all(aiorch_runtime *rt)
{
    while (rt->servers)
        srv_close(rt->servers);
    while (rt->exchanges) /* a host's, whose body had not come yet */
        res_cut(rt->exchanges);
    while (rt->handlers)
        handler_release(rt->handlers);
}
