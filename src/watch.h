/* watch.c: the runtime's own sockets and timers, on its libev loop or on a
 * host's loop (aiorch_options.host). The runtime's files that run under a
 * host (curl_glue.c, task.c, http.c, job.c) watch through these; in libev
 * mode each is a plain ev_io or ev_timer, and under a host each is one
 * call to the host (curl's multi_socket shape: a socket to watch, a timer
 * to arm), which calls back with aiorch_runtime_ready. */
#ifndef AIORCH_WATCH_H
#define AIORCH_WATCH_H

#include <ev.h>

#include "aiorch.h"

typedef struct aiorch_loop {
    struct ev_loop *ev; /* libev's, or NULL under a host */
    aiorch_host host;   /* a host's loop when ev is NULL */
    unsigned iter;      /* a host's: the callbacks it made that were not posted */
} aiorch_loop;

typedef void (*aiorch_watch_cb)(aiorch_watch *w, int events);

struct aiorch_watch {
    union {
        ev_io io;
        ev_timer timer;
    } ev; /* first: libev hands back its address */
    aiorch_loop *lp;
    aiorch_watch_cb cb;
    void *data;
    void *slot; /* the host's, for this watcher */
    int fd, events;
    unsigned active : 1, weak : 1, is_io : 1, posted : 1;
};

/* weak: a timer that must not keep the loop (or a host's exiting worker)
 * alive, for background work. */
void aiorch_watch_timer_init(aiorch_watch *w, aiorch_loop *lp, aiorch_watch_cb cb, void *data,
                             int weak);
void aiorch_watch_io_init(aiorch_watch *w, aiorch_loop *lp, int fd, aiorch_watch_cb cb, void *data);
/* Arms a timer once, after secs (0: after the loop polls again). */
void aiorch_watch_start(aiorch_watch *w, double secs);
/* Runs the watcher once, as soon as the current callback returns. */
void aiorch_watch_post(aiorch_watch *w);
/* Watches the socket for AIORCH_READ | AIORCH_WRITE (0: stops); -1 when the
 * host could not. */
int aiorch_watch_io(aiorch_watch *w, int events);
void aiorch_watch_stop(aiorch_watch *w);
/* Stops w and lets the host free what it keeps for it; before w's memory goes. */
void aiorch_watch_close(aiorch_watch *w);

static inline int aiorch_watch_active(const aiorch_watch *w)
{
    return w->active;
}

/* The loop's time in seconds (for deadlines: only differences count),
 * brought up to date. */
double aiorch_loop_now(aiorch_loop *lp);
/* Counts the loop's turns (libev's iterations; a host's callbacks). */
unsigned aiorch_loop_iteration(const aiorch_loop *lp);

/* fd, which was watched, is about to be closed (aiorch_host.closing). */
void aiorch_loop_closing(aiorch_loop *lp, int fd);

/* A host's callback for w (aiorch_runtime_ready). */
void aiorch_watch_ready(aiorch_watch *w, int events);

#endif
