/* A pollable runtime, for hosts on another event loop (libuv, nginx, ...).
 *
 * libev keeps its backend fd and its timer heap to itself, so the host
 * cannot wait on them directly. The runtime's loop waits in a thread of its
 * own instead, in the shape of libev's "thread locking example": the loop
 * thread holds the lock except while it blocks; when watchers are pending it
 * makes an eventfd readable and waits until the host's thread has invoked
 * them (aiorch_runtime_step). So Lua, curl and every callback run only on
 * the host's thread, and timers need nothing from the host. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "internal.h"

typedef struct aiorch_poll {
    struct ev_loop *loop;
    pthread_t thread;
    pthread_mutex_t mu; /* recursive: a callback may submit or cancel a job */
    pthread_cond_t invoked;
    ev_async wake;
    int efd;
    int stop;
} aiorch_poll;

/* ev_async: only wakes the loop thread, so that it sees new watchers. */
static void wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
}

/* ev_set_loop_release_cb: around the blocking poll, in the loop thread. */
static void release_cb(struct ev_loop *loop)
{
    aiorch_poll *p = ev_userdata(loop);
    pthread_mutex_unlock(&p->mu);
}

static void acquire_cb(struct ev_loop *loop)
{
    aiorch_poll *p = ev_userdata(loop);
    pthread_mutex_lock(&p->mu);
}

/* ev_set_invoke_pending_cb: in the loop thread, instead of invoking the
 * pending watchers, tells the host and waits until it has invoked them. */
static void invoke_cb(struct ev_loop *loop)
{
    aiorch_poll *p = ev_userdata(loop);
    uint64_t one = 1;
    while (ev_pending_count(loop) && !p->stop) {
        while (write(p->efd, &one, sizeof one) < 0 && errno == EINTR) {
        }
        pthread_cond_wait(&p->invoked, &p->mu);
    }
}

static void *loop_main(void *arg)
{
    aiorch_poll *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->stop)
        ev_run(p->loop, EVRUN_ONCE);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int aiorch_loop_poll_start(aiorch_runtime *rt)
{
    aiorch_poll *p = calloc(1, sizeof *p);
    pthread_mutexattr_t ma;
    if (!p) return -1;
    p->loop = rt->loop;
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) goto fail_fd;
    if (pthread_mutexattr_init(&ma)) goto fail_attr;
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    int bad = pthread_mutex_init(&p->mu, &ma);
    pthread_mutexattr_destroy(&ma);
    if (bad) goto fail_attr;
    if (pthread_cond_init(&p->invoked, NULL)) goto fail_cond;
    ev_async_init(&p->wake, wake_cb);
    ev_async_start(p->loop, &p->wake);
    ev_set_userdata(p->loop, p);
    ev_set_invoke_pending_cb(p->loop, invoke_cb);
    ev_set_loop_release_cb(p->loop, release_cb, acquire_cb);
    if (aiorch_thread_start(&p->thread, loop_main, p)) goto fail_thread;
    rt->poll = p;
    return 0;

fail_thread:
    ev_set_invoke_pending_cb(p->loop, ev_invoke_pending);
    ev_set_loop_release_cb(p->loop, NULL, NULL);
    ev_async_stop(p->loop, &p->wake);
    pthread_cond_destroy(&p->invoked);
fail_cond:
    pthread_mutex_destroy(&p->mu);
fail_attr:
    close(p->efd);
fail_fd:
    free(p);
    return -1;
}

/* Stops the loop thread; the host's thread owns the loop alone after it. */
void aiorch_loop_poll_stop(aiorch_runtime *rt)
{
    aiorch_poll *p = rt->poll;
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    ev_async_send(p->loop, &p->wake);
    pthread_cond_signal(&p->invoked);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->thread, NULL);
    ev_set_invoke_pending_cb(p->loop, ev_invoke_pending);
    ev_set_loop_release_cb(p->loop, NULL, NULL);
    ev_async_stop(p->loop, &p->wake);
    pthread_cond_destroy(&p->invoked);
    pthread_mutex_destroy(&p->mu);
    close(p->efd);
    free(p);
    rt->poll = NULL;
}

void aiorch_loop_lock(aiorch_runtime *rt)
{
    if (rt->poll) pthread_mutex_lock(&rt->poll->mu);
}

void aiorch_loop_unlock(aiorch_runtime *rt)
{
    if (rt->poll) pthread_mutex_unlock(&rt->poll->mu);
}

void aiorch_loop_wake(aiorch_runtime *rt)
{
    if (rt->poll) ev_async_send(rt->loop, &rt->poll->wake);
}

int aiorch_runtime_fd(aiorch_runtime *rt)
{
    return rt->poll ? rt->poll->efd : -1;
}

void aiorch_runtime_step(aiorch_runtime *rt)
{
    aiorch_poll *p = rt->poll;
    uint64_t n;
    if (!p) {
        if (rt->loop) ev_run(rt->loop, EVRUN_NOWAIT);
        return;
    }
    pthread_mutex_lock(&p->mu);
    while (read(p->efd, &n, sizeof n) < 0 && errno == EINTR) {
    }
    ev_invoke_pending(p->loop);
    pthread_cond_signal(&p->invoked);
    pthread_mutex_unlock(&p->mu);
}
