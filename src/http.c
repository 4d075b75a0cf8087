/* aiorch.http.request: an HTTP request that yields its task until the
 * response (or each server-sent event) arrives. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "internal.h"
#include "sse.h"

#define DEFAULT_TIMEOUT_MS 60000L
#define DEFAULT_CONNECT_TIMEOUT_MS 10000L
#define DEFAULT_MAX_BODY (8L * 1024 * 1024)
#define NO_LIMIT_MS 1000000000000L /* about 30 years */
/* curl's receive buffer (its default is 16 KiB), allocated per transfer.
 * JSON answers are small; a stream's events smaller still, and a stream
 * holds its buffer for its whole life (thousands of them at once), so it
 * gets curl's minimum. A pooled handle has no buffer left (see
 * aiorch_curl_easy_put), so either size can be set on it. */
#define RECV_BUFFER_SIZE (4L * 1024)
#define STREAM_BUFFER_SIZE 1024L
/* Backpressure on a stream: once the events on_event has not taken yet
 * hold this much, the transfer is paused (curl stops reading the socket,
 * so the upstream's sends stall), and it resumes once they are down to the
 * low-water mark. A consumer parked in a write to a slow client thus holds
 * at most about STREAM_HIGH_WATER of the stream. */
#define STREAM_HIGH_WATER (256 * 1024)
#define STREAM_LOW_WATER (64 * 1024)

/* The deadlines of a request, each on its own libev timer. */
enum { DL_CONNECT, DL_HEADERS, DL_FIRST_EVENT, DL_GAP, DL_TOTAL, DL_COUNT };
static const char *const deadline_names[DL_COUNT] = {"connect", "headers", "first_token", "gap",
                                                     "total"};
static const char *const deadline_fields[DL_COUNT] = {"connect_timeout_ms", "headers_timeout_ms",
                                                      "first_event_timeout_ms", "gap_timeout_ms",
                                                      "timeout_ms"};

typedef struct deadline {
    aiorch_watch timer; /* first: the callback gets its address */
    struct http_req *r;
    long ms; /* 0: not set */
} deadline;

typedef struct http_req {
    aiorch_transfer tr;
    aiorch_op op;
    aiorch_runtime *rt;
    aiorch_task *task;
    struct curl_slist *headers;
    int body_ref; /* the request body string, kept alive for curl */
    int cb_ref;   /* on_event */
    size_t max_body;
    aiorch_sse_text body;
    aiorch_sse_text head; /* header lines of the last response */
    int sse;              /* -1 not known yet, 0 no, 1 yes */
    aiorch_sse parser;
    int finished;
    int waiting; /* the task is parked on op (not inside on_event) */
    int paused;  /* the write callback paused the transfer (backpressure) */
    int code;
    int too_large;
    size_t streamed; /* bytes of event stream received */
    int fired;       /* 1 + the deadline that ended the transfer, or 0 */
    int got_content; /* on_event returned true once */
    deadline dl[DL_COUNT];
    struct http_handle *handle;
    struct http_req *prev, *next; /* the runtime's requests, for stats */
    char errbuf[CURL_ERROR_SIZE];
} http_req;

/* The request's to-be-closed slot on its task's stack: closing it (the
 * task was cancelled or its thread reset) aborts a transfer still running. */
typedef struct http_handle {
    http_req *r;
} http_handle;

#define HANDLE_MT "aiorch.http.request"

static void deadlines_stop(http_req *r)
{
    for (int i = 0; i < DL_COUNT; i++)
        aiorch_watch_stop(&r->dl[i].timer);
}

static void req_free(http_req *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        r->rt->http_reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    if (r->handle) r->handle->r = NULL;
    for (int i = 0; i < DL_COUNT; i++)
        aiorch_watch_close(&r->dl[i].timer);
    lua_State *S = r->rt->S;
    aiorch_curl_easy_put(r->rt->curl, r->tr.easy);
    curl_slist_free_all(r->headers);
    luaL_unref(S, LUA_REGISTRYINDEX, r->body_ref);
    luaL_unref(S, LUA_REGISTRYINDEX, r->cb_ref);
    free(r->body.p);
    free(r->head.p);
    aiorch_sse_free(&r->parser);
    free(r);
}

/* Only when the task waits on this request: inside on_event it may be
 * parked on something else (a write to its own client, say). */
static void wake(http_req *r)
{
    if (r->waiting && !aiorch_task_ended(r->task)) {
        r->waiting = 0;
        aiorch_task_wake(r->task, 0);
    }
}

static void req_abort(http_req *r)
{
    if (!r->finished) aiorch_curl_remove(r->rt->curl, &r->tr);
    req_free(r);
}

/* A deadline passed: the transfer ends now, as a timeout naming it. */
static void deadline_cb(aiorch_watch *w, int events)
{
    (void)events;
    deadline *d = (deadline *)w;
    http_req *r = d->r;
    if (r->finished) return;
    aiorch_curl_remove(r->rt->curl, &r->tr);
    deadlines_stop(r);
    r->finished = 1;
    r->code = CURLE_OPERATION_TIMEDOUT;
    r->fired = 1 + (int)(d - r->dl);
    wake(r);
    aiorch_sched_drain(r->rt);
}

/* Arms a deadline `ms` after `since` (a loop time; 0: now). */
static void deadline_arm_since(http_req *r, int which, double since)
{
    deadline *d = &r->dl[which];
    if (d->ms <= 0 || r->finished) return;
    double after = (double)d->ms / 1000.0;
    if (since > 0) after -= aiorch_loop_now(&r->rt->lp) - since;
    aiorch_watch_start(&d->timer, after > 0 ? after : 0);
}

static void deadline_arm(http_req *r, int which)
{
    deadline_arm_since(r, which, 0);
}

static void deadline_done(http_req *r, int which)
{
    aiorch_watch_stop(&r->dl[which].timer);
}

/* CURLOPT_PREREQFUNCTION: connected (TCP and TLS), or a connection reused. */
static int prereq_cb(void *ud, char *primary_ip, char *local_ip, int primary_port, int local_port)
{
    (void)primary_ip;
    (void)local_ip;
    (void)primary_port;
    (void)local_port;
    deadline_done(ud, DL_CONNECT);
    return CURL_PREREQFUNC_OK;
}

/* The task was cancelled: abort the transfer now (its socket closes). */
static void req_cancel(aiorch_op *op)
{
    req_abort((http_req *)((char *)op - offsetof(http_req, op)));
}

/* __close and __gc of the handle */
static int handle_close(lua_State *L)
{
    http_handle *h = luaL_checkudata(L, 1, HANDLE_MT);
    if (h->r) req_abort(h->r);
    return 0;
}

/* Whether the response is a stream of events for on_event: decided once. */
static int is_stream(http_req *r)
{
    if (r->sse < 0) {
        char *type = NULL;
        curl_easy_getinfo(r->tr.easy, CURLINFO_CONTENT_TYPE, &type);
        r->sse = r->cb_ref != LUA_NOREF && type && strncasecmp(type, "text/event-stream", 17) == 0;
    }
    return r->sse;
}

/* CURLOPT_WRITEFUNCTION */
static size_t write_cb(char *data, size_t size, size_t nmemb, void *ud)
{
    http_req *r = ud;
    size_t len = size * nmemb;
    if (is_stream(r)) {
        if (r->parser.queued >= STREAM_HIGH_WATER) {
            /* curl keeps this data and hands it over again on resume. The
             * upstream's silence is ours now: no gap deadline meanwhile. */
            r->paused = 1;
            deadline_done(r, DL_GAP);
            return CURL_WRITEFUNC_PAUSE;
        }
        aiorch_sse_event *last = r->parser.tail;
        /* The cap holds for a whole stream too, not just what waits in it. */
        r->streamed += len;
        if (r->streamed > r->max_body || aiorch_sse_feed(&r->parser, data, len)) {
            r->too_large = 1;
            return 0;
        }
        if (r->parser.tail != last) deadline_arm(r, DL_GAP); /* a new event */
        if (r->parser.head) wake(r);
        return len;
    }
    if (r->body.len + len > r->max_body || aiorch_text_add(&r->body, data, len)) {
        r->too_large = 1;
        return 0; /* curl stops with CURLE_WRITE_ERROR */
    }
    return len;
}

/* The end of a final response's headers: the headers deadline is met; a
 * stream's gap deadline starts; a response that is not a stream of events
 * has no first event to wait for. */
static void headers_done(http_req *r)
{
    deadline_done(r, DL_HEADERS);
    if (is_stream(r)) {
        deadline_arm(r, DL_GAP);
    } else {
        deadline_done(r, DL_FIRST_EVENT);
        deadline_done(r, DL_GAP);
    }
}

/* A stream keeps its response headers for its whole life: no spare room. */
static void text_fit(aiorch_sse_text *t)
{
    char *p = t->cap > t->len + 1 ? realloc(t->p, t->len + 1) : NULL;
    if (p) {
        t->p = p;
        t->cap = t->len + 1;
    }
}

/* CURLOPT_HEADERFUNCTION */
static size_t header_cb(char *data, size_t size, size_t nmemb, void *ud)
{
    http_req *r = ud;
    size_t len = size * nmemb;
    int end = 0;
    if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) r->head.len = 0; /* after a 1xx */
    if ((len == 2 && data[0] == '\r') || (len == 1 && data[0] == '\n')) {
        long status = 0;
        curl_easy_getinfo(r->tr.easy, CURLINFO_RESPONSE_CODE, &status);
        if (status >= 200) {
            headers_done(r);
            end = 1;
        }
    }
    if (aiorch_text_add(&r->head, data, len)) return 0;
    if (end && r->cb_ref != LUA_NOREF) text_fit(&r->head);
    return len;
}

static void done_cb(aiorch_transfer *tr, int code)
{
    http_req *r = (http_req *)tr;
    deadlines_stop(r);
    r->finished = 1;
    r->code = code;
    wake(r);
}

static const char *error_kind(const http_req *r)
{
    switch (r->code) {
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "dns";
    case CURLE_COULDNT_CONNECT:
        return "connect";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_USE_SSL_FAILED:
        return "tls";
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return "reset";
    case CURLE_WRITE_ERROR:
        return r->too_large ? "too_large" : "http";
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
        return "invalid_url";
    default:
        return "http";
    }
}

/* Pushes the response headers as a table with lower-case names. */
static void push_headers(lua_State *L, const http_req *r)
{
    const char *p = r->head.p, *end = p + r->head.len;
    int lines = 0;
    for (const char *q = p; q && (q = memchr(q, '\n', (size_t)(end - q))); q++)
        lines++;
    lua_createtable(L, 0, lines); /* sized once: a line a header, but the status line */
    if (!p) return;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon && colon > p && !(eol - p >= 5 && memcmp(p, "HTTP/", 5) == 0)) {
            char name[128];
            size_t nlen = (size_t)(colon - p);
            if (nlen > sizeof name) nlen = sizeof name; /* no real header name is longer */
            for (size_t i = 0; i < nlen; i++)
                name[i] = (char)tolower((unsigned char)p[i]);
            lua_pushlstring(L, name, nlen);
            const char *v = colon + 1, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            lua_pushvalue(L, -1);
            if (lua_rawget(L, -3) == LUA_TSTRING) { /* a repeated header: join */
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, v, (size_t)(ve - v));
                lua_concat(L, 3);
            } else {
                lua_pop(L, 1);
                lua_pushlstring(L, v, (size_t)(ve - v));
            }
            lua_rawset(L, -3);
        }
        p = eol + 1;
    }
}

static int push_outcome(lua_State *L, http_req *r)
{
    if (r->fired) {
        const deadline *d = &r->dl[r->fired - 1];
        lua_pushnil(L);
        lua_pushliteral(L, "timeout");
        lua_pushfstring(L, "%s deadline of %I ms passed", deadline_names[r->fired - 1],
                        (lua_Integer)d->ms);
        lua_pushstring(L, deadline_names[r->fired - 1]);
        return 4;
    }
    if (r->code != CURLE_OK) {
        lua_pushnil(L);
        lua_pushstring(L, error_kind(r));
        if (r->too_large)
            lua_pushfstring(L, "response body larger than %I bytes", (lua_Integer)r->max_body);
        else
            lua_pushstring(L, r->errbuf[0] ? r->errbuf : curl_easy_strerror((CURLcode)r->code));
        return 3;
    }
    long status = 0;
    curl_easy_getinfo(r->tr.easy, CURLINFO_RESPONSE_CODE, &status);
    lua_pushinteger(L, status);
    push_headers(L, r);
    lua_pushlstring(L, r->body.p ? r->body.p : "", r->body.len);
    return 3;
}

static int request_k(lua_State *L, int status, lua_KContext ctx);

/* Resumes a paused stream once on_event has taken enough of its events.
 * Called from the task, never inside curl: curl_easy_pause may hand the
 * data it kept to write_cb before it returns (write_cb may pause again). */
static void stream_resume(http_req *r)
{
    if (!r->paused || r->finished || r->parser.queued > STREAM_LOW_WATER) return;
    r->paused = 0;
    deadline_arm(r, DL_GAP);
    CURLcode rc = curl_easy_pause(r->tr.easy, CURLPAUSE_CONT);
    if (rc != CURLE_OK) { /* the kept data failed (too large, say): the transfer ends */
        aiorch_curl_remove(r->rt->curl, &r->tr);
        deadlines_stop(r);
        r->finished = 1;
        r->code = rc;
    }
}

/* What on_event returned (or raised): 0 to go on, else the number of
 * results request returns (after the transfer was aborted). */
static int callback_done(lua_State *L, http_req *r, int status)
{
    if (status != LUA_OK && status != LUA_YIELD) {
        req_abort(r);
        return lua_error(L); /* the callback's error, as it was raised */
    }
    int stop = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
    if (lua_toboolean(L, -1) && !r->got_content) {
        r->got_content = 1; /* the first content: its deadline is met */
        deadline_done(r, DL_FIRST_EVENT);
    }
    lua_pop(L, 1);
    if (!stop) return 0;
    req_abort(r);
    lua_pushnil(L);
    lua_pushliteral(L, "aborted");
    lua_pushliteral(L, "stopped by on_event");
    return 3;
}

/* lua_pcallk continuation: on_event yielded, then returned or raised. */
static int callback_k(lua_State *L, int status, lua_KContext ctx)
{
    int n = callback_done(L, (http_req *)ctx, status);
    return n ? n : request_k(L, LUA_OK, ctx);
}

/* Hands queued events to on_event (which may yield), then returns the
 * outcome or parks the task until curl has more. */
static int request_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    http_req *r = (http_req *)ctx;
    aiorch_task *self = aiorch_task_require(r->rt, L, "aiorch.http.request");
    aiorch_sse_event *ev;
    while (r->cb_ref != LUA_NOREF && !r->fired && (ev = aiorch_sse_pop(&r->parser))) {
        stream_resume(r);
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->cb_ref);
        lua_createtable(L, 0, 3);
        lua_pushstring(L, ev->event);
        lua_setfield(L, -2, "event");
        lua_pushlstring(L, ev->data, ev->data_len);
        lua_setfield(L, -2, "data");
        if (ev->id) {
            lua_pushstring(L, ev->id);
            lua_setfield(L, -2, "id");
        }
        aiorch_sse_event_free(ev);
        int n = callback_done(L, r, lua_pcallk(L, 1, 1, 0, ctx, callback_k));
        if (n) return n;
    }
    if (r->finished) {
        int n = push_outcome(L, r);
        req_free(r);
        return n;
    }
    r->waiting = 1;
    aiorch_task_wait(self, &r->op);
    return lua_yieldk(L, 0, ctx, request_k);
}

static long opt_ms(lua_State *L, const char *field, long def)
{
    lua_getfield(L, 1, field);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (!lua_isnumber(L, -1)) luaL_error(L, "aiorch.http.request: '%s' must be a number", field);
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (v < 0 || v != v) luaL_error(L, "aiorch.http.request: '%s' must be >= 0", field);
    return v > (double)NO_LIMIT_MS ? NO_LIMIT_MS : (long)v;
}

/* Checks the headers table at idx and turns it into a curl list. */
static struct curl_slist *check_headers(lua_State *L, int idx)
{
    /* No "Expect: 100-continue": it would cost a round trip per request. */
    struct curl_slist *list = curl_slist_append(NULL, "Expect:");
    if (lua_isnil(L, idx)) return list;
    if (!lua_istable(L, idx)) {
        curl_slist_free_all(list);
        luaL_error(L, "aiorch.http.request: 'headers' must be a table");
    }
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1)) {
            curl_slist_free_all(list);
            luaL_error(L, "aiorch.http.request: headers must map names to strings");
        }
        size_t nl, vl;
        const char *name = lua_tolstring(L, -2, &nl);
        const char *value = lua_tolstring(L, -1, &vl);
        if (strpbrk(name, "\r\n:") || nl == 0 || memchr(value, '\r', vl) ||
            memchr(value, '\n', vl) || strlen(value) != vl) {
            curl_slist_free_all(list);
            luaL_error(L, "aiorch.http.request: header '%s' has a forbidden character", name);
        }
        /* "Name: value" built in place: no Lua string per header. */
        char line[1024], *big = NULL, *text = line;
        if (nl + vl + 3 > sizeof line) text = big = malloc(nl + vl + 3);
        struct curl_slist *next = NULL;
        if (text) {
            memcpy(text, name, nl);
            memcpy(text + nl, ": ", 2);
            memcpy(text + nl + 2, value, vl + 1);
            next = curl_slist_append(list, text);
        }
        free(big);
        lua_pop(L, 1);
        if (!next) {
            curl_slist_free_all(list);
            luaL_error(L, "out of memory");
        }
        list = next;
    }
    return list;
}

/* curl's after hook: the tasks its transfers woke run now, from the loop. */
static void curl_after(void *ud)
{
    aiorch_sched_drain(ud);
}

/* curl's quiet hook: no transfer for a while. The garbage of the burst's
 * coroutines goes, and the blocks Lua freed go back to malloc (not in a
 * host's state, nor while a task runs or a script stopped the collector). */
static void curl_quiet(void *ud)
{
    aiorch_runtime *rt = ud;
    if (!rt->own_L) return;
    if (!rt->current && lua_gc(rt->L, LUA_GCISRUNNING)) lua_gc(rt->L, LUA_GCCOLLECT);
    aiorch_alloc_trim(rt);
}

static aiorch_curl *curl_start(aiorch_runtime *rt)
{
    aiorch_curl_hooks hooks = {.after = curl_after, .quiet = curl_quiet, .ud = rt};
    return aiorch_curl_new(&rt->lp, &hooks);
}

static int l_request(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    /* The deadlines count from here: setting up (libcurl's first start) included. */
    double started = aiorch_loop_now(&rt->lp);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_getfield(L, 1, "url");      /* 2 */
    lua_getfield(L, 1, "method");   /* 3 */
    lua_getfield(L, 1, "body");     /* 4 */
    lua_getfield(L, 1, "on_event"); /* 5 */
    lua_getfield(L, 1, "headers");  /* 6 */
    if (lua_type(L, 2) != LUA_TSTRING)
        return luaL_error(L, "aiorch.http.request: 'url' must be a string");
    if (!lua_isnil(L, 3) && lua_type(L, 3) != LUA_TSTRING)
        return luaL_error(L, "aiorch.http.request: 'method' must be a string");
    if (!lua_isnil(L, 4) && lua_type(L, 4) != LUA_TSTRING)
        return luaL_error(L, "aiorch.http.request: 'body' must be a string");
    if (!lua_isnil(L, 5) && !lua_isfunction(L, 5))
        return luaL_error(L, "aiorch.http.request: 'on_event' must be a function");
    long limits[DL_COUNT];
    for (int i = 0; i < DL_COUNT; i++)
        limits[i] = opt_ms(L, deadline_fields[i], 0);
    if (!limits[DL_TOTAL]) limits[DL_TOTAL] = DEFAULT_TIMEOUT_MS;
    if (!limits[DL_CONNECT]) limits[DL_CONNECT] = DEFAULT_CONNECT_TIMEOUT_MS;
    long max_body = opt_ms(L, "max_body", DEFAULT_MAX_BODY);
    const char *method = lua_isnil(L, 3) ? (lua_isnil(L, 4) ? "GET" : "POST") : lua_tostring(L, 3);
    for (const char *m = method; *m; m++)
        if (!isupper((unsigned char)*m))
            return luaL_error(L, "aiorch.http.request: bad method '%s'", method);
    aiorch_task *self = aiorch_task_check(L, "aiorch.http.request");
    /* Slot 7, to-be-closed: if the task dies anywhere past this point, closing
     * it aborts the transfer (cancel inside on_event, reset thread, errors). */
    http_handle *h = lua_newuserdatauv(L, sizeof *h, 0);
    h->r = NULL;
    luaL_setmetatable(L, HANDLE_MT);
    lua_toclose(L, 7);
    struct curl_slist *headers = check_headers(L, 6);

    if (!rt->curl && !(rt->curl = curl_start(rt))) {
        curl_slist_free_all(headers);
        return luaL_error(L, "aiorch.http.request: cannot start libcurl");
    }

    /* From here on nothing raises until the yield. */
    http_req *r = calloc(1, sizeof *r);
    CURL *easy = r ? aiorch_curl_easy_get(rt->curl) : NULL;
    if (!easy) {
        free(r);
        curl_slist_free_all(headers);
        return luaL_error(L, "out of memory");
    }
    r->rt = rt;
    r->next = rt->http_reqs;
    if (r->next) r->next->prev = r;
    rt->http_reqs = r;
    r->task = self;
    r->tr.easy = easy;
    r->tr.done = done_cb;
    r->op.cancel = req_cancel;
    r->headers = headers;
    r->max_body = (size_t)max_body;
    r->sse = -1;
    aiorch_sse_init(&r->parser);
    for (int i = 0; i < DL_COUNT; i++) {
        r->dl[i].r = r;
        r->dl[i].ms = limits[i];
        aiorch_watch_timer_init(&r->dl[i].timer, &rt->lp, deadline_cb, &r->dl[i], 0);
    }

    lua_pushvalue(L, 4);
    r->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 5);
    r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* LUA_REFNIL when absent */
    if (r->cb_ref == LUA_REFNIL) r->cb_ref = LUA_NOREF;
    /* The first event and the gap only mean something for a stream. */
    if (r->cb_ref == LUA_NOREF) r->dl[DL_FIRST_EVENT].ms = r->dl[DL_GAP].ms = 0;

    curl_easy_setopt(easy, CURLOPT_URL, lua_tostring(L, 2));
    curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
    /* Verify against the CA bundle only: libcurl caches the store built from
     * it, where a CA directory would be read again for every connection,
     * blocking the loop for tens of milliseconds each time. */
    curl_easy_setopt(easy, CURLOPT_CAPATH, NULL);
    curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(easy, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(easy, CURLOPT_HEADERDATA, r);
    /* The deadlines are libev timers (below), not curl's own timeouts. */
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 0L);
    curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, NO_LIMIT_MS);
    curl_easy_setopt(easy, CURLOPT_PREREQFUNCTION, prereq_cb);
    curl_easy_setopt(easy, CURLOPT_PREREQDATA, r);
    curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(easy, CURLOPT_BUFFERSIZE,
                     r->cb_ref != LUA_NOREF ? STREAM_BUFFER_SIZE : RECV_BUFFER_SIZE);
    if (!lua_isnil(L, 4)) {
        size_t len;
        const char *body = lua_tolstring(L, 4, &len);
        curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
        curl_easy_setopt(easy, CURLOPT_POSTFIELDS, body);
    }
    if (strcmp(method, "GET") == 0 && lua_isnil(L, 4))
        curl_easy_setopt(easy, CURLOPT_HTTPGET, 1L);
    else if (strcmp(method, "HEAD") == 0)
        curl_easy_setopt(easy, CURLOPT_NOBODY, 1L);
    else if (strcmp(method, "POST") != 0 || lua_isnil(L, 4))
        curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, method);

    if (aiorch_curl_add(rt->curl, &r->tr) != 0) {
        req_free(r);
        lua_pushnil(L);
        lua_pushliteral(L, "http");
        lua_pushliteral(L, "cannot start the transfer");
        return 3;
    }
    h->r = r;
    r->handle = h;
    r->waiting = 1;
    /* curl copied the URL and method, and the body and on_event are
     * referenced: a stream must not hold the argument table for its life. */
    for (int i = 1; i <= 6; i++) {
        lua_pushnil(L);
        lua_replace(L, i);
    }
    /* The connect, headers, first event and total deadlines start now; the gap
     * one when the stream's headers are in. */
    for (int i = 0; i < DL_COUNT; i++)
        if (i != DL_GAP) deadline_arm_since(r, i, started);
    aiorch_task_wait(self, &r->op);
    return lua_yieldk(L, 0, (lua_KContext)r, request_k);
}

/* aiorch.http.stats(): the requests in flight, the streams paused by
 * backpressure and the bytes their events not yet taken by on_event hold. */
static int l_stats(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    lua_Integer n = 0, paused = 0, queued = 0;
    for (const http_req *r = rt->http_reqs; r; r = r->next) {
        n++;
        paused += r->paused;
        queued += (lua_Integer)r->parser.queued;
    }
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, n);
    lua_setfield(L, -2, "requests");
    lua_pushinteger(L, paused);
    lua_setfield(L, -2, "paused");
    lua_pushinteger(L, queued);
    lua_setfield(L, -2, "queued_bytes");
    return 1;
}

static const luaL_Reg http_funcs[] = {
    {"request", l_request},
    {"stats", l_stats},
    {NULL, NULL},
};

static const luaL_Reg handle_meta[] = {
    {"__close", handle_close},
    {"__gc", handle_close},
    {NULL, NULL},
};

void aiorch_http_open(aiorch_runtime *rt, lua_State *L)
{
    if (luaL_newmetatable(L, HANDLE_MT)) luaL_setfuncs(L, handle_meta, 0);
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, http_funcs, 1);
    lua_setfield(L, -2, "http");
}
