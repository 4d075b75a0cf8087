/* aiorch.server: an HTTP/1.1 server on the runtime's libev loop.
 *
 * A srv_server (the Lua userdata itself) owns a listening socket and the
 * srv_conn of each accepted socket. A parsed request runs as its own task
 * through handler_task, which completes the response when the handler
 * returns or raises; a guard object closed with that task covers the
 * handler being cancelled. While a response is in flight the connection
 * owns registry references to its req table, res userdata and task. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* accept4 */
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <http_parser.h>

#include "internal.h"

#define SRV_MT "aiorch.server"
#define RES_MT "aiorch.server.response"
#define GUARD_MT "aiorch.server.guard"

#define SRV_HIGH_WATER (64 * 1024) /* unsent output beyond which res:write yields */
/* Unsent bytes the kernel may queue per connection (TCP_NOTSENT_LOWAT): its
 * send buffer grows to megabytes on loopback, past what a client reads. */
#define SRV_KERNEL_UNSENT (64 * 1024)
#define SRV_READ_SIZE (16 * 1024) /* on the stack: a connection keeps only what is left */
#define SRV_IN_LIMIT (64 * 1024)  /* pipelined input buffered while a request runs */
#define SRV_MAX_HEADERS 256
#define SRV_LINGER_S 2.0
#define SRV_SHUTDOWN_IDLE_S 0.5 /* a fresh connection's chance to send during a shutdown */
/* Out of descriptors: accepting pauses this long, doubling up to the max. */
#define SRV_BACKOFF_MIN_S 0.01
#define SRV_BACKOFF_MAX_S 1.0
/* raise_nofile: descriptors kept for the process besides its connections */
#define SRV_NOFILE_RESERVE 64

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

/* Where a connection is in reading a request (for the client timeouts). */
enum { PH_NONE, PH_HEAD, PH_BODY };

typedef struct srv_server srv_server;
typedef struct srv_conn srv_conn;
typedef struct srv_res srv_res;

/* The bytes a server holds for its clients' input (request bodies and
 * pipelined requests), against max_buffered (0: no cap). */
typedef struct srv_pool {
    size_t used, max;
} srv_pool;

typedef struct srv_buf {
    char *p;
    size_t off, len, cap; /* bytes [off, len) are live */
    srv_pool *pool;       /* counts cap, or NULL */
    size_t ceil;          /* growth stops here while that is enough (0: none) */
    int capped;           /* growth that would pass pool->max fails */
} srv_buf;

/* One request header: offsets into conn->scratch, which may move. */
typedef struct srv_hdr {
    size_t name, name_len, value, value_len;
} srv_hdr;

/* A task blocked in res:write until the output drains. */
typedef struct srv_waiter {
    aiorch_op op; /* first member: the scheduler hands back &op */
    aiorch_task *task;
    struct srv_waiter *next, **pprev;
} srv_waiter;

struct srv_server {
    aiorch_runtime *rt;
    srv_server *prev, *next; /* rt->servers */
    int linked;
    ev_io accept_w;
    ev_timer retry_w; /* resumes accepting after EMFILE and the like */
    double backoff;   /* its current delay in seconds; 0: accepting */
    ev_tstamp backoff_since, backoff_logged;
    lua_Integer accept_failed, failed_at_log, failed_at_start; /* accept calls refused */
    int fd; /* -1 once closed, or once shutting down */
    int port;
    int closed;
    size_t max_body, max_header;
    lua_Integer max_conns;              /* 0: no limit */
    lua_Integer refusing;               /* connections open only to be answered 503 */
    double header_to, body_to, read_to, idle_to, send_to; /* seconds; 0: none */
    srv_pool pool;
    int handler_ref, self_ref;
    int refuse_ref;  /* on_refuse, or LUA_NOREF */
    int headers_ref; /* on_headers, or LUA_NOREF */
    int in_hook;     /* inside on_refuse or on_headers: closing would free their connection */
    srv_conn *conns;
    lua_Integer next_id;
    lua_Integer accepted, open, requests, aborted, refused, timed_out;
    /* srv:shutdown in progress */
    int shutting; /* 1: draining, 2: done */
    aiorch_task *shut_task;
    aiorch_op shut_op;
    ev_timer shut_w;
    char host[256];
};

struct srv_conn {
    srv_server *srv;
    srv_conn *next, **pprev;
    int fd;
    ev_io rw, ww;
    ev_timer linger_w;
    ev_timer to_w;      /* the client timeouts (conn_deadline) */
    ev_tstamp phase_at; /* when the phase began */
    ev_tstamp read_at;  /* PH_BODY: the last read */
    ev_tstamp sent_at;  /* the last write progress, or when output became pending */
    int phase;
    const char *parse_start, *parse_end; /* the bytes http_parser is given */
    lua_Integer served;
    http_parser parser;
    srv_buf in, out, scratch, body;
    srv_hdr *hdrs;
    size_t nhdrs, hdrs_cap, url_len;
    int hstate;    /* 0: none yet, 1: in a header name, 2: in a value */
    int line_done; /* the value's line ended: more of it is obsolete folding */
    int reject;    /* status for a request refused while parsing, or SRV_ANSWERED */
    unsigned keep_alive : 1, failed : 1, close_after : 1, linger : 1, lingering : 1,
        read_paused : 1, refused : 1;
    /* the request whose response is not finished yet */
    srv_res *res;
    aiorch_task *task;
    int req_ref, res_ref, task_ref;
    srv_waiter *waiters;
};

struct srv_res {
    aiorch_runtime *rt;
    srv_conn *conn; /* NULL once finished or once the connection closed */
    int status;
    uint64_t length, sent;
    unsigned started : 1, finished : 1, chunked : 1, has_length : 1, no_body : 1, close : 1,
        keep_alive : 1, head : 1, http10 : 1;
};

/* Closed with the handler task; still armed then means it never finished. */
typedef struct srv_guard {
    srv_res *res;
    aiorch_runtime *rt;
} srv_guard;

enum { SRV_PLAIN, SRV_GONE, SRV_CANCEL };

/* c->reject: on_headers answered; the answer is queued in c->out */
#define SRV_ANSWERED 1

/* buf_reserve's failures */
enum { BUF_OOM = -1, BUF_OVER = -2 };

static void conn_free(lua_State *L, srv_conn *c, int how);
static void conn_timer_update(srv_conn *c);
static void srv_on_shut_timer(struct ev_loop *loop, ev_timer *w, int revents);
static void srv_shut_end(lua_State *L, srv_server *s);

/* ---- buffers ---------------------------------------------------------- */

/* Whether n more bytes would take the pool past its max. */
static int pool_full(const srv_pool *pool, uint64_t n)
{
    return pool->max && (pool->used > pool->max || n > pool->max - pool->used);
}

/* Makes room for n more bytes, doubling. Returns 0, BUF_OOM, or BUF_OVER
 * when a capped buffer would take its pool past the pool's max. */
static int buf_reserve(srv_buf *b, size_t n)
{
    size_t cap;
    char *p;

    if (b->cap - b->len >= n) return 0;
    if (b->off > 0) { /* reuse the consumed front before growing */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= n) return 0;
    }
    cap = b->cap ? b->cap : 1024;
    while (cap - b->len < n) {
        if (cap > SIZE_MAX / 2) return BUF_OOM;
        cap *= 2;
    }
    if (b->ceil && cap > b->ceil && b->ceil - b->len >= n) cap = b->ceil;
    if (b->capped && pool_full(b->pool, cap - b->cap)) return BUF_OVER;
    p = realloc(b->p, cap);
    if (!p) return BUF_OOM;
    if (b->pool) b->pool->used += cap - b->cap;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_add(srv_buf *b, const void *s, size_t n)
{
    int rc;
    if (n == 0) return 0;
    if ((rc = buf_reserve(b, n)) != 0) return rc;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

#define buf_lit(b, s) buf_add((b), (s), sizeof(s) - 1)

static int buf_fmt(srv_buf *b, const char *fmt, ...)
{
    size_t room = 128;
    for (;;) {
        va_list ap;
        int n;
        if (buf_reserve(b, room)) return -1;
        va_start(ap, fmt);
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) return -1;
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return 0;
        }
        room = (size_t)n + 1;
    }
}

/* Frees the bytes; the pool, ceiling and cap stay. */
static void buf_free(srv_buf *b)
{
    if (b->pool) b->pool->used -= b->cap;
    free(b->p);
    b->p = NULL;
    b->off = b->len = b->cap = 0;
}

/* ---- HTTP bits -------------------------------------------------------- */

static const struct {
    int status;
    const char *reason;
} srv_reasons[] = {
    {100, "Continue"},
    {200, "OK"},
    {201, "Created"},
    {202, "Accepted"},
    {204, "No Content"},
    {206, "Partial Content"},
    {301, "Moved Permanently"},
    {302, "Found"},
    {303, "See Other"},
    {304, "Not Modified"},
    {307, "Temporary Redirect"},
    {308, "Permanent Redirect"},
    {400, "Bad Request"},
    {401, "Unauthorized"},
    {402, "Payment Required"},
    {403, "Forbidden"},
    {404, "Not Found"},
    {405, "Method Not Allowed"},
    {408, "Request Timeout"},
    {409, "Conflict"},
    {410, "Gone"},
    {411, "Length Required"},
    {413, "Payload Too Large"},
    {415, "Unsupported Media Type"},
    {422, "Unprocessable Entity"},
    {429, "Too Many Requests"},
    {500, "Internal Server Error"},
    {501, "Not Implemented"},
    {502, "Bad Gateway"},
    {503, "Service Unavailable"},
    {504, "Gateway Timeout"},
    {529, "Overloaded"},
};

static const char *srv_reason(int status)
{
    size_t i;
    for (i = 0; i < sizeof srv_reasons / sizeof srv_reasons[0]; i++)
        if (srv_reasons[i].status == status) return srv_reasons[i].reason;
    return status < 400 ? "OK" : status < 500 ? "Client Error" : "Server Error";
}

/* The status line, without printf (it runs for every response). */
static int buf_status_line(srv_buf *b, int status)
{
    const char *reason = srv_reason(status);
    char num[4];

    if (status < 100 || status > 999) return buf_fmt(b, "HTTP/1.1 %d %s\r\n", status, reason);
    num[0] = (char)('0' + status / 100);
    num[1] = (char)('0' + status / 10 % 10);
    num[2] = (char)('0' + status % 10);
    num[3] = ' ';
    return buf_lit(b, "HTTP/1.1 ") || buf_add(b, num, 4) || buf_add(b, reason, strlen(reason)) ||
           buf_lit(b, "\r\n");
}

/* A decimal number, without printf. */
static int buf_uint(srv_buf *b, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return buf_add(b, tmp + i, sizeof tmp - i);
}

static int is_tchar(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

static int is_token(const char *s, size_t n)
{
    size_t i;
    if (n == 0) return 0;
    for (i = 0; i < n; i++)
        if (!is_tchar((unsigned char)s[i])) return 0;
    return 1;
}

/* CR and LF would let a value smuggle in headers of its own. */
static int is_field_value(const char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') return 0;
    return 1;
}

static int name_is(const char *s, size_t n, const char *lit)
{
    return strlen(lit) == n && strncasecmp(s, lit, n) == 0;
}

/* Whether a comma-separated header value lists the token tok. */
static int has_token(const char *s, size_t n, const char *tok)
{
    size_t i = 0, tl = strlen(tok);
    while (i < n) {
        size_t j;
        while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == ','))
            i++;
        j = i;
        while (j < n && s[j] != ',')
            j++;
        {
            size_t e = j;
            while (e > i && (s[e - 1] == ' ' || s[e - 1] == '\t'))
                e--;
            if (e - i == tl && strncasecmp(s + i, tok, tl) == 0) return 1;
        }
        i = j;
    }
    return 0;
}

/* ---- sending ---------------------------------------------------------- */

static size_t out_pending(const srv_conn *c)
{
    return c->out.len - c->out.off;
}

static ssize_t sock_writev(int fd, struct iovec *iov, int n)
{
    struct msghdr m;
    ssize_t w;
    memset(&m, 0, sizeof m);
    m.msg_iov = iov;
    m.msg_iovlen = (size_t)n;
    do
        w = sendmsg(fd, &m, MSG_NOSIGNAL); /* a gone client must not raise SIGPIPE */
    while (w < 0 && errno == EINTR);
    return w;
}

/* Sends the queued output, then iov (at most 4 parts): straight to the
 * socket while it takes bytes, the rest queued for the write watcher.
 * Returns -1 when the socket failed; the caller closes the connection. */
static int conn_send(srv_conn *c, const struct iovec *iov, int n)
{
    struct iovec v[5];
    size_t done, queued;
    ssize_t w;
    int k = 0, i;

    if (ev_is_active(&c->ww)) { /* the socket is full: keep the order, queue */
        for (i = 0; i < n; i++)
            if (buf_add(&c->out, iov[i].iov_base, iov[i].iov_len)) return -1;
        return 0;
    }
    queued = out_pending(c);
    if (queued) {
        v[k].iov_base = c->out.p + c->out.off;
        v[k++].iov_len = queued;
    }
    for (i = 0; i < n; i++)
        if (iov[i].iov_len) v[k++] = iov[i];
    if (k == 0) return 0;
    w = sock_writev(c->fd, v, k);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        w = 0;
    }
    if (w > 0 || !queued) c->sent_at = ev_now(c->srv->rt->loop); /* progress, or a fresh start */
    done = (size_t)w;
    if (done >= queued) {
        done -= queued;
        c->out.off = c->out.len = 0;
    } else {
        c->out.off += done;
        done = 0;
    }
    for (i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        if (done >= len) {
            done -= len;
            continue;
        }
        if (buf_add(&c->out, (const char *)iov[i].iov_base + done, len - done)) return -1;
        done = 0;
    }
    if (out_pending(c)) {
        ev_io_start(c->srv->rt->loop, &c->ww);
        if (!ev_is_active(&c->to_w)) conn_timer_update(c); /* the send timeout */
    } else {
        buf_free(&c->out); /* thousands of idle streams must not each keep one */
    }
    return 0;
}

/* The client went away (or its socket failed). */
static void conn_fail(lua_State *L, srv_conn *c)
{
    conn_free(L, c, c->res ? SRV_GONE : SRV_PLAIN);
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

static void conn_wake_writers(srv_conn *c)
{
    while (c->waiters && out_pending(c) < SRV_HIGH_WATER)
        waiter_wake(c->waiters, 1);
}

/* ---- connection lifetime ---------------------------------------------- */

/* Closes c and frees it. With a response in flight, SRV_GONE (the client
 * went away) and SRV_CANCEL (the server closes) cancel its handler task,
 * and SRV_GONE marks the request aborted. */
static void conn_free(lua_State *L, srv_conn *c, int how)
{
    srv_server *s = c->srv;
    struct ev_loop *loop = s->rt->loop;
    srv_res *r = c->res;
    aiorch_task *task = c->task;
    int req_ref = c->req_ref, res_ref = c->res_ref, task_ref = c->task_ref;

    /* Unhook c first: Lua run by the cancellation below must not reach it. */
    if (r) r->conn = NULL;
    c->res = NULL;
    ev_io_stop(loop, &c->rw);
    ev_io_stop(loop, &c->ww);
    ev_timer_stop(loop, &c->linger_w);
    ev_timer_stop(loop, &c->to_w);
    close(c->fd);
    *c->pprev = c->next;
    if (c->next) c->next->pprev = c->pprev;
    s->open--;
    if (c->refused) s->refusing--;
    if (s->backoff > 0 && ev_is_active(&s->retry_w)) { /* a descriptor is free: accept now */
        ev_timer_stop(loop, &s->retry_w);
        ev_timer_set(&s->retry_w, 0., 0.);
        ev_timer_start(loop, &s->retry_w);
    }
    if (s->shut_task && !s->conns) { /* drained: end the shutdown from the loop */
        ev_timer_stop(loop, &s->shut_w);
        ev_timer_set(&s->shut_w, 0., 0.);
        ev_timer_start(loop, &s->shut_w);
    }
    lua_checkstack(L, 4);
    if (r && how == SRV_GONE) {
        s->aborted++;
        if (lua_rawgeti(L, LUA_REGISTRYINDEX, req_ref) == LUA_TTABLE) {
            lua_pushliteral(L, "aborted_at");
            lua_pushnumber(L, aiorch_now_ms());
            lua_rawset(L, -3);
        }
        lua_pop(L, 1);
    }
    /* s may be collected once Lua runs: not used below */
    if (r && how != SRV_PLAIN && task) aiorch_task_cancel(task);
    while (c->waiters)
        waiter_wake(c->waiters, 0);
    luaL_unref(L, LUA_REGISTRYINDEX, req_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, res_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, task_ref);
    buf_free(&c->in);
    buf_free(&c->out);
    buf_free(&c->scratch);
    buf_free(&c->body);
    free(c->hdrs);
    free(c);
}

/* The output is flushed and c must close. After a refused request the
 * client may still be sending: closing now would reset the connection and
 * could destroy the error response, so stop writing and drain its input
 * for a while first. Returns -1 when c was freed. */
static int conn_finish_close(lua_State *L, srv_conn *c)
{
    struct ev_loop *loop = c->srv->rt->loop;
    if (c->linger && !c->lingering) {
        c->lingering = 1;
        shutdown(c->fd, SHUT_WR);
        ev_timer_stop(loop, &c->to_w); /* the linger timer bounds it now */
        ev_io_start(loop, &c->rw);
        ev_timer_start(loop, &c->linger_w);
        return 0;
    }
    conn_free(L, c, SRV_PLAIN);
    return -1;
}

/* c's response is complete: detach it and go on with the next request. */
static void conn_end_response(lua_State *L, srv_conn *c)
{
    struct ev_loop *loop = c->srv->rt->loop;
    srv_res *r = c->res;

    r->finished = 1;
    r->conn = NULL;
    c->res = NULL;
    c->task = NULL;
    if (!r->keep_alive || r->close) c->close_after = 1;
    luaL_unref(L, LUA_REGISTRYINDEX, c->req_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->res_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->task_ref);
    c->req_ref = c->res_ref = c->task_ref = LUA_NOREF;
    c->served++;
    c->phase_at = ev_now(loop);
    if (c->close_after) {
        ev_io_stop(loop, &c->rw);
        if (!out_pending(c)) conn_finish_close(L, c);
        return;
    }
    if (c->read_paused) {
        c->read_paused = 0;
        ev_io_start(loop, &c->rw);
    }
    conn_timer_update(c);
    /* Pipelined input: parsed from the loop, so that the next handler task
     * is not started from (and parented to) the task finishing this one. */
    if (c->in.off < c->in.len) ev_feed_event(loop, &c->rw, EV_CUSTOM);
}

/* The headers table of an on_headers answer (name = string or number), on
 * the output. Returns an error message or NULL. */
static const char *answer_headers(lua_State *L, int hidx, srv_buf *b)
{
    lua_checkstack(L, 3);
    lua_pushnil(L);
    while (lua_next(L, hidx)) {
        const char *name, *val;
        size_t nl, vl;
        if (lua_type(L, -2) != LUA_TSTRING) return "header names must be strings";
        name = lua_tolstring(L, -2, &nl);
        if (!is_token(name, nl)) return "invalid header name";
        if (name_is(name, nl, "content-length") || name_is(name, nl, "transfer-encoding") ||
            name_is(name, nl, "connection") || name_is(name, nl, "content-type"))
            return "the server sets content-length, transfer-encoding, connection, content-type";
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
            return "header values must be strings or numbers";
        val = lua_tolstring(L, -1, &vl); /* converts the value slot only: lua_next is safe */
        if (!is_field_value(val, vl)) return "invalid header value";
        if (buf_add(b, name, nl) || buf_lit(b, ": ") || buf_add(b, val, vl) || buf_lit(b, "\r\n"))
            return "out of memory";
        lua_pop(L, 1);
    }
    return NULL;
}

/* Queues the answer to a refused request (hidx: a headers table or 0) and
 * makes c close after it: no more input is read, and the close lingers.
 * Returns an error message, leaving the output as it was, or NULL. */
static const char *answer_queue(lua_State *L, srv_conn *c, int status, const char *type,
                                const char *body, size_t len, int hidx)
{
    srv_buf *b = &c->out;
    size_t mark = b->len - b->off;
    const char *err = "out of memory";

    if (buf_fmt(b,
                "HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %zu\r\n"
                "connection: close\r\n",
                status, srv_reason(status), type, len))
        goto fail;
    if (hidx && (err = answer_headers(L, hidx, b)) != NULL) goto fail;
    err = "out of memory";
    if (buf_lit(b, "\r\n") || buf_add(b, body, len)) goto fail;
    c->close_after = 1;
    c->linger = 1;
    c->in.off = c->in.len = 0;
    ev_io_stop(c->srv->rt->loop, &c->rw);
    return NULL;
fail:
    b->len = b->off + mark;
    return err;
}

/* Sends a queued answer; c closes once it is out. Returns -1 when c was
 * freed. */
static int answer_send(lua_State *L, srv_conn *c)
{
    if (conn_send(c, NULL, 0) < 0) {
        conn_free(L, c, SRV_PLAIN);
        return -1;
    }
    if (!out_pending(c)) return conn_finish_close(L, c);
    conn_timer_update(c); /* the send timeout: a client that does not read */
    return 0;
}

/* Run protected: on_refuse(status, req) -> body[, content type], req
 * holding the body read so far. */
static int refuse_call(lua_State *L)
{
    srv_conn *c = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->srv->refuse_ref);
    lua_pushvalue(L, 2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->req_ref);
    lua_pushlstring(L, c->body.len ? c->body.p : "", c->body.len);
    lua_setfield(L, -2, "body");
    lua_call(L, 2, 2);
    return 2;
}

/* Answers a request refused while parsing, then closes. Once its headers
 * are in, on_refuse may word the answer. Returns -1 when c was freed. */
static int conn_reject(lua_State *L, srv_conn *c, int status)
{
    const char *body = status == 413   ? "payload too large\n"
                       : status == 500 ? "internal server error\n"
                       : status == 408 ? "request timeout\n"
                       : status == 431 ? "request header fields too large\n"
                       : status == 503 ? "service unavailable\n"
                                       : "bad request\n";
    const char *type = "text/plain";
    size_t len = strlen(body), tlen;
    int top = lua_gettop(L), failed;
    if (status == 503) buf_free(&c->body); /* max_buffered: on_refuse must not copy it either */
    if (c->srv->refuse_ref != LUA_NOREF && c->phase == PH_BODY && c->req_ref != LUA_NOREF) {
        lua_checkstack(L, 4);
        lua_pushcfunction(L, refuse_call);
        lua_pushlightuserdata(L, c);
        lua_pushinteger(L, status);
        c->srv->in_hook = 1;
        int rc = lua_pcall(L, 2, 2, 0);
        c->srv->in_hook = 0;
        if (rc != LUA_OK) {
            aiorch_report(c->srv->rt, "aiorch.server: on_refuse: %s", lua_tostring(L, -1));
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            body = lua_tolstring(L, -2, &len);
            if (lua_type(L, -1) == LUA_TSTRING) {
                const char *t = lua_tolstring(L, -1, &tlen);
                if (tlen > 0 && is_field_value(t, tlen) && strlen(t) == tlen) type = t;
            }
        }
    }
    failed = answer_queue(L, c, status, type, body, len, 0) != NULL;
    lua_settop(L, top); /* body and type were copied */
    buf_free(&c->body); /* no use any more: back to max_buffered at once */
    if (failed) {
        conn_free(L, c, SRV_PLAIN);
        return -1;
    }
    return answer_send(L, c);
}

/* ---- responses -------------------------------------------------------- */

/* One entry of a res:start / res:respond headers table: key at -2, value
 * at -1. Returns an error message or NULL. */
static const char *res_header(lua_State *L, srv_res *r, srv_buf *b, int64_t body_len)
{
    const char *name, *val;
    size_t nl, vl;

    if (lua_type(L, -2) != LUA_TSTRING) return "header names must be strings";
    name = lua_tolstring(L, -2, &nl);
    if (!is_token(name, nl)) return "invalid header name";
    if (lua_type(L, -1) == LUA_TTABLE) { /* repeated header: one line each */
        lua_Integer i, n = luaL_len(L, -1);
        if (name_is(name, nl, "content-length") || name_is(name, nl, "transfer-encoding") ||
            name_is(name, nl, "connection"))
            return "invalid header value";
        for (i = 1; i <= n; i++) {
            int t = lua_rawgeti(L, -1, i);
            if (t != LUA_TSTRING && t != LUA_TNUMBER) return "header values must be strings";
            val = lua_tolstring(L, -1, &vl);
            if (!is_field_value(val, vl)) return "invalid header value";
            if (buf_add(b, name, nl) || buf_lit(b, ": ") || buf_add(b, val, vl) ||
                buf_lit(b, "\r\n"))
                return "out of memory";
            lua_pop(L, 1);
        }
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
        return "header values must be strings or numbers";
    val = lua_tolstring(L, -1, &vl); /* converts the value slot only: lua_next is safe */
    if (!is_field_value(val, vl)) return "invalid header value";
    if (name_is(name, nl, "content-length")) {
        uint64_t v = 0;
        size_t i;
        if (vl == 0 || vl > 19) return "invalid content-length";
        for (i = 0; i < vl; i++) {
            if (val[i] < '0' || val[i] > '9') return "invalid content-length";
            v = v * 10 + (uint64_t)(val[i] - '0');
        }
        if (body_len >= 0 && !r->head) return NULL; /* ours, from the body, is sent */
        r->has_length = 1;
        r->length = v;
    } else if (name_is(name, nl, "transfer-encoding")) {
        return NULL; /* the framing is ours */
    } else if (name_is(name, nl, "connection")) {
        if (has_token(val, vl, "close")) r->close = 1;
        return NULL; /* sent below, once we know */
    }
    if (buf_add(b, name, nl) || buf_lit(b, ": ") || buf_add(b, val, vl) || buf_lit(b, "\r\n"))
        return "out of memory";
    return NULL;
}

/* Appends the status line and headers to the output. body_len < 0: the
 * length is unknown (res:start), so the body goes chunked (HTTP/1.1) or
 * until the connection closes (HTTP/1.0). hidx: the headers table or 0.
 * Returns an error message, leaving the output as it was, or NULL. */
static const char *res_head(lua_State *L, srv_res *r, int status, int hidx, int64_t body_len,
                            const char *extra)
{
    srv_buf *b = &r->conn->out;
    size_t mark = b->len - b->off;
    const char *err = "out of memory";
    int bodyless = status < 200 || status == 204 || status == 304;

    r->no_body = r->head || bodyless;
    if (buf_status_line(b, status)) goto fail;
    if (extra && buf_add(b, extra, strlen(extra))) goto fail;
    if (hidx) {
        int top = lua_gettop(L);
        lua_checkstack(L, 4);
        lua_pushnil(L);
        while (lua_next(L, hidx)) {
            err = res_header(L, r, b, body_len);
            if (err) {
                lua_settop(L, top);
                goto fail;
            }
            lua_pop(L, 1);
        }
        err = "out of memory";
    }
    if (bodyless) {
        /* no framing at all */
    } else if (body_len >= 0) {
        if (!r->has_length && (buf_lit(b, "content-length: ") || buf_uint(b, (uint64_t)body_len) ||
                               buf_lit(b, "\r\n")))
            goto fail;
    } else if (r->has_length || r->head) {
        /* raw body of the given length (or none for HEAD) */
    } else if (!r->http10) {
        if (buf_lit(b, "transfer-encoding: chunked\r\n")) goto fail;
        r->chunked = 1;
    } else {
        r->close = 1; /* HTTP/1.0 has no chunks: the close ends the body */
    }
    if (!r->keep_alive || r->close) {
        if (buf_lit(b, "connection: close\r\n")) goto fail;
    } else if (r->http10) {
        if (buf_lit(b, "connection: keep-alive\r\n")) goto fail;
    }
    if (buf_lit(b, "\r\n")) goto fail;
    r->started = 1;
    r->status = status;
    return NULL;
fail:
    b->len = b->off + mark;
    r->chunked = r->has_length = r->close = 0;
    return err;
}

/* Sends body bytes (framed when chunked); last ends the body. Also flushes
 * a queued head. Returns -1 when the connection failed and was closed. */
static int res_body(lua_State *L, srv_res *r, const char *data, size_t n, int last)
{
    static const char crlf[] = "\r\n", crlf_end[] = "\r\n0\r\n\r\n";
    srv_conn *c = r->conn;
    struct iovec iov[3];
    char hex[24];
    int k = 0;

    if (r->no_body) n = 0;
    if (r->chunked) {
        if (n) {
            iov[k].iov_base = hex;
            iov[k++].iov_len = (size_t)snprintf(hex, sizeof hex, "%zx\r\n", n);
            iov[k].iov_base = (void *)data;
            iov[k++].iov_len = n;
            iov[k].iov_base = (void *)(last ? crlf_end : crlf);
            iov[k++].iov_len = last ? sizeof crlf_end - 1 : sizeof crlf - 1;
        } else if (last) {
            iov[k].iov_base = (void *)(crlf_end + 2);
            iov[k++].iov_len = sizeof crlf_end - 3;
        }
    } else if (n) {
        iov[k].iov_base = (void *)data;
        iov[k++].iov_len = n;
    }
    r->sent += n;
    if (conn_send(c, iov, k) < 0) {
        conn_fail(L, c);
        return -1;
    }
    return 0;
}

/* The handler task ended and its response is still open. */
static void res_end(lua_State *L, srv_res *r, int failed, int res_idx)
{
    static const char oops[] = "internal server error\n";
    srv_conn *c = r->conn;

    if (!r->started) {
        const char *body = failed ? oops : "";
        size_t n = failed ? sizeof oops - 1 : 0;
        const char *type = "content-type: text/plain\r\n";
        char line[128];
        /* A failed handler's answer may be set beforehand (res:on_error). */
        if (failed && lua_getiuservalue(L, res_idx, 1) == LUA_TSTRING) {
            body = lua_tolstring(L, -1, &n);
            lua_getiuservalue(L, res_idx, 2);
            snprintf(line, sizeof line, "content-type: %s\r\n", lua_tostring(L, -1));
            lua_pop(L, 1);
            type = line;
        }
        if (res_head(L, r, failed ? 500 : r->status, 0, (int64_t)n, failed ? type : NULL)) {
            conn_free(L, c, SRV_PLAIN);
            return;
        }
        if (res_body(L, r, body, n, 1) == 0) conn_end_response(L, c);
        return;
    }
    /* A cut-short body must not look complete: close instead. */
    if (failed || (r->has_length && !r->no_body && r->sent != r->length)) {
        conn_free(L, c, SRV_PLAIN);
        return;
    }
    if (res_body(L, r, NULL, 0, 1) == 0) conn_end_response(L, c);
}

static srv_res *res_check(lua_State *L, int i)
{
    return luaL_checkudata(L, i, RES_MT);
}

static int res_status_arg(lua_State *L, int i)
{
    lua_Integer st = luaL_checkinteger(L, i);
    luaL_argcheck(L, st >= 200 && st <= 999, i, "status must be in 200..999");
    return (int)st;
}

static void res_usable(lua_State *L, srv_res *r)
{
    if (r->finished) luaL_error(L, "response already finished");
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
    srv_res *r = res_check(L, 1);
    int status = res_status_arg(L, 2);
    const char *err;

    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    res_usable(L, r);
    if (r->started) return luaL_error(L, "response already started");
    if (!r->conn) return res_closed(L);
    err = res_head(L, r, status, lua_istable(L, 3) ? 3 : 0, -1, NULL);
    if (err) return luaL_argerror(L, 3, err);
    if (res_body(L, r, NULL, 0, 0) < 0) return res_closed(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* res:write(data): yields while more than SRV_HIGH_WATER is unsent */
static int res_write(lua_State *L)
{
    srv_res *r = res_check(L, 1);
    size_t n;
    const char *data = luaL_checklstring(L, 2, &n);
    aiorch_task *t;
    srv_waiter *w;
    srv_conn *c;

    res_usable(L, r);
    t = aiorch_task_require(r->rt, L, "response:write");
    if (!r->conn) return res_closed(L);
    if (!r->started) {
        const char *err = res_head(L, r, r->status, 0, -1, NULL);
        if (err) return luaL_error(L, "%s", err);
    }
    if (r->has_length && !r->no_body && n > r->length - r->sent)
        return luaL_error(L, "body exceeds its content-length");
    if (res_body(L, r, data, n, 0) < 0) return res_closed(L);
    c = r->conn;
    if (out_pending(c) <= SRV_HIGH_WATER) {
        lua_pushboolean(L, 1);
        return 1;
    }
    w = malloc(sizeof *w);
    if (!w) return luaL_error(L, "out of memory");
    w->op.cancel = waiter_cancel;
    w->task = t;
    w->next = c->waiters;
    if (w->next) w->next->pprev = &w->next;
    w->pprev = &c->waiters;
    c->waiters = w;
    aiorch_task_wait(t, &w->op);
    return lua_yield(L, 0);
}

/* res:finish([data]) */
static int res_finish(lua_State *L)
{
    srv_res *r = res_check(L, 1);
    size_t n = 0;
    const char *data = luaL_optlstring(L, 2, NULL, &n);

    res_usable(L, r);
    if (!r->conn) return res_closed(L);
    if (!r->started) {
        const char *err = res_head(L, r, r->status, 0, (int64_t)n, NULL);
        if (err) return luaL_error(L, "%s", err);
    } else if (r->has_length && !r->no_body && r->sent + n != r->length) {
        return luaL_error(L, r->sent + n > r->length ? "body exceeds its content-length"
                                                     : "body shorter than its content-length");
    }
    if (res_body(L, r, data, n, 1) < 0) return res_closed(L);
    conn_end_response(L, r->conn);
    lua_pushboolean(L, 1);
    return 1;
}

/* res:respond(status, headers, body) */
static int res_respond(lua_State *L)
{
    srv_res *r = res_check(L, 1);
    int status = res_status_arg(L, 2);
    size_t n;
    const char *body, *err;

    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    body = luaL_optlstring(L, 4, "", &n);
    res_usable(L, r);
    if (r->started) return luaL_error(L, "response already started");
    if (!r->conn) return res_closed(L);
    err = res_head(L, r, status, lua_istable(L, 3) ? 3 : 0, (int64_t)n, NULL);
    if (err) return luaL_argerror(L, 3, err);
    if (res_body(L, r, body, n, 1) < 0) return res_closed(L);
    conn_end_response(L, r->conn);
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
    srv_res *r = res_check(L, 1);
    if (r->conn) conn_free(L, r->conn, SRV_PLAIN);
    return 0;
}

static int res_tostring(lua_State *L)
{
    srv_res *r = res_check(L, 1);
    lua_pushfstring(L, "aiorch.server.response (%s)",
                    r->finished ? "finished"
                    : r->conn   ? "open"
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
    srv_res *r = g->res;
    int failed = status != LUA_OK && status != LUA_YIELD;

    (void)ctx;
    g->res = NULL; /* disarm: the guard's __close runs as we return */
    if (failed) handler_report(L, g->rt);
    if (r && r->conn) res_end(L, r, failed, 3);
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

static srv_guard *guard_check(lua_State *L, int i)
{
    return luaL_checkudata(L, i, GUARD_MT);
}

/* __close and __gc of a request's guard: still armed means the handler
 * task ended without handler_done (it was cancelled or dropped), so the
 * response can't be completed; the connection is closed. */
static int guard_close(lua_State *L)
{
    srv_guard *g = guard_check(L, 1);
    srv_res *r = g->res;
    g->res = NULL;
    if (r && r->conn) conn_free(L, r->conn, SRV_PLAIN);
    return 0;
}

/* ---- requests --------------------------------------------------------- */

static void req_push(lua_State *L, srv_conn *c)
{
    srv_server *s = c->srv;
    char *sc = c->scratch.p;
    size_t i, j;

    lua_createtable(L, 0, 7);
    lua_pushstring(L, http_method_str((enum http_method)c->parser.method));
    lua_setfield(L, -2, "method");
    lua_pushlstring(L, c->url_len ? sc : "", c->url_len);
    lua_setfield(L, -2, "path");
    lua_createtable(L, 0, (int)c->nhdrs);
    for (i = 0; i < c->nhdrs; i++) {
        srv_hdr *h = &c->hdrs[i];
        char *name = sc + h->name;
        const char *val = h->value_len ? sc + h->value : "";
        for (j = 0; j < h->name_len; j++)
            if (name[j] >= 'A' && name[j] <= 'Z') name[j] = (char)(name[j] - 'A' + 'a');
        lua_pushlstring(L, name, h->name_len);
        lua_pushvalue(L, -1);
        if (lua_rawget(L, -3) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushlstring(L, val, h->value_len);
        } else { /* a repeated header: values joined as HTTP allows */
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, val, h->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "headers");
    lua_pushinteger(L, ++s->next_id);
    lua_setfield(L, -2, "id");
    lua_pushnumber(L, aiorch_now_ms());
    lua_setfield(L, -2, "received_at");
}

/* Run protected: c's req table, made once its headers are in (for
 * on_headers, on_refuse and the handler), kept as c->req_ref. */
static int req_build(lua_State *L)
{
    srv_conn *c = lua_touserdata(L, 1);
    req_push(L, c);
    c->req_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Adds the body to req and makes res for the parsed request, then starts
 * its handler task. Run protected: everything here allocates. */
static int request_spawn(lua_State *L)
{
    srv_conn *c = lua_touserdata(L, 1);
    srv_server *s = c->srv;
    srv_res *r;
    srv_guard *g;

    lua_pushcfunction(L, handler_task);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->req_ref);
    lua_pushlstring(L, c->body.len ? c->body.p : "", c->body.len);
    lua_setfield(L, -2, "body");
    r = lua_newuserdatauv(L, sizeof *r, 2); /* res:on_error's body and type */
    memset(r, 0, sizeof *r);
    r->rt = s->rt;
    r->status = 200;
    r->head = c->parser.method == HTTP_HEAD;
    r->http10 = !(c->parser.http_major == 1 && c->parser.http_minor >= 1);
    r->keep_alive = c->keep_alive && !c->parser.upgrade && !s->shutting;
    luaL_setmetatable(L, RES_MT);
    lua_pushvalue(L, -1);
    c->res_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    r->conn = c;
    c->res = r;
    g = lua_newuserdatauv(L, sizeof *g, 1);
    g->res = r;
    g->rt = s->rt;
    lua_pushvalue(L, -2); /* the guard keeps res alive while it may read it */
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, GUARD_MT);
    c->task = aiorch_task_spawn(s->rt, L, 4);
    c->task_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->requests++;
    return 0;
}

/* Returns -1 when c was freed. */
static int conn_dispatch(lua_State *L, srv_conn *c)
{
    lua_checkstack(L, 8);
    lua_pushcfunction(L, request_spawn);
    lua_pushlightuserdata(L, c);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        aiorch_report(c->srv->rt, "aiorch.server: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        conn_free(L, c, SRV_PLAIN);
        return -1;
    }
    /* req has copies: a long response (a stream) must not hold these */
    buf_free(&c->scratch);
    buf_free(&c->body);
    free(c->hdrs);
    c->hdrs = NULL;
    c->nhdrs = c->hdrs_cap = 0;
    return 0;
}

/* ---- parsing (http_parser callbacks) ---------------------------------- */

static int parse_oom(srv_conn *c)
{
    c->reject = 500;
    return -1;
}

/* The request line and headers are held in scratch: bound them (431). */
static int head_check(srv_conn *c)
{
    if (c->scratch.len <= c->srv->max_header) return 0;
    c->reject = 431;
    return -1;
}

/* http_parser on_message_begin */
static int on_message_begin(http_parser *p)
{
    srv_conn *c = p->data;
    c->phase = PH_HEAD;
    c->phase_at = ev_now(c->srv->rt->loop);
    c->scratch.len = 0;
    c->body.len = 0;
    c->url_len = 0;
    c->nhdrs = 0;
    c->hstate = 0;
    c->line_done = 0;
    c->reject = 0;
    return 0;
}

/* http_parser on_url */
static int on_url(http_parser *p, const char *at, size_t n)
{
    srv_conn *c = p->data;
    if (buf_add(&c->scratch, at, n)) return parse_oom(c);
    c->url_len += n;
    return head_check(c);
}

/* http_parser on_header_field. http_parser (built without strict mode)
 * lets spaces into a name: "Foo : bar" would pass as the header "foo ",
 * and "Content-Length : 5" would not frame the body. A field name is a
 * token (RFC 9112 5.1): 400 otherwise. */
static int on_header_field(http_parser *p, const char *at, size_t n)
{
    srv_conn *c = p->data;
    srv_hdr *h;
    size_t i;

    for (i = 0; i < n; i++)
        if (!is_tchar((unsigned char)at[i])) {
            c->reject = 400;
            return -1;
        }
    if (c->hstate != 1) {
        if (c->nhdrs == SRV_MAX_HEADERS) {
            c->reject = 400;
            return -1;
        }
        if (c->nhdrs == c->hdrs_cap) {
            size_t cap = c->hdrs_cap ? c->hdrs_cap * 2 : 16;
            srv_hdr *nh = realloc(c->hdrs, cap * sizeof *nh);
            if (!nh) return parse_oom(c);
            c->hdrs = nh;
            c->hdrs_cap = cap;
        }
        h = &c->hdrs[c->nhdrs++];
        h->name = h->value = c->scratch.len;
        h->name_len = h->value_len = 0;
        c->hstate = 1;
        c->line_done = 0;
    }
    h = &c->hdrs[c->nhdrs - 1];
    if (buf_add(&c->scratch, at, n)) return parse_oom(c);
    h->name_len += n;
    return head_check(c);
}

/* Whether a piece of a header value starts a folded line: only blanks
 * between it and a line end before it (in the bytes http_parser was given). */
static int value_folded(const srv_conn *c, const char *at)
{
    const char *q = at;
    while (q > c->parse_start && (q[-1] == ' ' || q[-1] == '\t'))
        q--;
    return q > c->parse_start && q[-1] == '\n';
}

/* http_parser on_header_value. http_parser joins an obsolete line fold
 * ("Foo: a\r\n b") to the value; a server must refuse it or replace it
 * (RFC 9112 5.2): 400. A value's piece after its line ended, or right
 * after a line end and blanks, is a fold. (An empty value comes as an
 * empty piece at the start of the next line.) */
static int on_header_value(http_parser *p, const char *at, size_t n)
{
    srv_conn *c = p->data;
    srv_hdr *h;

    if (c->nhdrs == 0) return -1;
    if (n > 0 && ((c->hstate == 2 && c->line_done) || value_folded(c, at))) {
        c->reject = 400;
        return -1;
    }
    h = &c->hdrs[c->nhdrs - 1];
    if (c->hstate != 2) {
        h->value = c->scratch.len;
        c->hstate = 2;
    }
    c->line_done = at + n < c->parse_end && (at[n] == '\r' || at[n] == '\n');
    if (buf_add(&c->scratch, at, n)) return parse_oom(c);
    h->value_len += n;
    return head_check(c);
}

static int conn_expects_continue(srv_conn *c)
{
    size_t i;
    for (i = 0; i < c->nhdrs; i++) {
        srv_hdr *h = &c->hdrs[i];
        if (name_is(c->scratch.p + h->name, h->name_len, "expect") &&
            name_is(c->scratch.p + h->value, h->value_len, "100-continue"))
            return 1;
    }
    return 0;
}

/* Run protected: on_headers(req) -> nothing, or status, body[, content
 * type[, headers]]. */
static int headers_call(lua_State *L)
{
    srv_conn *c = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->srv->headers_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->req_ref);
    lua_call(L, 1, 4);
    return 4;
}

/* Calls on_headers, from inside http_parser: it must not yield, nor close
 * the server. Returns 0 to go on, or -1 with c->reject set: SRV_ANSWERED
 * (its answer is queued) or 500 (it raised or answered nonsense). */
static int headers_hook(srv_conn *c)
{
    srv_server *s = c->srv;
    lua_State *L = s->rt->S;
    int top = lua_gettop(L), rc, isnum;
    const char *err = NULL, *body = "", *type = "text/plain";
    lua_Integer status;
    size_t len = 0, tlen;

    lua_checkstack(L, 8);
    lua_pushcfunction(L, headers_call);
    lua_pushlightuserdata(L, c);
    s->in_hook = 1;
    rc = lua_pcall(L, 1, 4, 0);
    s->in_hook = 0;
    if (rc != LUA_OK) {
        aiorch_report(s->rt, "aiorch.server: on_headers: %s", lua_tostring(L, -1));
        lua_settop(L, top);
        c->reject = 500;
        return -1;
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
            if (tlen == 0 || !is_field_value(type, tlen) || strlen(type) != tlen)
                err = "bad content type";
        }
    }
    if (!err) {
        int hidx = lua_istable(L, top + 4) ? top + 4 : 0;
        err = answer_queue(L, c, (int)status, type, body, len, hidx);
    }
    lua_settop(L, top);
    if (err) {
        aiorch_report(s->rt, "aiorch.server: on_headers: %s", err);
        c->reject = 500;
        return -1;
    }
    c->reject = SRV_ANSWERED;
    return -1;
}

/* http_parser on_headers_complete: req is made, on_headers may answer
 * before any of the body is read, and the body's size is checked. */
static int on_headers_complete(http_parser *p)
{
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    srv_conn *c = p->data;
    srv_server *s = c->srv;
    lua_State *L = s->rt->S;
    int sized = !(p->flags & F_CHUNKED) && p->content_length != ULLONG_MAX;
    int has_body = (p->flags & F_CHUNKED) || (sized && p->content_length > 0);
    int expects = has_body && p->http_major == 1 && p->http_minor >= 1 && conn_expects_continue(c);

    c->keep_alive = http_should_keep_alive(p) != 0;
    c->phase = PH_BODY;
    c->phase_at = c->read_at = ev_now(s->rt->loop);
    luaL_unref(L, LUA_REGISTRYINDEX, c->req_ref);
    c->req_ref = LUA_NOREF;
    lua_checkstack(L, 4);
    lua_pushcfunction(L, req_build);
    lua_pushlightuserdata(L, c);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        lua_pop(L, 1);
        return parse_oom(c);
    }
    /* req has copies: a slow body must not hold these as well */
    buf_free(&c->scratch);
    free(c->hdrs);
    c->hdrs = NULL;
    c->nhdrs = c->hdrs_cap = 0;
    if (s->headers_ref != LUA_NOREF && headers_hook(c) < 0) return -1;
    if (sized && p->content_length > s->max_body) { /* refuse before reading it */
        c->reject = 413;
        return -1;
    }
    if (sized && pool_full(&s->pool, p->content_length)) {
        c->reject = 503; /* max_buffered: it would not fit */
        return -1;
    }
    c->body.ceil = sized ? (size_t)p->content_length : 0; /* grown as it arrives, up to that */
    /* A client waiting for "100 Continue" would otherwise stall. */
    if (expects) {
        struct iovec v;
        v.iov_base = (void *)cont;
        v.iov_len = sizeof cont - 1;
        if (conn_send(c, &v, 1) < 0) {
            c->failed = 1;
            return -1;
        }
    }
    return 0;
}

/* http_parser on_body: max_body answers 413, max_buffered 503. */
static int on_body(http_parser *p, const char *at, size_t n)
{
    srv_conn *c = p->data;
    int rc;
    if (n > c->srv->max_body - c->body.len) {
        c->reject = 413;
        return -1;
    }
    rc = buf_add(&c->body, at, n);
    if (rc == BUF_OVER) {
        c->reject = 503;
        return -1;
    }
    if (rc) return parse_oom(c);
    return 0;
}

/* http_parser on_message_complete: pausing leaves pipelined bytes unparsed
 * until this request's response is finished. */
static int on_message_complete(http_parser *p)
{
    ((srv_conn *)p->data)->phase = PH_NONE;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings srv_parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* Parses input (c->in, or bytes just read) until a request is complete
 * (and dispatched) or the input runs out. Returns -1 when c was freed. */
static int conn_parse(lua_State *L, srv_conn *c, srv_buf *in)
{
    while (!c->res && !c->close_after && in->off < in->len) {
        size_t n;
        enum http_errno e;

        if (out_pending(c) > SRV_HIGH_WATER) break; /* resumed as the output drains */
        c->parse_start = in->p + in->off;
        c->parse_end = in->p + in->len;
        n = http_parser_execute(&c->parser, &srv_parser_settings, in->p + in->off, in->len - in->off);
        in->off += n;
        e = HTTP_PARSER_ERRNO(&c->parser);
        if (c->failed) {
            conn_free(L, c, SRV_PLAIN);
            return -1;
        }
        if (e == HPE_PAUSED) {
            http_parser_pause(&c->parser, 0);
            if (conn_dispatch(L, c) < 0) return -1;
        } else if (e != HPE_OK) {
            if (c->reject == SRV_ANSWERED) return answer_send(L, c);
            return conn_reject(L, c, c->reject ? c->reject : e == HPE_HEADER_OVERFLOW ? 431 : 400);
        }
    }
    if (in->off == in->len) {
        if (in == &c->in)
            buf_free(in);
        else
            in->off = in->len = 0;
    }
    conn_timer_update(c);
    return 0;
}

static int conn_process(lua_State *L, srv_conn *c)
{
    return conn_parse(L, c, &c->in);
}

/* ---- socket events ---------------------------------------------------- */

/* EOF or a read error from the client. */
static void conn_eof(lua_State *L, srv_conn *c, int clean)
{
    if (c->res) { /* it went away before its response was finished */
        conn_free(L, c, SRV_GONE);
        return;
    }
    if (clean && out_pending(c)) { /* half-closed: it may still read what is queued */
        c->close_after = 1;
        c->linger = 0;
        ev_io_stop(c->srv->rt->loop, &c->rw);
        return;
    }
    conn_free(L, c, SRV_PLAIN);
}

/* Reads what a lingering connection still sends, only to drop it. */
static void conn_drain(lua_State *L, srv_conn *c)
{
    char tmp[4096];
    for (;;) {
        ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n > 0) continue;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        conn_free(L, c, SRV_PLAIN);
        return;
    }
}

/* Reads what the client sent; parses it when no request is running. */
static void conn_read(struct ev_loop *loop, lua_State *L, srv_conn *c)
{
    char tmp[SRV_READ_SIZE];
    int i;

    for (i = 0; i < 8; i++) {
        srv_buf *b = &c->in;
        ssize_t n;

        if ((c->res || out_pending(c) > SRV_HIGH_WATER) &&
            (b->len - b->off >= SRV_IN_LIMIT || pool_full(&c->srv->pool, SRV_READ_SIZE))) {
            /* enough pipelined input: wait for the running request or output */
            ev_io_stop(loop, &c->rw);
            c->read_paused = 1;
            return;
        }
        n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n > 0) {
            if (c->phase == PH_BODY) c->read_at = ev_now(loop);
            if (b->off == b->len && !c->res && out_pending(c) <= SRV_HIGH_WATER) {
                /* parsed in place; only bytes past a complete request are kept */
                srv_buf view = {.p = tmp, .len = (size_t)n, .cap = sizeof tmp};
                if (conn_parse(L, c, &view) < 0 || c->close_after) return;
                if (view.off < view.len && buf_add(b, tmp + view.off, view.len - view.off)) {
                    conn_free(L, c, c->res ? SRV_CANCEL : SRV_PLAIN);
                    return;
                }
            } else {
                if (buf_add(b, tmp, (size_t)n)) {
                    conn_free(L, c, c->res ? SRV_CANCEL : SRV_PLAIN);
                    return;
                }
                if (!c->res && conn_process(L, c) < 0) return;
                if (c->close_after) return;
            }
            if ((size_t)n < sizeof tmp) return;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        conn_eof(L, c, n == 0);
        return;
    }
}

/* ev_io read watcher (EV_CUSTOM when fed by conn_end_response: parse only) */
static void conn_on_read(struct ev_loop *loop, ev_io *w, int revents)
{
    srv_conn *c = w->data;
    aiorch_runtime *rt = c->srv->rt;

    if (c->lingering)
        conn_drain(rt->S, c);
    else if (!(revents & EV_READ)) {
        if (!c->res) conn_process(rt->S, c);
    } else
        conn_read(loop, rt->S, c);
    aiorch_sched_drain(rt); /* run the handler tasks started or cancelled here */
}

/* Writes queued output; wakes writers below the high-water mark and goes
 * on with pipelined input held back by it. */
static void conn_flush(struct ev_loop *loop, lua_State *L, srv_conn *c)
{
    while (out_pending(c)) {
        ssize_t n = send(c->fd, c->out.p + c->out.off, out_pending(c), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_fail(L, c);
            return;
        }
        c->out.off += (size_t)n;
        c->sent_at = ev_now(loop);
    }
    if (!out_pending(c)) {
        ev_io_stop(loop, &c->ww);
        buf_free(&c->out);
        if (!c->res && c->phase == PH_NONE) c->phase_at = ev_now(loop); /* idle from now */
    }
    conn_wake_writers(c);
    if (!out_pending(c) && c->close_after) {
        conn_finish_close(L, c);
        return;
    }
    if (c->res || out_pending(c) > SRV_HIGH_WATER) return;
    if (c->read_paused && !c->close_after) {
        c->read_paused = 0;
        ev_io_start(loop, &c->rw);
    }
    if (c->in.off < c->in.len)
        conn_process(L, c);
    else
        conn_timer_update(c);
}

/* ev_io write watcher */
static void conn_on_write(struct ev_loop *loop, ev_io *w, int revents)
{
    srv_conn *c = w->data;
    aiorch_runtime *rt = c->srv->rt;

    (void)revents;
    conn_flush(loop, rt->S, c);
    aiorch_sched_drain(rt); /* run the writers woken here */
}

/* ev_timer: the lingering close has waited long enough */
static void conn_on_linger(struct ev_loop *loop, ev_timer *w, int revents)
{
    srv_conn *c = w->data;
    (void)loop;
    (void)revents;
    conn_free(c->srv->rt->S, c, SRV_PLAIN);
}

/* The earlier of deadline due (0: none) and since + to (to 0: none). */
static ev_tstamp sooner(ev_tstamp due, ev_tstamp since, double to)
{
    if (to <= 0) return due;
    return due == 0 || since + to < due ? since + to : due;
}

/* When c times out where it is (0: never). Between requests, the idle
 * timeout from the accept or the end of the last response; in a request's
 * headers, the header timeout from its first byte; in its body, the body
 * timeout from the end of the headers and the read timeout from the last
 * read; none while a handler works. Whenever output waits for the client,
 * the send timeout from the last write progress. */
static ev_tstamp conn_deadline(const srv_conn *c)
{
    const srv_server *s = c->srv;
    ev_tstamp due = 0;

    if (c->lingering) return 0; /* the linger timer bounds it */
    if (out_pending(c)) due = sooner(due, c->sent_at, s->send_to);
    if (c->res || c->close_after) return due;
    if (c->phase == PH_HEAD) {
        due = sooner(due, c->phase_at, s->header_to);
    } else if (c->phase == PH_BODY) {
        due = sooner(due, c->phase_at, s->body_to);
        due = sooner(due, c->read_at, s->read_to);
    } else if (!out_pending(c)) {
        due = sooner(due, c->phase_at, s->shutting ? SRV_SHUTDOWN_IDLE_S : s->idle_to);
    }
    return due;
}

/* Arms c's timer for its deadline. Between phases only: a write's progress
 * moves the send deadline without touching the timer, which, once it
 * fires early, waits for the rest (conn_on_timeout). */
static void conn_timer_update(srv_conn *c)
{
    struct ev_loop *loop = c->srv->rt->loop;
    ev_tstamp due = conn_deadline(c), after;

    ev_timer_stop(loop, &c->to_w);
    if (due == 0) return;
    after = due - ev_now(loop);
    ev_timer_set(&c->to_w, after > 0 ? after : 0., 0.);
    ev_timer_start(loop, &c->to_w);
}

/* ev_timer: a client timeout. A request partly read gets 408; a client
 * that does not read its response is taken as gone (its handler is
 * cancelled); an idle connection is closed. */
static void conn_on_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    srv_conn *c = w->data;
    srv_server *s = c->srv;
    aiorch_runtime *rt = s->rt;
    ev_tstamp now = ev_now(loop), due = conn_deadline(c);

    (void)revents;
    if (due == 0) return;
    if (due > now + 1e-3) { /* it moved on meanwhile */
        ev_timer_set(w, due - now, 0.);
        ev_timer_start(loop, w);
        return;
    }
    s->timed_out++;
    if (out_pending(c) && s->send_to > 0 && c->sent_at + s->send_to <= now + 1e-3)
        conn_free(rt->S, c, c->res ? SRV_GONE : SRV_PLAIN);
    else if (c->phase != PH_NONE)
        conn_reject(rt->S, c, 408);
    else
        conn_free(rt->S, c, SRV_PLAIN);
    aiorch_sched_drain(rt);
}

static int fd_setup(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
    return fcntl(fd, F_SETFD, FD_CLOEXEC);
}

static int srv_accept_fd(int lfd)
{
#ifdef __linux__
    return accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    int fd = accept(lfd, NULL, NULL);
    if (fd >= 0 && fd_setup(fd) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
#endif
}

static srv_conn *conn_new(srv_server *s, int fd)
{
    struct ev_loop *loop = s->rt->loop;
    int one = 1, unsent = SRV_KERNEL_UNSENT;
    srv_conn *c = calloc(1, sizeof *c);

    if (!c) return NULL;
    /* small responses must not wait for Nagle */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &unsent, sizeof unsent);
    c->srv = s;
    c->fd = fd;
    c->req_ref = c->res_ref = c->task_ref = LUA_NOREF;
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    ev_io_init(&c->rw, conn_on_read, fd, EV_READ);
    c->rw.data = c;
    ev_io_init(&c->ww, conn_on_write, fd, EV_WRITE);
    c->ww.data = c;
    ev_timer_init(&c->linger_w, conn_on_linger, SRV_LINGER_S, 0.);
    c->linger_w.data = c;
    ev_init(&c->to_w, conn_on_timeout);
    c->to_w.data = c;
    c->in.pool = c->body.pool = &s->pool;
    c->body.capped = 1; /* pipelined input pauses reading instead (conn_read) */
    c->phase_at = c->sent_at = ev_now(loop);
    c->next = s->conns;
    if (c->next) c->next->pprev = &c->next;
    c->pprev = &s->conns;
    s->conns = c;
    s->accepted++;
    s->open++;
    ev_io_start(loop, &c->rw);
    conn_timer_update(c);
    return c;
}

/* Takes a new connection; beyond max_connections it is answered 503
 * (before its request is read) and closed. */
static void srv_take(srv_server *s, int fd)
{
    int full = s->max_conns > 0 && s->open - s->refusing >= s->max_conns;
    srv_conn *c = conn_new(s, fd);
    if (!c) {
        close(fd);
        return;
    }
    if (full) {
        c->refused = 1;
        s->refusing++;
        s->refused++;
        conn_reject(s->rt->S, c, 503);
    }
}

/* Out of descriptors (or memory): the listening socket stays readable, so
 * accepting stops and a timer resumes it, after 10 ms, doubling up to 1 s
 * while it keeps failing. The connections already open are served
 * meanwhile, and the clients waiting in the backlog are taken once
 * descriptors free up (at once when one of its connections closes). One
 * line is logged as it starts, then at most one per second with the count
 * of accepts refused, and one as it ends. */
static void srv_backoff(srv_server *s, int err)
{
    struct ev_loop *loop = s->rt->loop;
    ev_tstamp now = ev_now(loop);

    s->accept_failed++;
    ev_io_stop(loop, &s->accept_w);
    if (s->backoff == 0) {
        s->backoff = SRV_BACKOFF_MIN_S;
        s->backoff_since = s->backoff_logged = now;
        s->failed_at_start = s->failed_at_log = s->accept_failed - 1;
        aiorch_report(s->rt,
                      "aiorch.server: accept on %s:%d: %s: not accepting for a while "
                      "(the open connections are still served)",
                      s->host, s->port, strerror(err));
    } else {
        s->backoff = s->backoff * 2 < SRV_BACKOFF_MAX_S ? s->backoff * 2 : SRV_BACKOFF_MAX_S;
        if (now - s->backoff_logged >= SRV_BACKOFF_MAX_S) {
            aiorch_report(s->rt,
                          "aiorch.server: accept on %s:%d: %s: accepts refused: %lld in %.1f s; "
                          "trying every %.0f ms",
                          s->host, s->port, strerror(err),
                          (long long)(s->accept_failed - s->failed_at_log), now - s->backoff_logged,
                          s->backoff * 1000);
            s->backoff_logged = now;
            s->failed_at_log = s->accept_failed;
        }
    }
    /* An expired one-shot timer keeps what was left of its delay (nothing,
     * or less): set the delay anew, or it would fire at once. */
    ev_timer_set(&s->retry_w, s->backoff, 0.);
    ev_timer_start(loop, &s->retry_w);
}

/* Takes every pending connection. */
static void srv_accept_all(srv_server *s)
{
    for (;;) {
        int fd = srv_accept_fd(s->fd);
        if (fd < 0) {
            int e = errno;
            /* A connection that failed while queued: try the next one. */
            if (e == EINTR || e == ECONNABORTED || e == EPROTO || e == EPERM || e == ENETDOWN ||
                e == ENOPROTOOPT || e == EHOSTDOWN || e == EHOSTUNREACH || e == EOPNOTSUPP ||
                e == ENETUNREACH)
                continue;
            if (e == EAGAIN || e == EWOULDBLOCK) break;
            srv_backoff(s, e); /* EMFILE, ENFILE, ENOBUFS, ENOMEM and the unexpected */
            return;
        }
        srv_take(s, fd);
    }
    if (s->backoff > 0) {
        aiorch_report(s->rt,
                      "aiorch.server: accept on %s:%d: accepting again after %.1f s "
                      "(accepts refused: %lld)",
                      s->host, s->port, ev_now(s->rt->loop) - s->backoff_since,
                      (long long)(s->accept_failed - s->failed_at_start));
        s->backoff = 0;
    }
}

/* ev_io accept watcher */
static void srv_on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    srv_accept_all(w->data);
}

/* ev_timer: accepts again after a failure */
static void srv_on_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
    srv_server *s = w->data;
    (void)revents;
    if (s->fd < 0 || s->shutting) return;
    ev_io_start(loop, &s->accept_w);
    srv_accept_all(s);
    aiorch_sched_drain(s->rt);
}

/* ---- servers ---------------------------------------------------------- */

static srv_server *srv_check(lua_State *L, int i)
{
    return luaL_checkudata(L, i, SRV_MT);
}

static srv_server *srv_check_open(lua_State *L, int i)
{
    srv_server *s = srv_check(L, i);
    if (s->closed) luaL_error(L, "attempt to use a closed server");
    return s;
}

/* Ends a shutdown: cuts the connections left (cancelling their handlers)
 * and wakes its caller with the number of requests cut. */
static void srv_shut_end(lua_State *L, srv_server *s)
{
    aiorch_task *t = s->shut_task;
    lua_Integer cut = 0;
    srv_conn *c;

    ev_timer_stop(s->rt->loop, &s->shut_w);
    s->shut_task = NULL;
    s->shutting = 2;
    for (c = s->conns; c; c = c->next)
        if (c->res || (c->phase != PH_NONE && !c->close_after)) cut++;
    while (s->conns)
        conn_free(L, s->conns, SRV_CANCEL);
    if (t) {
        lua_State *co = aiorch_task_thread(t);
        lua_checkstack(co, 1);
        lua_pushinteger(co, cut);
        aiorch_task_wake(t, 1);
    }
}

/* Stops listening, closes every connection (cancelling the handlers of
 * unfinished responses) and drops the server's references. */
static void srv_close(lua_State *L, srv_server *s)
{
    aiorch_runtime *rt = s->rt;
    int self_ref = s->self_ref;

    if (s->closed) return;
    s->closed = 1;
    ev_io_stop(rt->loop, &s->accept_w);
    ev_timer_stop(rt->loop, &s->retry_w);
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    if (s->shut_task) srv_shut_end(L, s);
    if (s->linked) {
        if (s->prev)
            s->prev->next = s->next;
        else
            rt->servers = s->next;
        if (s->next) s->next->prev = s->prev;
        s->linked = 0;
    }
    while (s->conns)
        conn_free(L, s->conns, SRV_CANCEL);
    luaL_unref(L, LUA_REGISTRYINDEX, s->handler_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, s->refuse_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, s->headers_ref);
    s->handler_ref = s->refuse_ref = s->headers_ref = LUA_NOREF;
    s->self_ref = LUA_NOREF;
    luaL_unref(L, LUA_REGISTRYINDEX, self_ref); /* last: s may be collected from here */
}

/* Opens the listening socket. Returns -1 with a message in err. */
static int srv_bind(srv_server *s, const char *host, int port, int reuseport, char *err,
                    size_t errsz)
{
    struct addrinfo hints, *res, *ai;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char portstr[8];
    int rc, fd = -1, e = 0, one = 1;

    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(portstr, sizeof portstr, "%d", port);
    rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0) {
        snprintf(err, errsz, "%s: %s", host, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        if (fd_setup(fd) == 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0 &&
            (!reuseport || setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) == 0) &&
            bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0)
            break;
        e = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        snprintf(err, errsz, "%s:%d: %s", host, port, strerror(e ? e : EADDRNOTAVAIL));
        return -1;
    }
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    s->fd = fd;
    s->port = port;
    return 0;
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

/* raise_nofile: a connection may need two descriptors (its socket and an
 * upstream one), the process SRV_NOFILE_RESERVE more. The soft
 * RLIMIT_NOFILE is raised toward that, as far as the hard one allows; if
 * that is not enough, max_connections is lowered to what fits, and one
 * line says so (as Redis does with maxclients). Returns the limit to use. */
static lua_Integer srv_fit_nofile(aiorch_runtime *rt, lua_Integer max_conns)
{
    struct rlimit rl;
    rlim_t need, reserve, fit;

    if (max_conns <= 0 || getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return max_conns;
    need = (rlim_t)max_conns * 2 + SRV_NOFILE_RESERVE;
    if (rl.rlim_cur >= need) return max_conns;
    {
        struct rlimit want = rl;
        want.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= need ? need : rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &want) == 0) rl.rlim_cur = want.rlim_cur;
    }
    if (rl.rlim_cur >= need) return max_conns;
    reserve = rl.rlim_cur / 4 < SRV_NOFILE_RESERVE ? rl.rlim_cur / 4 : SRV_NOFILE_RESERVE;
    fit = (rl.rlim_cur - reserve) / 2;
    if (fit < 1) fit = 1;
    aiorch_report(rt,
                  "aiorch.server: max_connections %lld needs %llu descriptors, but RLIMIT_NOFILE "
                  "is %llu: serving at most %llu connections",
                  (long long)max_conns, (unsigned long long)need, (unsigned long long)rl.rlim_cur,
                  (unsigned long long)fit);
    return (lua_Integer)fit;
}

/* aiorch.server.listen{host, port, handler, ...limits} */
static int srv_listen(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    const char *host = "127.0.0.1";
    lua_Integer port = 0, max_body = SRV_DEFAULT_MAX_BODY, max_conns, max_header, max_buffered;
    double header_to, body_to, read_to, idle_to, send_to;
    int reuseport, raise_nofile;
    srv_server *s;
    char err[512];
    int isnum;

    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    srv_check_options(L);
    max_conns = opt_count(L, "max_connections", SRV_DEFAULT_MAX_CONNS);
    max_header = opt_count(L, "max_header", SRV_DEFAULT_MAX_HEADER);
    max_buffered = opt_count(L, "max_buffered", SRV_DEFAULT_MAX_BUFFERED);
    header_to = opt_timeout_s(L, "header_timeout_ms", SRV_DEFAULT_HEADER_TIMEOUT_MS);
    body_to = opt_timeout_s(L, "body_timeout_ms", SRV_DEFAULT_BODY_TIMEOUT_MS);
    read_to = opt_timeout_s(L, "read_timeout_ms", SRV_DEFAULT_READ_TIMEOUT_MS);
    idle_to = opt_timeout_s(L, "idle_timeout_ms", SRV_DEFAULT_IDLE_TIMEOUT_MS);
    send_to = opt_timeout_s(L, "send_timeout_ms", SRV_DEFAULT_SEND_TIMEOUT_MS);
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
    lua_getfield(L, 1, "handler"); /* 5 */
    luaL_argcheck(L, lua_type(L, 5) == LUA_TFUNCTION, 1, "'handler' must be a function");
    lua_getfield(L, 1, "on_refuse"); /* 6 */
    luaL_argcheck(L, lua_isnil(L, 6) || lua_type(L, 6) == LUA_TFUNCTION, 1, "'on_refuse' must be a function");
    lua_getfield(L, 1, "on_headers"); /* 7 */
    luaL_argcheck(L, lua_isnil(L, 7) || lua_type(L, 7) == LUA_TFUNCTION, 1,
                  "'on_headers' must be a function");

    s = lua_newuserdatauv(L, sizeof *s, 0); /* 8 */
    memset(s, 0, sizeof *s);
    s->rt = rt;
    s->fd = -1;
    s->closed = 1; /* until bound */
    s->handler_ref = s->self_ref = s->refuse_ref = s->headers_ref = LUA_NOREF;
    s->max_body = (size_t)max_body;
    s->max_header = (size_t)max_header;
    s->pool.max = (size_t)max_buffered;
    s->max_conns = max_conns;
    s->header_to = header_to;
    s->body_to = body_to;
    s->read_to = read_to;
    s->idle_to = idle_to;
    s->send_to = send_to;
    memcpy(s->host, host, strlen(host) + 1);
    luaL_setmetatable(L, SRV_MT);
    if (srv_bind(s, host, (int)port, reuseport, err, sizeof err) < 0) {
        luaL_pushfail(L);
        lua_pushliteral(L, "listen");
        lua_pushstring(L, err);
        return 3;
    }
    if (raise_nofile) s->max_conns = srv_fit_nofile(rt, max_conns);
    lua_pushvalue(L, 5);
    s->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, 6)) {
        lua_pushvalue(L, 6);
        s->refuse_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (!lua_isnil(L, 7)) {
        lua_pushvalue(L, 7);
        s->headers_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    /* A listening server stays alive without a Lua reference, until closed. */
    lua_pushvalue(L, 8);
    s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->closed = 0;
    s->next = rt->servers;
    if (s->next) s->next->prev = s;
    rt->servers = s;
    s->linked = 1;
    ev_io_init(&s->accept_w, srv_on_accept, s->fd, EV_READ);
    s->accept_w.data = s;
    ev_init(&s->retry_w, srv_on_retry);
    s->retry_w.data = s;
    ev_init(&s->shut_w, srv_on_shut_timer);
    s->shut_w.data = s;
    ev_io_start(rt->loop, &s->accept_w);
    return 1;
}

/* ev_timer: the shutdown's deadline (or, at 0, its last connection went) */
static void srv_on_shut_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    srv_server *s = w->data;
    aiorch_runtime *rt = s->rt;
    (void)loop;
    (void)revents;
    srv_shut_end(rt->S, s);
    aiorch_sched_drain(rt);
}

/* aiorch_op.cancel of srv:shutdown: its caller went, so close at once */
static void srv_shut_cancel(aiorch_op *op)
{
    srv_server *s = (srv_server *)((char *)op - offsetof(srv_server, shut_op));
    s->shut_task = NULL;
    srv_shut_end(s->rt->S, s);
}

/* server:shutdown([drain_timeout_ms]): stops accepting at once, closes idle
 * connections, lets the requests in flight finish (with connection: close),
 * cuts the rest at the deadline. Yields; returns the number cut. The
 * server stays open (stats) until close(). */
static int srv_shutdown(lua_State *L)
{
    srv_server *s = srv_check_open(L, 1);
    double ms = luaL_optnumber(L, 2, 30000);
    struct ev_loop *loop = s->rt->loop;
    aiorch_task *t;
    srv_conn *c, *next;

    luaL_argcheck(L, ms >= 0 && ms == ms, 2, "drain timeout must be >= 0 ms");
    if (s->shutting == 1) return luaL_error(L, "server:shutdown: already shutting down");
    if (s->shutting) {
        lua_pushinteger(L, 0);
        return 1;
    }
    t = aiorch_task_require(s->rt, L, "server:shutdown");
    s->shutting = 1;
    /* Connections the kernel queued for this socket would be reset by the
     * close: take them first. */
    ev_io_stop(loop, &s->accept_w);
    ev_timer_stop(loop, &s->retry_w);
    for (;;) {
        int fd = srv_accept_fd(s->fd);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            break;
        }
        srv_take(s, fd);
    }
    close(s->fd);
    s->fd = -1;
    for (c = s->conns; c; c = next) {
        next = c->next; /* idle ones are freed without running Lua */
        if (c->close_after || c->lingering) continue;
        if (c->res) {
            c->res->keep_alive = 0; /* connection: close, or closed after it */
        } else if (c->phase == PH_NONE && c->served > 0 && !out_pending(c)) {
            conn_free(L, c, SRV_PLAIN);
        } else {
            conn_timer_update(c);
        }
    }
    if (!s->conns) {
        s->shutting = 2;
        lua_pushinteger(L, 0);
        return 1;
    }
    s->shut_task = t;
    s->shut_op.cancel = srv_shut_cancel;
    ev_timer_stop(loop, &s->shut_w);
    ev_now_update(loop);
    ev_timer_set(&s->shut_w, ms / 1000.0, 0.);
    ev_timer_start(loop, &s->shut_w);
    aiorch_task_wait(t, &s->shut_op);
    return lua_yield(L, 0);
}

/* server:close() */
static int srv_close_m(lua_State *L)
{
    srv_server *s = srv_check_open(L, 1);
    if (s->in_hook)
        return luaL_error(L, "aiorch.server: close: not from inside on_refuse or on_headers");
    srv_close(L, s);
    return 0;
}

/* __gc and __close: closes the server if it is still open */
static int srv_gc(lua_State *L)
{
    srv_close(L, srv_check(L, 1));
    return 0;
}

/* server:stats() */
static int srv_stats(lua_State *L)
{
    srv_server *s = srv_check_open(L, 1);
    lua_createtable(L, 0, 6);
    lua_pushinteger(L, s->refused);
    lua_setfield(L, -2, "refused");
    lua_pushinteger(L, s->timed_out);
    lua_setfield(L, -2, "timed_out");
    lua_pushinteger(L, s->accepted);
    lua_setfield(L, -2, "accepted");
    lua_pushinteger(L, s->open);
    lua_setfield(L, -2, "open");
    lua_pushinteger(L, s->requests);
    lua_setfield(L, -2, "requests");
    lua_pushinteger(L, s->aborted);
    lua_setfield(L, -2, "aborted");
    lua_pushinteger(L, (lua_Integer)s->pool.used);
    lua_setfield(L, -2, "buffered");
    lua_pushinteger(L, s->accept_failed);
    lua_setfield(L, -2, "accept_failed");
    return 1;
}

static void limit_ms(lua_State *L, const char *name, double secs)
{
    lua_pushinteger(L, (lua_Integer)(secs * 1000 + 0.5));
    lua_setfield(L, -2, name);
}

/* server:limits(): the limits in force (0: none) */
static int srv_limits(lua_State *L)
{
    srv_server *s = srv_check_open(L, 1);
    lua_createtable(L, 0, 10);
    lua_pushinteger(L, s->max_conns);
    lua_setfield(L, -2, "max_connections");
    lua_pushinteger(L, (lua_Integer)s->max_header);
    lua_setfield(L, -2, "max_header");
    lua_pushinteger(L, (lua_Integer)s->max_body);
    lua_setfield(L, -2, "max_body");
    lua_pushinteger(L, (lua_Integer)s->pool.max);
    lua_setfield(L, -2, "max_buffered");
    limit_ms(L, "header_timeout_ms", s->header_to);
    limit_ms(L, "body_timeout_ms", s->body_to);
    limit_ms(L, "read_timeout_ms", s->read_to);
    limit_ms(L, "idle_timeout_ms", s->idle_to);
    limit_ms(L, "send_timeout_ms", s->send_to);
    return 1;
}

/* __index: the fields port and host, then the methods */
static int srv_index(lua_State *L)
{
    srv_server *s = srv_check(L, 1);
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
    srv_server *s = srv_check(L, 1);
    if (s->closed)
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
    {"close", srv_close_m},
    {"stats", srv_stats},
    {"limits", srv_limits},
    {"shutdown", srv_shutdown},
    {NULL, NULL},
};

static const luaL_Reg srv_metamethods[] = {
    {"__index", NULL}, /* placeholder: a closure over the methods */
    {"__gc", srv_gc},  {"__close", srv_gc}, {"__tostring", srv_tostring}, {NULL, NULL},
};

static const luaL_Reg res_methods[] = {
    {"start", res_start},     {"write", res_write}, {"finish", res_finish},
    {"respond", res_respond}, {"abort", res_abort}, {"on_error", res_on_error}, {NULL, NULL},
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
        srv_close(rt->S, rt->servers);
}
