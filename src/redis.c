/* aiorch.redis: a Redis client on the runtime's own loop, through hiredis's
 * async API and its libev adapter; nothing blocks.
 *
 *   local r = aiorch.redis.connect("redis://127.0.0.1:6379/0", {timeout_ms = 20})
 *   r:call("SET", "k", "v", "PX", 1000) --> "OK"
 *   r:call("GET", "k")                  --> "v"
 *
 * A call yields its task until the reply; calls from several tasks are
 * pipelined on the one connection. Each call has a deadline (timeout_ms):
 * past it the call answers nil, "timeout", and the connection is dropped,
 * since every reply queued behind the late one is late too. A dropped or
 * refused connection is opened again by a later call, no sooner than the
 * back-off (backoff_ms, doubling up to max_backoff_ms); until then calls
 * answer nil, "connect" at once. A successful reply resets the back-off.
 *
 * Lifetime: a call's record belongs to hiredis from the command until its
 * reply callback, which hiredis also runs (with no reply) for every call
 * still pending when the connection goes; cancelling a task only detaches
 * it from its call. */
#include <arpa/inet.h>
#include <ctype.h>
#include <math.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "internal.h"

#define CLIENT_MT "aiorch.redis.client"
#define DEFAULT_TIMEOUT_MS 20
#define DEFAULT_CONNECT_TIMEOUT_MS 1000
#define DEFAULT_BACKOFF_MS 100
#define DEFAULT_MAX_BACKOFF_MS 2000
#define DEFAULT_MAX_PENDING 10000
#define MAX_MS 3600000.0 /* an hour: the bound of every duration option */

typedef struct rclient {
    aiorch_runtime *rt;
    redisAsyncContext *ac; /* NULL: no connection (down, or not opened yet) */
    int connected;         /* ac finished connecting */
    int closed;
    char host[INET6_ADDRSTRLEN];
    int port;
    long db;
    char *user, *password;             /* NULL when not given */
    char where[INET6_ADDRSTRLEN + 16]; /* host:port, for messages */
    double timeout_ms, connect_timeout_ms, backoff_ms, max_backoff_ms;
    long max_pending;
    long pending;    /* calls in hiredis, but AUTH and SELECT */
    int failures;    /* connection failures in a row */
    double retry_at; /* aiorch_now_ms(): no new connection before */
    char why[256];   /* the last failure */
    lua_Integer n_calls, n_errors, n_timeouts, n_connects, n_failures;
    ev_timer conn_timer;
    ev_check drain_w;            /* fed after a wake: runs the woken tasks */
    struct rclient *prev, *next; /* the runtime's open clients */
} rclient;

typedef struct rcall {
    aiorch_op op;
    rclient *cl;
    aiorch_task *task; /* waits for the reply; NULL once nobody does */
    ev_timer timer;
    int internal; /* AUTH or SELECT: a refusal drops the connection */
} rcall;

/* What a failed call answers. */
typedef struct rfail {
    const char *kind;
    const char *msg;
} rfail;

/* ---- delivering results to a waiting task ---- */

static int push_reply(lua_State *L, const redisReply *r, int top);

static void push_array(lua_State *L, const redisReply *r)
{
    luaL_checkstack(L, 4, "redis reply too deep");
    lua_createtable(L, (int)r->elements, 0);
    for (size_t i = 0; i < r->elements; i++) {
        push_reply(L, r->element[i], 0);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

/* A reply as Lua values: nil (a nil at the top; false inside an array), a
 * string, an integer, a table; an error is nil, "redis", message at the
 * top and {err = message} inside an array. Returns the count pushed. */
static int push_reply(lua_State *L, const redisReply *r, int top)
{
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
        lua_pushlstring(L, r->str, r->len);
        return 1;
    case REDIS_REPLY_INTEGER:
        lua_pushinteger(L, (lua_Integer)r->integer);
        return 1;
    case REDIS_REPLY_ARRAY:
        push_array(L, r);
        return 1;
    case REDIS_REPLY_ERROR:
        if (top) {
            luaL_pushfail(L);
            lua_pushliteral(L, "redis");
            lua_pushlstring(L, r->str, r->len);
            return 3;
        }
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, r->str, r->len);
        lua_setfield(L, -2, "err");
        return 1;
    default: /* REDIS_REPLY_NIL */
        if (top)
            lua_pushnil(L);
        else
            lua_pushboolean(L, 0);
        return 1;
    }
}

static int push_reply_p(lua_State *L)
{
    return push_reply(L, lua_touserdata(L, 1), 1);
}

static int push_fail_p(lua_State *L)
{
    const rfail *f = lua_touserdata(L, 1);
    luaL_pushfail(L);
    lua_pushstring(L, f->kind);
    lua_pushstring(L, f->msg);
    return 3;
}

/* Wakes the call's task with what fn pushes (run protected on the scratch
 * thread: a callback must not raise). Out of memory, it wakes with none. */
static void deliver(rcall *rc, lua_CFunction fn, void *arg)
{
    aiorch_task *t = rc->task;
    if (!t) return;
    rc->task = NULL;
    lua_State *S = rc->cl->rt->S;
    lua_State *co = aiorch_task_thread(t);
    int base = lua_gettop(S), n = 0;
    lua_pushcfunction(S, fn);
    lua_pushlightuserdata(S, arg);
    if (lua_pcall(S, 1, LUA_MULTRET, 0) == LUA_OK) {
        n = lua_gettop(S) - base;
        if (co && lua_checkstack(co, n))
            lua_xmove(S, co, n);
        else
            n = 0;
    }
    lua_settop(S, base);
    aiorch_task_wake(t, n);
    ev_feed_event(rc->cl->rt->loop, &rc->cl->drain_w, EV_CUSTOM);
}

static void deliver_fail(rcall *rc, const char *kind, const char *msg)
{
    rfail f = {kind, msg};
    deliver(rc, push_fail_p, &f);
}

/* ---- the connection ---- */

static void set_why(rclient *cl, const char *fmt, const char *a)
{
    snprintf(cl->why, sizeof cl->why, fmt, cl->where, a ? a : "");
}

/* One more failure in a row: no new connection for the back-off. */
static void backoff(rclient *cl)
{
    double ms = cl->backoff_ms;
    for (int i = 0; i < cl->failures && ms < cl->max_backoff_ms; i++)
        ms *= 2;
    if (ms > cl->max_backoff_ms) ms = cl->max_backoff_ms;
    cl->failures++;
    cl->n_failures++;
    cl->retry_at = aiorch_now_ms() + ms;
}

/* Closes the connection (cl->why says why): hiredis runs every pending
 * call's callback with no reply, now or, inside a callback, right after. */
static void drop(rclient *cl)
{
    redisAsyncContext *ac = cl->ac;
    if (!ac) return;
    cl->ac = NULL;
    cl->connected = 0;
    ev_timer_stop(cl->rt->loop, &cl->conn_timer);
    if (!cl->closed) backoff(cl);
    redisAsyncFree(ac);
}

/* redisConnectCallback */
static void on_connect(const redisAsyncContext *ac, int status)
{
    rclient *cl = ac->data;
    if (cl->ac != ac) return;
    ev_timer_stop(cl->rt->loop, &cl->conn_timer);
    if (status != REDIS_OK) {
        /* hiredis frees ac after this returns. */
        cl->ac = NULL;
        set_why(cl, "cannot connect to redis at %s: %s", ac->c.errstr);
        backoff(cl);
        return;
    }
    cl->connected = 1;
    cl->n_connects++;
}

/* redisDisconnectCallback: the server closed, or a read or write failed. */
static void on_disconnect(const redisAsyncContext *ac, int status)
{
    rclient *cl = ac->data;
    (void)status;
    if (cl->ac != ac) return;
    cl->ac = NULL;
    cl->connected = 0;
    set_why(cl, "lost the connection to redis at %s: %s",
            ac->c.err ? ac->c.errstr : "closed by the server");
    backoff(cl);
}

/* ev_timer: the connection was not made in connect_timeout_ms. */
static void conn_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    rclient *cl = w->data;
    set_why(cl, "cannot connect to redis at %s: %s", "timed out");
    drop(cl);
    aiorch_sched_drain(cl->rt);
}

/* ev_check, only ever fed: runs the tasks a reply woke. */
static void drain_cb(struct ev_loop *loop, ev_check *w, int revents)
{
    (void)loop;
    (void)revents;
    aiorch_sched_drain(((rclient *)w->data)->rt);
}

/* redisCallbackFn: the reply, or NULL when the connection went first. */
static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    rcall *rc = privdata;
    rclient *cl = rc->cl;
    redisReply *r = reply;
    ev_timer_stop(cl->rt->loop, &rc->timer);
    if (!rc->internal) cl->pending--;
    if (!r) {
        char msg[300];
        if (cl->closed) {
            deliver_fail(rc, "closed", "the redis client was closed");
        } else {
            if (ac->c.err)
                set_why(cl,
                        cl->connected ? "lost the connection to redis at %s: %s"
                                      : "cannot connect to redis at %s: %s",
                        ac->c.errstr);
            snprintf(msg, sizeof msg, "%s", cl->why);
            cl->n_errors += rc->task != NULL;
            deliver_fail(rc, "connect", msg);
        }
    } else if (rc->internal) {
        if (r->type == REDIS_REPLY_ERROR && cl->ac == ac) {
            set_why(cl, "redis at %s refused the connection's setup: %s", r->str);
            drop(cl);
        }
    } else {
        cl->failures = 0;
        if (r->type == REDIS_REPLY_ERROR) cl->n_errors += rc->task != NULL;
        deliver(rc, push_reply_p, r);
    }
    free(rc);
}

/* ev_timer: a call's deadline. The connection goes too (see the top). */
static void call_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    rcall *rc = w->data;
    rclient *cl = rc->cl;
    char msg[200];
    snprintf(msg, sizeof msg, "redis at %s did not answer within %g ms", cl->where, cl->timeout_ms);
    cl->n_timeouts++;
    deliver_fail(rc, "timeout", msg);
    set_why(cl, "redis at %s was too slow: %s", "a call timed out");
    drop(cl); /* frees rc */
    aiorch_sched_drain(cl->rt);
}

/* The task waiting on a call was cancelled: the reply, when it comes, is
 * dropped. */
static void call_cancel(aiorch_op *op)
{
    rcall *rc = (rcall *)((char *)op - offsetof(rcall, op));
    rc->task = NULL;
    ev_timer_stop(rc->cl->rt->loop, &rc->timer);
}

static rcall *call_new(rclient *cl, int internal)
{
    rcall *rc = calloc(1, sizeof *rc);
    if (!rc) return NULL;
    rc->cl = cl;
    rc->internal = internal;
    rc->op.cancel = call_cancel;
    ev_timer_init(&rc->timer, call_timer_cb, cl->timeout_ms / 1000.0, 0.);
    rc->timer.data = rc;
    return rc;
}

/* ev_io for writes, in place of the adapter's own: hiredis writes with
 * write(2), and a server gone away would raise SIGPIPE in a host that does
 * not ignore it. The signal is blocked around the write, and one it raised
 * is taken back. */
static void write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    redisLibevEvents *e = w->data;
    sigset_t pipe_set, old, pending;
    struct timespec zero = {0, 0};
    int had;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    sigpending(&pending);
    had = sigismember(&pending, SIGPIPE);
    redisAsyncHandleWrite(e->context);
    sigpending(&pending);
    if (!had && sigismember(&pending, SIGPIPE)) sigtimedwait(&pipe_set, NULL, &zero);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Queues AUTH or SELECT ahead of every call on a new connection. */
static int setup_command(rclient *cl, int argc, const char **argv)
{
    rcall *rc = call_new(cl, 1);
    size_t lens[3];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    if (!rc) return -1;
    if (redisAsyncCommandArgv(cl->ac, on_reply, rc, argc, argv, lens) != REDIS_OK) {
        free(rc);
        return -1;
    }
    return 0;
}

/* Opens a connection (the calls made meanwhile wait in hiredis's buffer). */
static int open_conn(rclient *cl)
{
    redisAsyncContext *ac = redisAsyncConnect(cl->host, cl->port);
    if (!ac || ac->err) {
        set_why(cl, "cannot connect to redis at %s: %s", ac ? ac->c.errstr : "out of memory");
        if (ac) redisAsyncFree(ac);
        backoff(cl);
        return -1;
    }
    ac->data = cl;
    redisLibevAttach(cl->rt->loop, ac);
    ev_set_cb(&((redisLibevEvents *)ac->ev.data)->wev, write_cb);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    cl->ac = ac;
    cl->connected = 0;
    ev_timer_set(&cl->conn_timer, cl->connect_timeout_ms / 1000.0, 0.);
    ev_timer_start(cl->rt->loop, &cl->conn_timer);
    int bad = 0;
    if (cl->password) { /* AUTH password, or AUTH user password (ACL) */
        const char *auth[3] = {"AUTH", cl->user ? cl->user : cl->password, cl->password};
        bad |= setup_command(cl, cl->user ? 3 : 2, auth);
    }
    if (cl->db != 0) {
        char db[24];
        snprintf(db, sizeof db, "%ld", cl->db);
        const char *sel[2] = {"SELECT", db};
        bad |= setup_command(cl, 2, sel);
    }
    if (bad) {
        set_why(cl, "cannot set up the connection to redis at %s: %s", "out of memory");
        drop(cl);
        return -1;
    }
    return 0;
}

static void secret_free(char *s)
{
    if (!s) return;
    for (volatile char *p = s; *p; p++)
        *p = 0;
    free(s);
}

/* Closes the client: its pending calls answer nil, "closed". */
static void client_close(rclient *cl)
{
    secret_free(cl->user);
    secret_free(cl->password);
    cl->user = cl->password = NULL;
    if (cl->closed) return;
    cl->closed = 1;
    drop(cl);
    ev_timer_stop(cl->rt->loop, &cl->conn_timer);
    ev_clear_pending(cl->rt->loop, &cl->drain_w);
    aiorch_runtime *rt = cl->rt;
    if (cl->prev)
        cl->prev->next = cl->next;
    else
        rt->redis_clients = cl->next;
    if (cl->next) cl->next->prev = cl->prev;
    cl->prev = cl->next = NULL;
}

void aiorch_redis_close_all(aiorch_runtime *rt)
{
    while (rt->redis_clients)
        client_close(rt->redis_clients);
}

/* ---- the URL and the options ---- */

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* A percent-decoded copy of s[0..len), or NULL when malformed. */
static char *decode(const char *s, size_t len)
{
    char *out = malloc(len + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '%') {
            int h, l;
            if (i + 2 >= len || (h = hexval((unsigned char)s[i + 1])) < 0 ||
                (l = hexval((unsigned char)s[i + 2])) < 0 || (h == 0 && l == 0)) {
                free(out);
                return NULL;
            }
            *o++ = (char)(h * 16 + l);
            i += 2;
        } else {
            *o++ = s[i];
        }
    }
    *o = 0;
    return out;
}

/* redis://[[user]:password@]host[:port][/db] into cl; the host is resolved
 * here, once (a name through the system's resolver). Raises on a malformed
 * URL; returns a message when the host cannot be resolved. */
static const char *parse_url(lua_State *L, rclient *cl, const char *url, char *err, size_t errlen)
{
    const char *p, *at, *hs, *he, *end;
    char host[256];
    if (strncmp(url, "redis://", 8) != 0)
        luaL_error(
            L, "aiorch.redis.connect: the URL must be redis://[[user]:password@]host[:port][/db]");
    p = url + 8;
    end = p + strcspn(p, "/?#");
    at = NULL; /* the last '@': a password may hold one unencoded */
    for (const char *q = p; q < end; q++)
        if (*q == '@') at = q;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        const char *ue = colon ? colon : at; /* user@: the password comes from opts */
        if (ue > p && !(cl->user = decode(p, (size_t)(ue - p))))
            luaL_error(L, "aiorch.redis.connect: the URL's user is malformed");
        if (colon && !(cl->password = decode(colon + 1, (size_t)(at - colon - 1))))
            luaL_error(L, "aiorch.redis.connect: the URL's password is malformed");
        p = at + 1;
    }
    cl->port = 6379;
    if (*p == '[') {
        hs = p + 1;
        he = memchr(hs, ']', (size_t)(end - hs));
        if (!he) luaL_error(L, "aiorch.redis.connect: the URL's host is malformed");
        p = he + 1;
    } else {
        hs = p;
        he = p + strcspn(p, ":/?#");
        if (he > end) he = end;
        p = he;
    }
    if (he == hs || (size_t)(he - hs) >= sizeof host)
        luaL_error(L, "aiorch.redis.connect: the URL has no host");
    memcpy(host, hs, (size_t)(he - hs));
    host[he - hs] = 0;
    if (*p == ':') {
        char *e;
        long port = strtol(p + 1, &e, 10);
        if (e == p + 1 || e != end || port < 1 || port > 65535)
            luaL_error(L, "aiorch.redis.connect: the URL's port must be 1 to 65535");
        cl->port = (int)port;
    } else if (p != end) {
        luaL_error(L, "aiorch.redis.connect: the URL's host is malformed");
    }
    if (*end == '/' && end[1]) {
        char *e;
        long db = strtol(end + 1, &e, 10);
        if (e == end + 1 || *e || db < 0 || db > 1000000)
            luaL_error(
                L,
                "aiorch.redis.connect: the URL's database must be a number (redis://host:port/0)");
        cl->db = db;
    } else if (*end && strcmp(end, "/") != 0) {
        luaL_error(L, "aiorch.redis.connect: the URL takes no query or fragment");
    }

    struct addrinfo hints = {0}, *res = NULL, *ai;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve the redis host '%s': %s", host, gai_strerror(rc));
        return err;
    }
    const struct addrinfo *pick = NULL;
    for (ai = res; ai; ai = ai->ai_next)
        if (ai->ai_family == AF_INET || (!pick && ai->ai_family == AF_INET6))
            if (!pick || pick->ai_family != AF_INET) pick = ai;
    if (pick && pick->ai_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)pick->ai_addr)->sin_addr, cl->host,
                  sizeof cl->host);
    else if (pick)
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)pick->ai_addr)->sin6_addr, cl->host,
                  sizeof cl->host);
    freeaddrinfo(res);
    if (!pick) {
        snprintf(err, errlen, "cannot resolve the redis host '%s': no IP address", host);
        return err;
    }
    snprintf(cl->where, sizeof cl->where, strchr(cl->host, ':') ? "[%s]:%d" : "%s:%d", cl->host,
             cl->port);
    return NULL;
}

static double opt_ms(lua_State *L, const char *field, double def, double least)
{
    double v;
    if (lua_getfield(L, 2, field) == LUA_TNIL) {
        lua_pop(L, 1);
        return def;
    }
    if (lua_type(L, -1) != LUA_TNUMBER)
        luaL_error(L, "aiorch.redis.connect: opts.%s must be a number (ms)", field);
    v = lua_tonumber(L, -1);
    if (!(v >= least && v <= MAX_MS))
        luaL_error(L, "aiorch.redis.connect: opts.%s must be from %g to %g (ms)", field, least,
                   MAX_MS);
    lua_pop(L, 1);
    return v;
}

static rclient *check_client(lua_State *L)
{
    rclient *cl = luaL_checkudata(L, 1, CLIENT_MT);
    if (cl->closed) luaL_error(L, "redis: the client is closed");
    return cl;
}

/* ---- Lua ---- */

/* aiorch.redis.connect(url[, opts]) -> client | nil, "connect", message.
 * Starts connecting at once; calls made meanwhile wait for it. */
static int l_connect(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    const char *url = luaL_checkstring(L, 1);
    char err[512];
    if (!rt->loop) /* hiredis's adapter watches its socket on a libev loop */
        return luaL_error(L,
                          "aiorch.redis.connect: this runtime runs on a host's loop, which has no "
                          "libev loop for hiredis");
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    rclient *cl = lua_newuserdatauv(L, sizeof *cl, 0);
    memset(cl, 0, sizeof *cl);
    cl->rt = rt;
    cl->closed = 1; /* until linked: a raise below leaves nothing to close */
    luaL_setmetatable(L, CLIENT_MT);
    cl->timeout_ms = DEFAULT_TIMEOUT_MS;
    cl->connect_timeout_ms = DEFAULT_CONNECT_TIMEOUT_MS;
    cl->backoff_ms = DEFAULT_BACKOFF_MS;
    cl->max_backoff_ms = DEFAULT_MAX_BACKOFF_MS;
    cl->max_pending = DEFAULT_MAX_PENDING;
    if (!lua_isnil(L, 2)) {
        cl->timeout_ms = opt_ms(L, "timeout_ms", DEFAULT_TIMEOUT_MS, 1);
        cl->connect_timeout_ms = opt_ms(L, "connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS, 1);
        cl->backoff_ms = opt_ms(L, "backoff_ms", DEFAULT_BACKOFF_MS, 1);
        cl->max_backoff_ms = opt_ms(L, "max_backoff_ms", DEFAULT_MAX_BACKOFF_MS, cl->backoff_ms);
        if (lua_getfield(L, 2, "max_pending") != LUA_TNIL) {
            lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : 0;
            if (n < 1 || n > 1000000)
                luaL_error(L, "aiorch.redis.connect: opts.max_pending must be 1 to 1000000");
            cl->max_pending = (long)n;
        }
        lua_pop(L, 1);
    }
    /* A raise from here leaves the secrets to __gc (the client is closed). */
    const char *bad = parse_url(L, cl, url, err, sizeof err);
    if (!bad && !lua_isnil(L, 2)) {
        if (lua_getfield(L, 2, "password") != LUA_TNIL) {
            size_t len;
            const char *pw = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
            if (!pw || len == 0 || strlen(pw) != len)
                luaL_error(L, "aiorch.redis.connect: opts.password must be a non-empty string");
            secret_free(cl->password);
            if (!(cl->password = strdup(pw))) luaL_error(L, "out of memory");
        }
        lua_pop(L, 1);
    }
    if (bad) {
        client_close(cl);
        luaL_pushfail(L);
        lua_pushliteral(L, "connect");
        lua_pushstring(L, bad);
        return 3;
    }
    ev_init(&cl->conn_timer, conn_timer_cb);
    cl->conn_timer.data = cl;
    ev_init(&cl->drain_w, drain_cb);
    cl->drain_w.data = cl;
    cl->closed = 0;
    cl->next = rt->redis_clients;
    if (cl->next) cl->next->prev = cl;
    rt->redis_clients = cl;
    snprintf(cl->why, sizeof cl->why, "redis at %s is not connected", cl->where);
    open_conn(cl);
    return 1;
}

/* client:call(cmd, ...) -> reply | nil, kind, message (yields) */
static int l_call(lua_State *L)
{
    rclient *cl = check_client(L);
    int argc = lua_gettop(L) - 1;
    luaL_argcheck(L, argc >= 1, 2, "a command name is needed");
    for (int i = 2; i <= argc + 1; i++) {
        int t = lua_type(L, i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L,
                       "redis client:call: argument #%d is a %s: arguments are strings or numbers",
                       i - 1, luaL_typename(L, i));
    }
    aiorch_task *self = aiorch_task_require(cl->rt, L, "redis client:call");
    if (!cl->ac && aiorch_now_ms() >= cl->retry_at) open_conn(cl);
    if (!cl->ac) {
        luaL_pushfail(L);
        lua_pushliteral(L, "connect");
        lua_pushfstring(L, "%s; next attempt in %d ms", cl->why,
                        (int)ceil(fmax(0, cl->retry_at - aiorch_now_ms())));
        cl->n_errors++;
        return 3;
    }
    if (cl->pending >= cl->max_pending) {
        luaL_pushfail(L);
        lua_pushliteral(L, "busy");
        lua_pushfstring(L, "%d redis calls are pending on this client (max_pending)",
                        (int)cl->max_pending);
        cl->n_errors++;
        return 3;
    }
    const char **argv = lua_newuserdatauv(L, (size_t)argc * (sizeof(char *) + sizeof(size_t)), 0);
    size_t *lens = (size_t *)(argv + argc);
    for (int i = 0; i < argc; i++)
        argv[i] = lua_tolstring(L, i + 2, &lens[i]);
    rcall *rc = call_new(cl, 0);
    if (!rc) return luaL_error(L, "out of memory");
    if (redisAsyncCommandArgv(cl->ac, on_reply, rc, argc, argv, lens) != REDIS_OK) {
        free(rc);
        luaL_pushfail(L);
        lua_pushliteral(L, "connect");
        lua_pushstring(L, cl->why);
        cl->n_errors++;
        return 3;
    }
    cl->pending++;
    cl->n_calls++;
    rc->task = self;
    ev_timer_start(cl->rt->loop, &rc->timer);
    lua_settop(L, 0);
    aiorch_task_wait(self, &rc->op);
    return lua_yield(L, 0);
}

/* client:set_timeout(ms): the deadline of the calls made from now on. */
static int l_set_timeout(lua_State *L)
{
    rclient *cl = check_client(L);
    double ms = luaL_checknumber(L, 2);
    luaL_argcheck(L, ms >= 1 && ms <= MAX_MS, 2, "the timeout is 1 ms to an hour");
    cl->timeout_ms = ms;
    return 0;
}

static int l_close(lua_State *L)
{
    client_close(luaL_checkudata(L, 1, CLIENT_MT));
    return 0;
}

static void set_int(lua_State *L, const char *k, lua_Integer v)
{
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}

/* client:stats() -> {state, pending, calls, errors, timeouts, connects,
 * failures, retry_in_ms} */
static int l_stats(lua_State *L)
{
    rclient *cl = luaL_checkudata(L, 1, CLIENT_MT);
    lua_createtable(L, 0, 9);
    lua_pushstring(L, cl->closed      ? "closed"
                      : cl->connected ? "connected"
                      : cl->ac        ? "connecting"
                                      : "down");
    lua_setfield(L, -2, "state");
    set_int(L, "pending", cl->pending);
    set_int(L, "calls", cl->n_calls);
    set_int(L, "errors", cl->n_errors);
    set_int(L, "timeouts", cl->n_timeouts);
    set_int(L, "connects", cl->n_connects);
    set_int(L, "failures", cl->n_failures);
    set_int(L, "retry_in_ms",
            cl->ac ? 0 : (lua_Integer)ceil(fmax(0, cl->retry_at - aiorch_now_ms())));
    lua_pushstring(L, cl->where);
    lua_setfield(L, -2, "server");
    return 1;
}

static int l_tostring(lua_State *L)
{
    rclient *cl = luaL_checkudata(L, 1, CLIENT_MT);
    lua_pushfstring(L, "aiorch.redis.client (%s/%d%s)", cl->where, (int)cl->db,
                    cl->closed ? ", closed" : "");
    return 1;
}

static const luaL_Reg client_methods[] = {
    {"call", l_call},   {"close", l_close}, {"set_timeout", l_set_timeout},
    {"stats", l_stats}, {NULL, NULL},
};

static const luaL_Reg client_meta[] = {
    {"__gc", l_close},
    {"__close", l_close},
    {"__tostring", l_tostring},
    {NULL, NULL},
};

static const luaL_Reg redis_funcs[] = {
    {"connect", l_connect},
    {NULL, NULL},
};

void aiorch_redis_open(aiorch_runtime *rt, lua_State *L)
{
    if (luaL_newmetatable(L, CLIENT_MT)) {
        luaL_setfuncs(L, client_meta, 0);
        luaL_newlib(L, client_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, redis_funcs, 1);
    lua_pushinteger(L, DEFAULT_TIMEOUT_MS);
    lua_setfield(L, -2, "default_timeout_ms");
    lua_setfield(L, -2, "redis");
}
