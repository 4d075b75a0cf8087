/* The connections of the runtime's HTTP/1.1 server (see server_conn.h).
 *
 * A srv_listener owns a listening socket and the srv_conn of each accepted
 * socket. Once a request's head is in, it is an exchange of the handler
 * side (hooks->open); its body read, the handler starts (hooks->start) and
 * answers through the sink below, which frames it (http1.c) onto the
 * connection. While the handler side runs code of ours (c->guarded), a
 * failing connection is only marked, and freed once that call returned. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* accept4 */
#endif

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "http1.h"
#include "server_conn.h"

/* Unsent bytes the kernel may queue per connection (TCP_NOTSENT_LOWAT): its
 * send buffer grows to megabytes on loopback, past what a client reads. */
#define SRV_KERNEL_UNSENT (64 * 1024)
#define SRV_READ_SIZE (16 * 1024) /* on the stack: a connection keeps only what is left */
#define SRV_IN_LIMIT (64 * 1024)  /* pipelined input buffered while a request runs */
#define SRV_HIGH_WATER AIORCH_HTTP_BACKLOG
#define SRV_LINGER_S 2.0
#define SRV_SHUTDOWN_IDLE_S 0.5 /* a fresh connection's chance to send during a shutdown */
/* Out of descriptors: accepting pauses this long, doubling up to the max. */
#define SRV_BACKOFF_MIN_S 0.01
#define SRV_BACKOFF_MAX_S 1.0
/* raise_nofile: descriptors kept for the process besides its connections */
#define SRV_NOFILE_RESERVE 64
#define SRV_STACK_HEADERS 64

typedef struct srv_conn srv_conn;

struct srv_listener {
    aiorch_runtime *rt;
    const srv_hooks *hooks;
    aiorch_handler *h;
    aiorch_http_sink sink;
    ev_io accept_w;
    ev_timer retry_w; /* resumes accepting after EMFILE and the like */
    double backoff;   /* its current delay in seconds; 0: accepting */
    ev_tstamp backoff_since, backoff_logged;
    long long accept_failed, failed_at_log, failed_at_start; /* accept calls refused */
    int fd;                                                  /* -1 once closed or shutting down */
    int port;
    srv_limits lim;
    long long refusing; /* connections open only to be answered 503 */
    aiorch_pool pool;
    srv_conn *conns;
    long long accepted, open, refused, timed_out;
    int shutting; /* 1: draining, 2: done */
    int shut_waiting;
    ev_timer shut_w;
    char host[256];
};

struct srv_conn {
    srv_listener *srv;
    srv_conn *next, **pprev;
    int fd;
    ev_io rw, ww;
    ev_timer linger_w;
    ev_timer to_w;      /* the client timeouts (conn_deadline) */
    ev_tstamp phase_at; /* when the phase began */
    ev_tstamp read_at;  /* reading a body: the last read */
    ev_tstamp sent_at;  /* the last write progress, or when output became pending */
    long long served;
    aiorch_h1_req req;
    aiorch_buf in, out;
    aiorch_h1_frame frame; /* of the response in flight */
    aiorch_exchange *x;    /* from the request's head until its response ends */
    unsigned keep_alive : 1, close_after : 1, linger : 1, lingering : 1, read_paused : 1,
        refused : 1, busy : 1, guarded : 1, failed : 1;
};

enum { SRV_PLAIN, SRV_GONE, SRV_CANCEL };

static void conn_free(srv_conn *c, int how);
static void conn_timer_update(srv_conn *c);
static void srv_on_shut_timer(struct ev_loop *loop, ev_timer *w, int revents);

static struct ev_loop *loop_of(const srv_conn *c)
{
    return c->srv->rt->loop;
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
            if (aiorch_buf_add(&c->out, iov[i].iov_base, iov[i].iov_len)) return -1;
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
    if (w > 0 || !queued) c->sent_at = ev_now(loop_of(c)); /* progress, or a fresh start */
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
        if (aiorch_buf_add(&c->out, (const char *)iov[i].iov_base + done, len - done)) return -1;
        done = 0;
    }
    if (out_pending(c)) {
        ev_io_start(loop_of(c), &c->ww);
        if (!ev_is_active(&c->to_w)) conn_timer_update(c); /* the send timeout */
    } else {
        aiorch_buf_free(&c->out); /* thousands of idle streams must not each keep one */
    }
    return 0;
}

/* The client went away (or its socket failed). Inside a call to the
 * handler side it is only marked: freed once that call returned. */
static void conn_fail(srv_conn *c)
{
    if (c->guarded) {
        c->failed = 1;
        return;
    }
    conn_free(c, SRV_GONE);
}

/* ---- connection lifetime ---------------------------------------------- */

/* Closes c and frees it. An exchange not ended yet is told: SRV_CANCEL
 * (the server closes) cancels its handler; otherwise the client is taken
 * as gone (a handler that started is cancelled and its request marked
 * aborted). */
static void conn_free(srv_conn *c, int how)
{
    srv_listener *s = c->srv;
    struct ev_loop *loop = s->rt->loop;
    aiorch_exchange *x = c->x;

    /* Unhook c first: code run by the handler side must not reach it. */
    c->x = NULL;
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
    if (s->shut_waiting && !s->conns) { /* drained: end the shutdown from the loop */
        ev_timer_stop(loop, &s->shut_w);
        ev_timer_set(&s->shut_w, 0., 0.);
        ev_timer_start(loop, &s->shut_w);
    }
    aiorch_h1_req_free(&c->req);
    aiorch_buf_free(&c->in);
    aiorch_buf_free(&c->out);
    free(c);
    /* s may be gone once the handler side runs: not used below */
    if (x) (how == SRV_CANCEL ? s->hooks->cancel : s->hooks->gone)(x);
}

/* The output is flushed and c must close. After a refused request the
 * client may still be sending: closing now would reset the connection and
 * could destroy the error response, so stop writing and drain its input
 * for a while first. Returns -1 when c was freed. */
static int conn_finish_close(srv_conn *c)
{
    struct ev_loop *loop = loop_of(c);
    if (c->linger && !c->lingering) {
        c->lingering = 1;
        shutdown(c->fd, SHUT_WR);
        ev_timer_stop(loop, &c->to_w); /* the linger timer bounds it now */
        ev_io_start(loop, &c->rw);
        ev_timer_start(loop, &c->linger_w);
        return 0;
    }
    conn_free(c, SRV_PLAIN);
    return -1;
}

/* c's response is complete: go on with the next request. */
static void conn_end_response(srv_conn *c)
{
    struct ev_loop *loop = loop_of(c);

    c->x = NULL;
    c->busy = 0;
    if (!c->frame.keep_alive || c->frame.close) c->close_after = 1;
    c->served++;
    c->phase_at = ev_now(loop);
    if (c->close_after) {
        ev_io_stop(loop, &c->rw);
        if (!out_pending(c) && !c->guarded) conn_finish_close(c);
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

/* An answer to a request not yet read whole (on_headers' answer, a
 * refusal) is queued: c closes after it, reads no more, and lingers. */
static void conn_answered(srv_conn *c)
{
    c->x = NULL;
    c->close_after = 1;
    c->linger = 1;
    c->in.off = c->in.len = 0;
    ev_io_stop(loop_of(c), &c->rw);
}

/* Sends a queued answer; c closes once it is out. Returns -1 when c was
 * freed. */
static int answer_send(srv_conn *c)
{
    if (conn_send(c, NULL, 0) < 0) {
        conn_free(c, SRV_PLAIN);
        return -1;
    }
    if (!out_pending(c)) return conn_finish_close(c);
    conn_timer_update(c); /* the send timeout: a client that does not read */
    return 0;
}

/* ---- the sink: what the handler side answers --------------------------- */

/* aiorch_http_sink.head */
static int sink_head(void *ud, const aiorch_http_response *res)
{
    srv_conn *c = ud;
    if (!c->busy) { /* answered before its body was read: it closes */
        c->frame.keep_alive = 0;
        c->frame.head = c->req.parser.method == HTTP_HEAD;
        c->frame.http10 = 0;
    }
    if (aiorch_h1_head(&c->out, res, &c->frame) == 0) return 0;
    conn_fail(c);
    return -1;
}

/* aiorch_http_sink.body */
static long sink_body(void *ud, const char *data, size_t n, int last)
{
    srv_conn *c = ud;
    struct iovec iov[3];
    char hex[24];
    int k = aiorch_h1_body(&c->frame, data, n, last, iov, hex);

    if (!c->busy) { /* queued; answer_send sends it once the parse returned */
        for (int i = 0; i < k; i++)
            if (aiorch_buf_add(&c->out, iov[i].iov_base, iov[i].iov_len)) {
                c->failed = 1;
                return -1;
            }
        if (last) conn_answered(c);
        return (long)out_pending(c);
    }
    if (c->guarded) { /* inside a call from here: no socket writes yet */
        for (int i = 0; i < k; i++)
            if (aiorch_buf_add(&c->out, iov[i].iov_base, iov[i].iov_len)) {
                c->failed = 1;
                return -1;
            }
    } else if (conn_send(c, iov, k) < 0) {
        conn_fail(c);
        return -1;
    }
    if (!last) return (long)out_pending(c);
    {
        long pending = (long)out_pending(c);
        conn_end_response(c);
        return pending;
    }
}

/* aiorch_http_sink.abort: cuts the connection, whatever was sent */
static void sink_abort(void *ud)
{
    srv_conn *c = ud;
    c->x = NULL;
    if (c->guarded)
        c->failed = 1;
    else
        conn_free(c, SRV_PLAIN);
}

/* ---- reading requests ------------------------------------------------- */

/* Answers a request refused while it was read, then closes. Once its head
 * was taken, the handler side words the answer (on_refuse). Returns -1
 * when c was freed. */
static int conn_reject(srv_conn *c, int status)
{
    const char *body = status == 413   ? "payload too large\n"
                       : status == 500 ? "internal server error\n"
                       : status == 408 ? "request timeout\n"
                       : status == 431 ? "request header fields too large\n"
                       : status == 503 ? "service unavailable\n"
                                       : "bad request\n";
    if (status == 503)
        aiorch_buf_free(&c->req.body); /* max_buffered: not even on_refuse copies it */
    if (c->x) {
        aiorch_exchange *x = c->x;
        c->guarded = 1;
        c->srv->hooks->refuse(x, status, c->req.body.p ? c->req.body.p : "", c->req.body.len);
        c->guarded = 0;
    } else if (aiorch_h1_plain(&c->out, status, "text/plain", body, strlen(body)) == 0) {
        conn_answered(c);
    } else {
        c->failed = 1;
    }
    aiorch_buf_free(&c->req.body); /* no use any more: back to max_buffered at once */
    if (c->failed || c->x) {
        conn_free(c, SRV_PLAIN);
        return -1;
    }
    return answer_send(c);
}

/* aiorch_h1_req.on_begin */
static void conn_on_begin(aiorch_h1_req *q)
{
    srv_conn *c = q->data;
    c->phase_at = ev_now(loop_of(c));
}

/* aiorch_h1_req.on_head: the request goes to the handler side, whose
 * on_headers may answer it at once (then returns -1). */
static int conn_on_head(aiorch_h1_req *q)
{
    srv_conn *c = q->data;
    aiorch_header stack[SRV_STACK_HEADERS], *hv = stack;
    aiorch_http_request req;

    c->keep_alive = http_should_keep_alive(&q->parser) != 0;
    c->phase_at = c->read_at = ev_now(loop_of(c));
    if (q->nhdrs > SRV_STACK_HEADERS && !(hv = malloc(q->nhdrs * sizeof *hv))) {
        q->reject = 500;
        return -1;
    }
    aiorch_h1_request(q, &req, hv);
    c->x = c->srv->hooks->open(c->srv->h, &req, &c->srv->sink, c);
    if (hv != stack) free(hv);
    aiorch_h1_req_drop_head(q); /* the request has copies: a slow body must not hold these */
    if (c->failed) {
        q->failed = 1;
        return -1;
    }
    if (!c->x) {
        q->reject = AIORCH_H1_ANSWERED;
        return -1;
    }
    return 0;
}

/* aiorch_h1_req.on_continue */
static int conn_on_continue(aiorch_h1_req *q)
{
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    srv_conn *c = q->data;
    struct iovec v;
    v.iov_base = (void *)cont;
    v.iov_len = sizeof cont - 1;
    return conn_send(c, &v, 1);
}

/* The whole request is in: its handler starts. Returns -1 when c was freed. */
static int conn_dispatch(srv_conn *c)
{
    srv_listener *s = c->srv;
    aiorch_exchange *x = c->x;
    const http_parser *p = &c->req.parser;

    c->busy = 1;
    c->frame.head = p->method == HTTP_HEAD;
    c->frame.http10 = !(p->http_major == 1 && p->http_minor >= 1);
    c->frame.keep_alive = c->keep_alive && !p->upgrade && !s->shutting;
    c->frame.close = c->frame.chunked = 0;
    c->guarded = 1;
    s->hooks->start(x, c->req.body.p ? c->req.body.p : "", c->req.body.len);
    c->guarded = 0;
    /* the handler has a copy: a long response (a stream) must not hold it */
    aiorch_buf_free(&c->req.body);
    if (c->failed) {
        conn_free(c, SRV_GONE);
        return -1;
    }
    if (out_pending(c) && !ev_is_active(&c->ww)) { /* answered inside start: send it */
        if (conn_send(c, NULL, 0) < 0) {
            conn_free(c, SRV_GONE);
            return -1;
        }
        if (!c->busy && c->close_after && !out_pending(c)) return conn_finish_close(c);
    }
    return 0;
}

/* Parses input (c->in, or bytes just read) until a request is complete
 * (and dispatched) or the input runs out. Returns -1 when c was freed. */
static int conn_parse(srv_conn *c, aiorch_buf *in)
{
    while (!c->busy && !c->close_after && in->off < in->len) {
        int complete, status;

        if (out_pending(c) > SRV_HIGH_WATER) break; /* resumed as the output drains */
        c->guarded = 1;
        in->off += aiorch_h1_parse(&c->req, in->p + in->off, in->len - in->off, &complete, &status);
        c->guarded = 0;
        if (c->failed || c->req.failed) {
            conn_free(c, SRV_PLAIN);
            return -1;
        }
        if (complete) {
            if (conn_dispatch(c) < 0) return -1;
        } else if (status == AIORCH_H1_ANSWERED) {
            return answer_send(c);
        } else if (status) {
            return conn_reject(c, status);
        }
    }
    if (in->off == in->len) {
        if (in == &c->in)
            aiorch_buf_free(in);
        else
            in->off = in->len = 0;
    }
    conn_timer_update(c);
    return 0;
}

/* ---- socket events ---------------------------------------------------- */

/* EOF or a read error from the client. */
static void conn_eof(srv_conn *c, int clean)
{
    if (c->busy) { /* it went away before its response was finished */
        conn_free(c, SRV_GONE);
        return;
    }
    if (clean && out_pending(c)) { /* half-closed: it may still read what is queued */
        c->close_after = 1;
        c->linger = 0;
        ev_io_stop(loop_of(c), &c->rw);
        return;
    }
    conn_free(c, SRV_PLAIN);
}

/* Reads what a lingering connection still sends, only to drop it. */
static void conn_drain(srv_conn *c)
{
    char tmp[4096];
    for (;;) {
        ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n > 0) continue;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        conn_free(c, SRV_PLAIN);
        return;
    }
}

/* Reads what the client sent; parses it when no request is running. */
static void conn_read(struct ev_loop *loop, srv_conn *c)
{
    char tmp[SRV_READ_SIZE];
    int i;

    for (i = 0; i < 8; i++) {
        aiorch_buf *b = &c->in;
        ssize_t n;

        if ((c->busy || out_pending(c) > SRV_HIGH_WATER) &&
            (b->len - b->off >= SRV_IN_LIMIT || aiorch_pool_full(&c->srv->pool, SRV_READ_SIZE))) {
            /* enough pipelined input: wait for the running request or output */
            ev_io_stop(loop, &c->rw);
            c->read_paused = 1;
            return;
        }
        n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n > 0) {
            if (c->req.phase == AIORCH_H1_BODY) c->read_at = ev_now(loop);
            if (b->off == b->len && !c->busy && out_pending(c) <= SRV_HIGH_WATER) {
                /* parsed in place; only bytes past a complete request are kept */
                aiorch_buf view = {.p = tmp, .len = (size_t)n, .cap = sizeof tmp};
                if (conn_parse(c, &view) < 0 || c->close_after) return;
                if (view.off < view.len && aiorch_buf_add(b, tmp + view.off, view.len - view.off)) {
                    conn_free(c, c->busy ? SRV_CANCEL : SRV_PLAIN);
                    return;
                }
            } else {
                if (aiorch_buf_add(b, tmp, (size_t)n)) {
                    conn_free(c, c->busy ? SRV_CANCEL : SRV_PLAIN);
                    return;
                }
                if (!c->busy && conn_parse(c, &c->in) < 0) return;
                if (c->close_after) return;
            }
            if ((size_t)n < sizeof tmp) return;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        conn_eof(c, n == 0);
        return;
    }
}

/* ev_io read watcher (EV_CUSTOM when fed by conn_end_response: parse only) */
static void conn_on_read(struct ev_loop *loop, ev_io *w, int revents)
{
    srv_conn *c = w->data;
    aiorch_runtime *rt = c->srv->rt;
    const srv_hooks *hooks = c->srv->hooks;

    if (c->lingering)
        conn_drain(c);
    else if (!(revents & EV_READ)) {
        if (!c->busy) conn_parse(c, &c->in);
    } else
        conn_read(loop, c);
    hooks->settle(rt); /* run the handlers started or cancelled here */
}

/* Writes queued output; lets waiting writers go on below the high-water
 * mark, and goes on with pipelined input held back by it. */
static void conn_flush(struct ev_loop *loop, srv_conn *c)
{
    while (out_pending(c)) {
        ssize_t n = send(c->fd, c->out.p + c->out.off, out_pending(c), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_fail(c);
            return;
        }
        c->out.off += (size_t)n;
        c->sent_at = ev_now(loop);
    }
    if (!out_pending(c)) {
        ev_io_stop(loop, &c->ww);
        aiorch_buf_free(&c->out);
        if (!c->busy && c->req.phase == AIORCH_H1_IDLE)
            c->phase_at = ev_now(loop); /* idle from now */
    }
    if (c->busy && c->x && out_pending(c) < SRV_HIGH_WATER) c->srv->hooks->writable(c->x);
    if (!out_pending(c) && c->close_after) {
        conn_finish_close(c);
        return;
    }
    if (c->busy || out_pending(c) > SRV_HIGH_WATER) return;
    if (c->read_paused && !c->close_after) {
        c->read_paused = 0;
        ev_io_start(loop, &c->rw);
    }
    if (c->in.off < c->in.len)
        conn_parse(c, &c->in);
    else
        conn_timer_update(c);
}

/* ev_io write watcher */
static void conn_on_write(struct ev_loop *loop, ev_io *w, int revents)
{
    srv_conn *c = w->data;
    aiorch_runtime *rt = c->srv->rt;
    const srv_hooks *hooks = c->srv->hooks;

    (void)revents;
    conn_flush(loop, c);
    hooks->settle(rt); /* run the writers woken here */
}

/* ev_timer: the lingering close has waited long enough */
static void conn_on_linger(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    conn_free(w->data, SRV_PLAIN);
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
    const srv_listener *s = c->srv;
    ev_tstamp due = 0;

    if (c->lingering) return 0; /* the linger timer bounds it */
    if (out_pending(c)) due = sooner(due, c->sent_at, s->lim.send_to);
    if (c->busy || c->close_after) return due;
    if (c->req.phase == AIORCH_H1_HEAD) {
        due = sooner(due, c->phase_at, s->lim.header_to);
    } else if (c->req.phase == AIORCH_H1_BODY) {
        due = sooner(due, c->phase_at, s->lim.body_to);
        due = sooner(due, c->read_at, s->lim.read_to);
    } else if (!out_pending(c)) {
        due = sooner(due, c->phase_at, s->shutting ? SRV_SHUTDOWN_IDLE_S : s->lim.idle_to);
    }
    return due;
}

/* Arms c's timer for its deadline. Between phases only: a write's progress
 * moves the send deadline without touching the timer, which, once it
 * fires early, waits for the rest (conn_on_timeout). */
static void conn_timer_update(srv_conn *c)
{
    struct ev_loop *loop = loop_of(c);
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
    srv_listener *s = c->srv;
    aiorch_runtime *rt = s->rt;
    const srv_hooks *hooks = s->hooks;
    ev_tstamp now = ev_now(loop), due = conn_deadline(c);

    (void)revents;
    if (due == 0) return;
    if (due > now + 1e-3) { /* it moved on meanwhile */
        ev_timer_set(w, due - now, 0.);
        ev_timer_start(loop, w);
        return;
    }
    s->timed_out++;
    if (out_pending(c) && s->lim.send_to > 0 && c->sent_at + s->lim.send_to <= now + 1e-3)
        conn_free(c, c->busy ? SRV_GONE : SRV_PLAIN);
    else if (c->req.phase != AIORCH_H1_IDLE)
        conn_reject(c, 408);
    else
        conn_free(c, SRV_PLAIN);
    hooks->settle(rt);
}

/* ---- accepting ---------------------------------------------------------- */

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

static srv_conn *conn_new(srv_listener *s, int fd)
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
    aiorch_h1_req_init(&c->req, &s->pool);
    c->req.max_header = s->lim.max_header;
    c->req.max_body = s->lim.max_body;
    c->req.on_begin = conn_on_begin;
    c->req.on_head = conn_on_head;
    c->req.on_continue = conn_on_continue;
    c->req.data = c;
    ev_io_init(&c->rw, conn_on_read, fd, EV_READ);
    c->rw.data = c;
    ev_io_init(&c->ww, conn_on_write, fd, EV_WRITE);
    c->ww.data = c;
    ev_timer_init(&c->linger_w, conn_on_linger, SRV_LINGER_S, 0.);
    c->linger_w.data = c;
    ev_init(&c->to_w, conn_on_timeout);
    c->to_w.data = c;
    c->in.pool = &s->pool; /* pipelined input pauses reading instead (conn_read) */
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
static void srv_take(srv_listener *s, int fd)
{
    int full = s->lim.max_conns > 0 && s->open - s->refusing >= s->lim.max_conns;
    srv_conn *c = conn_new(s, fd);
    if (!c) {
        close(fd);
        return;
    }
    if (full) {
        c->refused = 1;
        s->refusing++;
        s->refused++;
        conn_reject(c, 503);
    }
}

/* Out of descriptors (or memory): the listening socket stays readable, so
 * accepting stops and a timer resumes it, after 10 ms, doubling up to 1 s
 * while it keeps failing. The connections already open are served
 * meanwhile, and the clients waiting in the backlog are taken once
 * descriptors free up (at once when one of its connections closes). One
 * line is logged as it starts, then at most one per second with the count
 * of accepts refused, and one as it ends. */
static void srv_backoff(srv_listener *s, int err)
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
                          s->host, s->port, strerror(err), s->accept_failed - s->failed_at_log,
                          now - s->backoff_logged, s->backoff * 1000);
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
static void srv_accept_all(srv_listener *s)
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
                      s->accept_failed - s->failed_at_start);
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
    srv_listener *s = w->data;
    (void)revents;
    if (s->fd < 0 || s->shutting) return;
    ev_io_start(loop, &s->accept_w);
    srv_accept_all(s);
    s->hooks->settle(s->rt);
}

/* ---- listeners ---------------------------------------------------------- */

/* Opens the listening socket. Returns -1 with a message in err. */
static int srv_bind(srv_listener *s, const char *host, int port, int reuseport, char *err,
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

srv_listener *aiorch_srv_listen(aiorch_runtime *rt, const char *host, int port, int reuseport,
                                const srv_limits *lim, const srv_hooks *hooks, aiorch_handler *h,
                                char *err, size_t errsz)
{
    srv_listener *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errsz, "out of memory");
        return NULL;
    }
    s->rt = rt;
    s->hooks = hooks;
    s->h = h;
    s->sink.head = sink_head;
    s->sink.body = sink_body;
    s->sink.abort = sink_abort;
    s->lim = *lim;
    s->pool.max = lim->max_buffered;
    s->fd = -1;
    snprintf(s->host, sizeof s->host, "%s", host);
    if (srv_bind(s, host, port, reuseport, err, errsz) < 0) {
        free(s);
        return NULL;
    }
    ev_io_init(&s->accept_w, srv_on_accept, s->fd, EV_READ);
    s->accept_w.data = s;
    ev_init(&s->retry_w, srv_on_retry);
    s->retry_w.data = s;
    ev_init(&s->shut_w, srv_on_shut_timer);
    s->shut_w.data = s;
    ev_io_start(rt->loop, &s->accept_w);
    return s;
}

int aiorch_srv_port(const srv_listener *l)
{
    return l->port;
}

const char *aiorch_srv_host(const srv_listener *l)
{
    return l->host;
}

void aiorch_srv_stats(const srv_listener *l, srv_stats *out)
{
    out->accepted = l->accepted;
    out->open = l->open;
    out->refused = l->refused;
    out->timed_out = l->timed_out;
    out->buffered = (long long)l->pool.used;
    out->accept_failed = l->accept_failed;
}

void aiorch_srv_limits(const srv_listener *l, srv_limits *out)
{
    *out = l->lim;
}

/* A connection may need two descriptors (its socket and an upstream one),
 * the process SRV_NOFILE_RESERVE more. The soft RLIMIT_NOFILE is raised
 * toward that, as far as the hard one allows; if that is not enough,
 * max_connections is lowered to what fits, and one line says so (as Redis
 * does with maxclients). */
void aiorch_srv_fit_nofile(srv_listener *l)
{
    struct rlimit rl;
    rlim_t need, reserve, fit;
    long long max_conns = l->lim.max_conns;

    if (max_conns <= 0 || getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return;
    need = (rlim_t)max_conns * 2 + SRV_NOFILE_RESERVE;
    if (rl.rlim_cur >= need) return;
    {
        struct rlimit want = rl;
        want.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= need ? need : rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &want) == 0) rl.rlim_cur = want.rlim_cur;
    }
    if (rl.rlim_cur >= need) return;
    reserve = rl.rlim_cur / 4 < SRV_NOFILE_RESERVE ? rl.rlim_cur / 4 : SRV_NOFILE_RESERVE;
    fit = (rl.rlim_cur - reserve) / 2;
    if (fit < 1) fit = 1;
    aiorch_report(l->rt,
                  "aiorch.server: max_connections %lld needs %llu descriptors, but RLIMIT_NOFILE "
                  "is %llu: serving at most %llu connections",
                  max_conns, (unsigned long long)need, (unsigned long long)rl.rlim_cur,
                  (unsigned long long)fit);
    l->lim.max_conns = (long long)fit;
}

/* Ends a shutdown: cuts the connections left (cancelling their handlers)
 * and tells the handler side how many requests were cut. */
static void srv_shut_end(srv_listener *s)
{
    long long cut = 0;
    int waiting = s->shut_waiting;
    srv_conn *c;

    ev_timer_stop(s->rt->loop, &s->shut_w);
    s->shut_waiting = 0;
    s->shutting = 2;
    for (c = s->conns; c; c = c->next)
        if (c->busy || (c->req.phase != AIORCH_H1_IDLE && !c->close_after)) cut++;
    while (s->conns)
        conn_free(s->conns, SRV_CANCEL);
    if (waiting) s->hooks->shut_done(s->h, cut);
}

/* ev_timer: the shutdown's deadline (or, at 0, its last connection went) */
static void srv_on_shut_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    srv_listener *s = w->data;
    aiorch_runtime *rt = s->rt;
    const srv_hooks *hooks = s->hooks;
    (void)loop;
    (void)revents;
    srv_shut_end(s);
    hooks->settle(rt);
}

int aiorch_srv_shutdown(srv_listener *l, double ms)
{
    struct ev_loop *loop = l->rt->loop;
    srv_conn *c, *next;

    if (l->shutting == 1) return -1;
    if (l->shutting) return 0;
    l->shutting = 1;
    /* Connections the kernel queued for this socket would be reset by the
     * close: take them first. */
    ev_io_stop(loop, &l->accept_w);
    ev_timer_stop(loop, &l->retry_w);
    for (;;) {
        int fd = srv_accept_fd(l->fd);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            break;
        }
        srv_take(l, fd);
    }
    close(l->fd);
    l->fd = -1;
    for (c = l->conns; c; c = next) {
        next = c->next; /* idle ones are freed without running the handler side */
        if (c->close_after || c->lingering) continue;
        if (c->busy) {
            c->frame.keep_alive = 0; /* connection: close, or closed after it */
        } else if (c->req.phase == AIORCH_H1_IDLE && c->served > 0 && !out_pending(c)) {
            conn_free(c, SRV_PLAIN);
        } else {
            conn_timer_update(c);
        }
    }
    if (!l->conns) {
        l->shutting = 2;
        return 0;
    }
    l->shut_waiting = 1;
    ev_timer_stop(loop, &l->shut_w);
    ev_now_update(loop);
    ev_timer_set(&l->shut_w, ms / 1000.0, 0.);
    ev_timer_start(loop, &l->shut_w);
    return 1;
}

int aiorch_srv_shutting(const srv_listener *l)
{
    return l->shutting;
}

void aiorch_srv_shutdown_now(srv_listener *l)
{
    l->shut_waiting = 0; /* its caller went: nobody to tell */
    srv_shut_end(l);
}

void aiorch_srv_close(srv_listener *l)
{
    struct ev_loop *loop = l->rt->loop;
    ev_io_stop(loop, &l->accept_w);
    ev_timer_stop(loop, &l->retry_w);
    ev_timer_stop(loop, &l->shut_w);
    if (l->fd >= 0) close(l->fd);
    l->fd = -1;
    if (l->shut_waiting) srv_shut_end(l); /* its caller hears the count cut */
    while (l->conns)
        conn_free(l->conns, SRV_CANCEL);
    free(l);
}
