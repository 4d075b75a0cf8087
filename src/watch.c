/* The runtime's sockets and timers on libev or on a host's loop (watch.h). */
#include <math.h>
#include <stddef.h>
#include <time.h>

#include "watch.h"

/* ev_timer, and a fed watcher: a one-shot is over before its callback. */
static void timer_cb(struct ev_loop *loop, ev_timer *t, int revents)
{
    aiorch_watch *w = (aiorch_watch *)t;
    (void)revents;
    if (w->active && w->weak && !w->posted) ev_ref(loop); /* libev stopped it: its unref ends */
    w->active = w->posted = 0;
    w->cb(w, AIORCH_TIMER);
}

/* ev_io */
static void io_cb(struct ev_loop *loop, ev_io *io, int revents)
{
    aiorch_watch *w = (aiorch_watch *)io;
    (void)loop;
    w->cb(w, (revents & EV_READ ? AIORCH_READ : 0) | (revents & EV_WRITE ? AIORCH_WRITE : 0));
}

void aiorch_watch_timer_init(aiorch_watch *w, aiorch_loop *lp, aiorch_watch_cb cb, void *data,
                             int weak)
{
    w->lp = lp;
    w->cb = cb;
    w->data = data;
    w->slot = NULL;
    w->fd = -1;
    w->events = 0;
    w->active = w->posted = w->is_io = 0;
    w->weak = weak != 0;
    ev_init(&w->ev.timer, timer_cb);
}

void aiorch_watch_io_init(aiorch_watch *w, aiorch_loop *lp, int fd, aiorch_watch_cb cb, void *data)
{
    aiorch_watch_timer_init(w, lp, cb, data, 0);
    w->is_io = 1;
    w->fd = fd;
    ev_init(&w->ev.io, io_cb);
}

void aiorch_watch_stop(aiorch_watch *w)
{
    aiorch_loop *lp = w->lp;
    if (lp->ev) {
        if (w->is_io) {
            ev_io_stop(lp->ev, &w->ev.io);
        } else {
            if (w->active && w->weak && !w->posted) ev_ref(lp->ev);
            ev_timer_stop(lp->ev, &w->ev.timer); /* also drops a fed event not yet run */
        }
    } else if (w->active) {
        if (w->is_io)
            lp->host.io(lp->host.ud, w, w->fd, 0, &w->slot);
        else
            lp->host.timer(lp->host.ud, w, -1, 0, &w->slot);
    }
    w->active = w->posted = 0;
    w->events = 0;
}

void aiorch_watch_start(aiorch_watch *w, double secs)
{
    aiorch_loop *lp = w->lp;
    aiorch_watch_stop(w);
    w->active = 1;
    if (lp->ev) {
        ev_now_update(lp->ev); /* the cached time may be stale: never fire early */
        ev_timer_set(&w->ev.timer, secs > 0 ? secs : 0., 0.);
        ev_timer_start(lp->ev, &w->ev.timer);
        if (w->weak) ev_unref(lp->ev);
        return;
    }
    /* Rounded up: a host's timer in whole milliseconds must not fire early. */
    lp->host.timer(lp->host.ud, w, secs > 0 ? (long)ceil(secs * 1000) : 0,
                   w->weak ? AIORCH_WEAK : 0, &w->slot);
}

void aiorch_watch_post(aiorch_watch *w)
{
    aiorch_loop *lp = w->lp;
    aiorch_watch_stop(w);
    w->active = w->posted = 1;
    if (lp->ev) {
        ev_feed_event(lp->ev, &w->ev.timer, EV_TIMER);
        return;
    }
    lp->host.timer(lp->host.ud, w, 0, AIORCH_SOON | (w->weak ? AIORCH_WEAK : 0), &w->slot);
}

int aiorch_watch_io(aiorch_watch *w, int events)
{
    aiorch_loop *lp = w->lp;
    if (events == w->events && (events == 0 || w->active)) return 0; /* unchanged */
    if (lp->ev) {
        int ev = (events & AIORCH_READ ? EV_READ : 0) | (events & AIORCH_WRITE ? EV_WRITE : 0);
        ev_io_stop(lp->ev, &w->ev.io);
        w->active = w->events = 0;
        if (!ev) return 0;
        ev_io_set(&w->ev.io, w->fd, ev);
        ev_io_start(lp->ev, &w->ev.io);
    } else if (lp->host.io(lp->host.ud, w, w->fd, events, &w->slot) != 0) {
        w->active = w->events = 0;
        return -1;
    }
    w->events = events;
    w->active = events != 0;
    return 0;
}

void aiorch_watch_close(aiorch_watch *w)
{
    aiorch_loop *lp = w->lp;
    aiorch_watch_stop(w);
    if (!lp->ev && w->slot) lp->host.release(lp->host.ud, w->slot);
    w->slot = NULL;
}

double aiorch_loop_now(aiorch_loop *lp)
{
    struct timespec ts;
    if (lp->ev) {
        ev_now_update(lp->ev);
        return ev_now(lp->ev);
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void aiorch_loop_closing(aiorch_loop *lp, int fd)
{
    if (!lp->ev && lp->host.closing) lp->host.closing(lp->host.ud, fd);
}

unsigned aiorch_loop_iteration(const aiorch_loop *lp)
{
    return lp->ev ? ev_iteration(lp->ev) : lp->iter;
}

void aiorch_watch_ready(aiorch_watch *w, int events)
{
    aiorch_loop *lp = w->lp;
    if (!w->is_io) {
        if (!w->active) return; /* stopped meanwhile */
        if (!w->posted) lp->iter++;
        w->active = w->posted = 0;
        w->cb(w, AIORCH_TIMER);
        return;
    }
    lp->iter++;
    events &= w->events;
    if (events) w->cb(w, events);
}
