/* A runtime on a host's own loop (aiorch_options.host), and HTTP requests
 * handed to a Lua handler by that host (aiorch_exchange_*): what the nginx
 * module does, on a small host of poll(2) written here. Timers and
 * sockets, an orchestration over libcurl, a handler's answer, a stream
 * with backpressure, on_headers and on_refuse, a client gone, and freeing
 * the runtime with requests open: every host watcher released, every
 * exchange ended through its sink. Run by tests/with_mock.sh. */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "aiorch.h"
#include "check.h"
#include "outcome.h"

/* ---- the host: watchers kept in one list, polled ---- */

typedef struct hwatch {
    aiorch_watch *w;
    int fd, events; /* a socket's */
    int armed, soon;
    double due;
    int weak;
    struct hwatch *next;
} hwatch;

typedef struct host {
    aiorch_runtime *rt;
    hwatch *list;
    int slots;    /* allocated and not yet released */
    int ios;      /* io calls */
    int timers;   /* timer calls */
    int closings; /* closing calls */
} host;

static int host_io(void *ud, aiorch_watch *w, int fd, int events, void **slot)
{
    host *h = ud;
    hwatch *hw = *slot;
    h->ios++;
    if (!hw) {
        hw = calloc(1, sizeof *hw);
        hw->w = w;
        hw->next = h->list;
        h->list = hw;
        h->slots++;
        *slot = hw;
    }
    hw->fd = fd;
    hw->events = events;
    return 0;
}

static void host_timer(void *ud, aiorch_watch *w, long ms, int flags, void **slot)
{
    host *h = ud;
    hwatch *hw = *slot;
    h->timers++;
    if (!hw) {
        hw = calloc(1, sizeof *hw);
        hw->w = w;
        hw->fd = -1;
        hw->next = h->list;
        h->list = hw;
        h->slots++;
        *slot = hw;
    }
    hw->armed = ms >= 0;
    hw->soon = (flags & AIORCH_SOON) != 0;
    hw->weak = (flags & AIORCH_WEAK) != 0;
    hw->due = now_ms() + (ms > 0 ? (double)ms : 0);
}

static void host_release(void *ud, void *slot)
{
    host *h = ud;
    hwatch **p = &h->list;
    while (*p && *p != slot)
        p = &(*p)->next;
    if (*p) *p = ((hwatch *)slot)->next;
    free(slot);
    h->slots--;
}

static void host_closing(void *ud, int fd)
{
    host *h = ud;
    (void)fd;
    h->closings++;
}

static int alive(host *h, hwatch *hw)
{
    for (hwatch *x = h->list; x; x = x->next)
        if (x == hw) return 1;
    return 0;
}

/* Runs the posted ones, then what a poll finds ready (at most ms). Returns
 * whether anything but weak timers is left. */
static int host_turn(host *h, int max_ms)
{
    struct pollfd pfd[256];
    hwatch *who[256], *hw;
    int n = 0, again = 1, busy = 0;
    double next = -1;

    while (again) { /* posted: before polling, until none is left */
        again = 0;
        for (hw = h->list; hw; hw = hw->next)
            if (hw->fd < 0 && hw->armed && hw->soon) {
                hw->armed = 0;
                aiorch_runtime_ready(h->rt, hw->w, AIORCH_TIMER);
                again = 1;
                break; /* the list may have changed */
            }
    }
    for (hw = h->list; hw; hw = hw->next) {
        if (hw->fd >= 0 && hw->events && n < 256) {
            pfd[n].fd = hw->fd;
            pfd[n].events = (short)((hw->events & AIORCH_READ ? POLLIN : 0) |
                                    (hw->events & AIORCH_WRITE ? POLLOUT : 0));
            who[n++] = hw;
            busy = 1;
        } else if (hw->fd < 0 && hw->armed) {
            if (next < 0 || hw->due < next) next = hw->due;
            if (!hw->weak) busy = 1;
        }
    }
    int timeout = max_ms;
    if (next >= 0) {
        double d = next - now_ms();
        if (d < timeout) timeout = d > 0 ? (int)d + 1 : 0;
    }
    if (poll(pfd, (nfds_t)n, timeout) > 0) {
        for (int i = 0; i < n; i++) {
            int ev = (pfd[i].revents & (POLLIN | POLLHUP | POLLERR) ? AIORCH_READ : 0) |
                     (pfd[i].revents & (POLLOUT | POLLERR) ? AIORCH_WRITE : 0);
            if (ev && alive(h, who[i]) && who[i]->events)
                aiorch_runtime_ready(h->rt, who[i]->w, ev & who[i]->events);
        }
    }
    for (again = 1; again;) {
        again = 0;
        double t = now_ms();
        for (hw = h->list; hw; hw = hw->next)
            if (hw->fd < 0 && hw->armed && !hw->soon && hw->due <= t) {
                hw->armed = 0;
                aiorch_runtime_ready(h->rt, hw->w, AIORCH_TIMER);
                again = 1;
                break;
            }
    }
    return busy;
}

/* Turns until done() or the deadline. */
static int run_until(host *h, int (*done)(void *), void *arg, int ms)
{
    double deadline = now_ms() + ms;
    while (!done(arg)) {
        if (now_ms() > deadline) return 0;
        host_turn(h, 20);
    }
    return 1;
}

/* ---- jobs ---- */

static int job_done(void *arg)
{
    outcome *o = arg;
    return o->results + o->errors > 0;
}

static outcome run_chunk(host *h, const char *code)
{
    outcome o = {0};
    aiorch_job_callbacks cb = {.on_result = on_result, .on_error = on_error, .ud = &o};
    aiorch_job_submit_chunk(h->rt, code, strlen(code), NULL, 0, NULL, &cb);
    CHECK(run_until(h, job_done, &o, 10000), "the job did not end: %s", code);
    return o;
}

/* ---- a client of the handler: the sink ---- */

typedef struct client {
    int status, last, aborted, heads;
    char headers[1024];
    char *body;
    size_t len;
    long backlog; /* bytes "unsent": the client reads them in client_read */
    aiorch_exchange *x;
} client;

static int sink_head(void *ud, const aiorch_http_response *res)
{
    client *c = ud;
    c->heads++;
    c->status = res->status;
    for (size_t i = 0; i < res->nheaders; i++) {
        size_t n = strlen(c->headers);
        snprintf(c->headers + n, sizeof c->headers - n, "%.*s: %.*s\n",
                 (int)res->headers[i].name_len, res->headers[i].name,
                 (int)res->headers[i].value_len, res->headers[i].value);
    }
    return 0;
}

static long sink_body(void *ud, const char *data, size_t len, int last)
{
    client *c = ud;
    c->body = realloc(c->body, c->len + len + 1);
    if (len) memcpy(c->body + c->len, data, len);
    c->len += len;
    c->body[c->len] = '\0';
    c->backlog += (long)len;
    if (last) {
        c->last = 1;
        c->x = NULL;
    }
    return c->backlog;
}

static void sink_abort(void *ud)
{
    client *c = ud;
    c->aborted = 1;
    c->x = NULL;
}

static const aiorch_http_sink sink = {sink_head, sink_body, sink_abort};

static int client_ended(void *arg)
{
    client *c = arg;
    return c->last || c->aborted;
}

static aiorch_exchange *open_req(aiorch_handler *hd, client *c, const char *method,
                                 const char *path, const char *key)
{
    aiorch_header hs[2] = {{"Content-Type", 12, "text/plain", 10}, {"X-Key", 5, key, strlen(key)}};
    aiorch_http_request req = {method, path, strlen(path), hs, 2};
    memset(c, 0, sizeof *c);
    c->x = aiorch_exchange_open(hd, &req, &sink, c);
    return c->x;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "tests";
    char handler_path[1024];
    host h = {0};
    aiorch_host ops = {host_io, host_timer, host_release, &h, host_closing};
    aiorch_options opts = {.host = &ops};
    outcome o;
    client c, c2;

    snprintf(handler_path, sizeof handler_path, "%s/c/host_handler.lua", dir);
    {
        aiorch_options bad = {.host = &ops, .pollable = 1};
        CHECK(aiorch_runtime_new(&bad) == NULL, "opts.host with pollable was taken");
    }
    h.rt = aiorch_runtime_new(&opts);
    if (!h.rt) return 1;
    CHECK(aiorch_runtime_loop(h.rt) == NULL, "a hosted runtime has a libev loop");
    CHECK(aiorch_runtime_fd(h.rt) == -1, "a hosted runtime has an fd");

    /* Timers: sleeps, a task's, an await with a deadline, on the host's. */
    o = run_chunk(&h, "local a = require 'aiorch'; local t0 = a.now(); a.sleep(50)\n"
                      "local t = a.spawn(function() a.sleep(20); return 7 end)\n"
                      "local slow = a.spawn(function() a.sleep(5000) end)\n"
                      "local _, kind = slow:await(30); slow:cancel()\n"
                      "return { t:await(), kind, a.now() - t0 }");
    CHECK(o.results == 1 && strncmp(o.json, "[7,\"timeout\",", 13) == 0, "sleeps: %s %s", o.json,
          o.message);
    CHECK(o.results == 1 && atof(o.json + 13) >= 79, "the sleeps took %s ms", o.json + 13);
    CHECK(h.timers > 0, "no timer went to the host");

    /* What needs the runtime's own loop says so. */
    o = run_chunk(&h,
                  "return select(2, pcall(require('aiorch').server.listen, {handler = print}))");
    CHECK(o.results == 1 && strstr(o.json, "host's loop"), "server.listen: %s", o.json);

    /* An orchestration: libcurl's sockets and timer on the host. */
    {
        outcome r = {0};
        aiorch_job_callbacks cb = {.on_result = on_result, .on_error = on_error, .ud = &r};
        int ios = h.ios;
        aiorch_job_submit_orchestration(h.rt, "{\"user_question\": \"2+2?\"}", "fallback", "openai",
                                        &cb);
        CHECK(run_until(&h, job_done, &r, 10000), "the orchestration did not end");
        CHECK(r.results == 1 && strstr(r.json, "\"status\":\"success\""), "orchestration: %s %s",
              r.json, r.message);
        CHECK(h.ios > ios, "libcurl's sockets did not go to the host");
    }

    aiorch_handler *hd = aiorch_handler_load(h.rt, handler_path, 1, (const char *[]){"pre"});
    CHECK(hd != NULL, "aiorch_handler_load: %s", aiorch_runtime_error(h.rt));
    if (!hd) return 1;
    CHECK(aiorch_handler_max_body(hd) == 100, "max_body %zu", aiorch_handler_max_body(hd));
    {
        const char *bad_args[] = {"x"};
        CHECK(aiorch_handler_load(h.rt, "/nonexistent.lua", 1, bad_args) == NULL &&
                  strstr(aiorch_runtime_error(h.rt), "nonexistent"),
              "a missing file: %s", aiorch_runtime_error(h.rt));
    }

    /* An answer, from the loop (not inside start). */
    CHECK(open_req(hd, &c, "POST", "/hello", "k") != NULL, "open /hello");
    aiorch_exchange_start(c.x, "world", 5);
    CHECK(c.heads == 0, "the handler ran inside aiorch_exchange_start");
    CHECK(run_until(&h, client_ended, &c, 5000), "/hello did not end");
    CHECK(c.status == 200 && c.last && c.body && strcmp(c.body, "hello world") == 0,
          "/hello: %d %s", c.status, c.body ? c.body : "");
    CHECK(strstr(c.headers, "x-prefix: pre\n") && strstr(c.headers, "x-count: 3\n"), "headers: %s",
          c.headers);
    free(c.body);

    /* on_headers answers before the body: no exchange. */
    CHECK(open_req(hd, &c, "POST", "/hello", "wrong") == NULL, "on_headers did not answer");
    CHECK(c.status == 401 && c.last && strstr(c.body, "no key") &&
              strstr(c.headers, "www-authenticate: Bearer"),
          "on_headers: %d %s %s", c.status, c.body, c.headers);
    free(c.body);

    /* A refusal in the caller's words. */
    CHECK(open_req(hd, &c, "POST", "/hello", "k") != NULL, "open to refuse");
    aiorch_exchange_refuse(c.x, 413);
    CHECK(c.status == 413 && c.last && strcmp(c.body, "{\"refused\":413,\"path\":\"/hello\"}") == 0,
          "refuse: %d %s", c.status, c.body);
    free(c.body);

    /* A failing handler: the 500 it set beforehand. */
    open_req(hd, &c, "GET", "/raise", "k");
    aiorch_exchange_start(c.x, "", 0);
    CHECK(run_until(&h, client_ended, &c, 5000), "/raise did not end");
    CHECK(c.status == 500 && strcmp(c.body, "{\"error\":\"handler failed\"}") == 0, "raise: %d %s",
          c.status, c.body);
    free(c.body);

    /* A stream held back by a client that reads 16 KiB per turn: the
     * handler waits above the backlog, and every byte arrives in order. */
    open_req(hd, &c, "GET", "/stream", "k");
    aiorch_exchange_start(c.x, "", 0);
    long most = 0;
    int waits = 0;
    for (int turns = 0; !client_ended(&c) && turns < 5000; turns++) {
        host_turn(&h, 5);
        if (c.backlog > most) most = c.backlog;
        if (c.backlog > AIORCH_HTTP_BACKLOG) waits++;
        if (c.backlog > 0) {
            c.backlog = c.backlog > 16384 ? c.backlog - 16384 : 0;
            if (c.x && c.backlog <= AIORCH_HTTP_BACKLOG) aiorch_exchange_writable(c.x);
        }
    }
    CHECK(c.last && c.len == 200 * 1024 + 3, "the stream ended with %zu bytes", c.len);
    CHECK(c.len >= 200 * 1024 && strncmp(c.body + 199 * 1024, "0200", 4) == 0 &&
              strcmp(c.body + c.len - 3, "end") == 0,
          "the stream's bytes are out of order");
    CHECK(waits > 0 && most <= AIORCH_HTTP_BACKLOG + 1024,
          "backpressure: the backlog reached %ld bytes (%d turns above it)", most, waits);
    free(c.body);

    /* A client gone: the handler is cancelled (its closers run). */
    open_req(hd, &c, "GET", "/wait", "k");
    aiorch_exchange_start(c.x, "", 0);
    host_turn(&h, 20);
    aiorch_exchange_gone(c.x);
    o = run_chunk(&h, "return _G.closed");
    CHECK(strcmp(o.json, "1") == 0 && !c.last && !c.aborted && c.heads == 0,
          "gone: closed %s, last %d, aborted %d", o.json, c.last, c.aborted);

    /* Freed with a handler running and a request whose body never came:
     * both end through their sinks, and the host gets every watcher back. */
    open_req(hd, &c, "GET", "/wait", "k");
    aiorch_exchange_start(c.x, "", 0);
    host_turn(&h, 20);
    open_req(hd, &c2, "POST", "/hello", "k");
    aiorch_runtime_free(h.rt);
    CHECK(c.aborted && c2.aborted, "freed: aborted %d %d", c.aborted, c2.aborted);
    CHECK(h.slots == 0 && h.list == NULL, "%d host watchers were not released", h.slots);
    CHECK(h.closings > 0, "the host was not told of libcurl's sockets closing");

    return check_summary();
}
