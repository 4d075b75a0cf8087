/* libcurl's multi interface driven by the runtime's loop (libev's, or a
 * host's through watch.c), in the shape of curl's evhiperfifo example: one
 * timer for curl's timeouts, one socket watcher per socket, and
 * curl_multi_socket_action from both. Finished transfers are reported only
 * after curl_multi_socket_action has returned. */
#include <stdlib.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <curl/curl.h>

#include "internal.h"

#define POOL_MAX 64
#define QUIET_S 0.5 /* no transfer for this long: give memory back */
#define FEED_MAX 16 /* zero timeouts run without polling, per loop iteration */

typedef struct sockinfo {
    aiorch_watch w;
    curl_socket_t fd;
    aiorch_curl *c;
    struct sockinfo *prev, *next;
} sockinfo;

struct aiorch_curl {
    aiorch_loop *lp;
    aiorch_curl_hooks hooks;
    CURLM *multi;
    aiorch_watch timer;
    sockinfo *socks;
    CURL *pool[POOL_MAX];
    int npool;
    int active;             /* transfers added and not yet removed */
    unsigned fed_iter, fed; /* zero timeouts fed in loop iteration fed_iter */
    aiorch_watch quiet;     /* armed while active is 0; does not keep the loop alive */
};

static void transfer_gone(aiorch_curl *c)
{
    if (--c->active == 0) aiorch_watch_start(&c->quiet, QUIET_S);
}

/* timer: no transfer for QUIET_S after a burst. The pooled handles go, the
 * owner gives back what the burst left (quiet hook), and the free pages of
 * the heap go back to the system, so that an idle process is small again. */
static void quiet_cb(aiorch_watch *w, int events)
{
    aiorch_curl *c = w->data;
    (void)events;
    if (c->active) return;
    if (c->hooks.quiet) c->hooks.quiet(c->hooks.ud);
    for (int i = 0; i < c->npool; i++)
        curl_easy_cleanup(c->pool[i]);
    c->npool = 0;
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

/* Reports each finished transfer to its owner. */
static void check_done(aiorch_curl *c)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(c->multi, &left))) {
        if (msg->msg != CURLMSG_DONE) continue;
        CURL *easy = msg->easy_handle;
        CURLcode code = msg->data.result;
        aiorch_transfer *tr = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&tr);
        curl_multi_remove_handle(c->multi, easy);
        transfer_gone(c);
        if (tr) tr->done(tr, (int)code);
    }
}

static void socket_action(aiorch_curl *c, curl_socket_t fd, int flags)
{
    int running;
    curl_multi_socket_action(c->multi, fd, flags, &running);
    check_done(c);
    if (c->hooks.after) c->hooks.after(c->hooks.ud);
}

/* a curl socket is ready */
static void io_cb(aiorch_watch *w, int events)
{
    sockinfo *si = w->data;
    int flags = (events & AIORCH_READ ? CURL_CSELECT_IN : 0) |
                (events & AIORCH_WRITE ? CURL_CSELECT_OUT : 0);
    socket_action(si->c, si->fd, flags);
}

/* curl's timeout expired */
static void timer_cb(aiorch_watch *w, int events)
{
    (void)events;
    socket_action(w->data, CURL_SOCKET_TIMEOUT, 0);
}

static void sock_free(aiorch_curl *c, sockinfo *si)
{
    aiorch_watch_close(&si->w);
    if (si->prev)
        si->prev->next = si->next;
    else
        c->socks = si->next;
    if (si->next) si->next->prev = si->prev;
    free(si);
}

/* CURLMOPT_SOCKETFUNCTION */
static int curl_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)easy;
    aiorch_curl *c = userp;
    sockinfo *si = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (si) sock_free(c, si);
        return 0;
    }
    int events =
        (what & CURL_POLL_IN ? AIORCH_READ : 0) | (what & CURL_POLL_OUT ? AIORCH_WRITE : 0);
    if (!si) {
        si = calloc(1, sizeof *si);
        if (!si) return -1;
        si->fd = fd;
        si->c = c;
        si->next = c->socks;
        if (si->next) si->next->prev = si;
        c->socks = si;
        aiorch_watch_io_init(&si->w, c->lp, fd, io_cb, si);
        curl_multi_assign(c->multi, fd, si);
    }
    /* unchanged: nothing to do (touching it would cost an epoll_ctl) */
    return aiorch_watch_io(&si->w, events);
}

/* CURLMOPT_TIMERFUNCTION */
static int curl_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    aiorch_curl *c = userp;
    unsigned iter = aiorch_loop_iteration(c->lp);
    if (timeout_ms < 0) { /* no timeout */
        aiorch_watch_stop(&c->timer);
    } else if (timeout_ms == 0 && c->fed_iter == iter && c->fed >= FEED_MAX) {
        aiorch_watch_start(&c->timer, 0.); /* enough for this pass: poll first */
    } else if (timeout_ms == 0) {
        /* Run it from the loop in this same pass, once the current callback
         * returns, rather than after another poll (one per request). */
        if (c->fed_iter != iter) {
            c->fed_iter = iter;
            c->fed = 0;
        }
        c->fed++;
        aiorch_watch_post(&c->timer);
    } else {
        aiorch_watch_start(&c->timer, (double)timeout_ms / 1000.0);
    }
    return 0;
}

aiorch_curl *aiorch_curl_new(aiorch_loop *lp, const aiorch_curl_hooks *hooks)
{
    /* Reference-counted by libcurl: paired with curl_global_cleanup in free. */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return NULL;
    aiorch_curl *c = calloc(1, sizeof *c);
    if (!c) {
        curl_global_cleanup();
        return NULL;
    }
    c->lp = lp;
    c->hooks = *hooks;
    c->multi = curl_multi_init();
    if (!c->multi) {
        free(c);
        curl_global_cleanup();
        return NULL;
    }
    aiorch_watch_timer_init(&c->timer, lp, timer_cb, c, 0);
    aiorch_watch_timer_init(&c->quiet, lp, quiet_cb, c, 1);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, curl_socket_cb);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
    return c;
}

void aiorch_curl_free(aiorch_curl *c)
{
    for (int i = 0; i < c->npool; i++)
        curl_easy_cleanup(c->pool[i]);
    curl_multi_cleanup(c->multi);
    while (c->socks)
        sock_free(c, c->socks);
    aiorch_watch_close(&c->timer);
    aiorch_watch_close(&c->quiet);
    free(c);
    curl_global_cleanup();
}

/* CURLOPT_CLOSESOCKETFUNCTION: a host that keeps a stopped socket
 * registered hears first that it goes. */
static int close_cb(void *clientp, curl_socket_t fd)
{
    aiorch_curl *c = clientp;
    aiorch_loop_closing(c->lp, fd);
    return close(fd);
}

int aiorch_curl_add(aiorch_curl *c, aiorch_transfer *tr)
{
    curl_easy_setopt(tr->easy, CURLOPT_PRIVATE, tr);
    if (!c->lp->ev) {
        curl_easy_setopt(tr->easy, CURLOPT_CLOSESOCKETFUNCTION, close_cb);
        curl_easy_setopt(tr->easy, CURLOPT_CLOSESOCKETDATA, c);
    }
    if (curl_multi_add_handle(c->multi, tr->easy) != CURLM_OK) return -1;
    c->active++;
    aiorch_watch_stop(&c->quiet);
    return 0;
}

void aiorch_curl_remove(aiorch_curl *c, aiorch_transfer *tr)
{
    curl_multi_remove_handle(c->multi, tr->easy);
    transfer_gone(c);
}

void *aiorch_curl_easy_get(aiorch_curl *c)
{
    return c->npool ? c->pool[--c->npool] : curl_easy_init();
}

/* libcurl 7.x keeps the receive buffer of some failed transfers (a refused
 * URL, an aborted write) across curl_easy_reset, and then refuses a new
 * CURLOPT_BUFFERSIZE while reading up to its default size into the old,
 * smaller buffer. A handle that refuses the size is dropped, not pooled. */
void aiorch_curl_easy_put(aiorch_curl *c, void *easy)
{
    if (c->npool < POOL_MAX) {
        curl_easy_reset(easy);
        if (curl_easy_setopt(easy, CURLOPT_BUFFERSIZE, 0L) == CURLE_OK) { /* 0: the default */
            c->pool[c->npool++] = easy;
            return;
        }
    }
    curl_easy_cleanup(easy);
}
