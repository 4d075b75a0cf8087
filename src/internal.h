/* Shared by the runtime's C files; not part of the public API.
 *
 * The files are layered: each uses only the layers below it, never one of
 * its own layer or above (tests/layers.sh checks the symbols each object
 * file takes from the others):
 *
 *   front      main.c (the CLI), lua_module.c (luaopen_aiorch); nginx/
 *              (the nginx module) through include/aiorch.h alone
 *   runtime    runtime.c: one instance, the public C API
 *   assembly   module.c (the `aiorch` table), job.c (the C API's jobs)
 *   Lua APIs   http.c (aiorch.http), process.c (aiorch.process, .signal),
 *              server.c (aiorch.server; the request object and response
 *              writer every host shares), shm_lua.c (aiorch.shm)
 *   scheduler  task.c (coroutine tasks, sleep, deadlines)
 *   glue       curl_glue.c (curl multi on the loop), server_conn.c (the
 *              HTTP/1.1 server's connections, limits, backpressure)
 *   mechanics  watch.c (the runtime's sockets and timers, on libev or a
 *              host's loop), http1.c (HTTP/1.1 on http-parser), sse.c,
 *              loop.c (a pollable runtime's loop thread), root.c, shm.c
 *              (a shared dictionary in memory several processes map)
 *   base       base.c: reports, the clock, Lua's allocator
 *
 * A lower layer that must reach a higher one takes a hook (curl_glue's
 * aiorch_curl_hooks, server_conn's srv_hooks). The struct below is the
 * runtime's data, which every layer may read. */
#ifndef AIORCH_INTERNAL_H
#define AIORCH_INTERNAL_H

#include <ev.h>
#include <lauxlib.h>
#include <lua.h>
#include <pthread.h>
#include <stdint.h>

#include "aiorch.h"
#include "watch.h"

typedef struct aiorch_task aiorch_task;
typedef struct aiorch_curl aiorch_curl;

/* What a waiting task is waiting on; cancel() undoes it and frees it. */
typedef struct aiorch_op {
    void (*cancel)(struct aiorch_op *op);
} aiorch_op;

struct aiorch_runtime {
    struct ev_loop *loop; /* NULL when a host's loop drives the runtime (opts.host) */
    int own_loop;
    aiorch_loop lp; /* watch.c: where the runtime's own sockets and timers wait */
    lua_State *L;
    lua_State *S; /* a scratch thread, never resumed */
    int S_ref;
    int own_L; /* 0 when loaded as a C module into a host's state */
    aiorch_curl *curl;
    aiorch_task *current;    /* the task whose coroutine is running, or NULL */
    aiorch_task *ready_head; /* tasks to resume, in order */
    aiorch_task *ready_tail;
    aiorch_task *live; /* every task not yet ended */
    long nlive;        /* how many */
    int gc_pause;      /* task.c: the GC pause to restore after a busy spell, or 0 */
    int draining;
    aiorch_watch soon_w; /* task.c: posted to run the ready tasks from the loop */
    long budget;         /* instructions per resume */
    long used;
    uint64_t seq;      /* orders task completions */
    aiorch_task *main; /* started by aiorch_runtime_start */
    int main_ended;
    int main_status; /* its exit status */
    aiorch_error_fn on_error;
    void *error_ud;
    char error[512];
    char *root;
    char *user_path;
    struct srv_lua *servers;           /* server.c: open aiorch.server listeners */
    struct aiorch_handler *handlers;   /* server.c: handlers loaded by a host */
    struct aiorch_exchange *exchanges; /* server.c: requests whose response is open */
    struct http_req *http_reqs;        /* http.c: the requests in flight */
    /* task.c: the watchdog thread, which arms the budget hook on a long resume */
    pthread_t wd_thread;
    pthread_mutex_t wd_mu;
    pthread_cond_t wd_cv;
    int wd_state; /* 0: not started, 1: running, -1: could not start */
    int wd_stop;
    lua_State *wd_co;     /* the coroutine being resumed, or NULL (under wd_mu) */
    lua_State *wd_armed;  /* the one the watchdog armed, or NULL (under wd_mu) */
    unsigned long wd_seq; /* counts resumes (under wd_mu) */
    /* base.c: freed small Lua blocks kept for reuse, by size class */
    void *blocks[17];
    size_t kept;            /* the bytes they hold */
    int warn_on, warn_cont; /* runtime.c: Lua warnings (warn_cb) */
    /* job.c: the jobs of the C API */
    struct aiorch_job *jobs;                  /* every job not yet freed */
    struct aiorch_job *done_head, *done_tail; /* ended, their callbacks not yet called */
    size_t njobs;
    aiorch_watch job_w;            /* posted: runs new jobs, delivers ended ones */
    int closing;                   /* being freed: no new jobs */
    struct aiorch_poll *poll;      /* loop.c: the loop thread of a pollable runtime */
    struct rclient *redis_clients; /* redis.c: the open aiorch.redis clients */
};

/* The runtime of a Lua-visible function: upvalue 1 of every module function. */
#define aiorch_rt_of(L) ((aiorch_runtime *)lua_touserdata((L), lua_upvalueindex(1)))

/* ---- base (base.c) ---- */
void aiorch_report(aiorch_runtime *rt, const char *fmt, ...);
double aiorch_now_ms(void);
void *aiorch_lua_alloc(void *ud, void *ptr, size_t osize, size_t nsize); /* ud: the runtime */
void aiorch_alloc_trim(aiorch_runtime *rt); /* gives the kept blocks back to malloc */
int aiorch_thread_start(pthread_t *t, void *(*fn)(void *), void *arg); /* signals blocked */

/* ---- mechanics ---- */

/* root.c: $AIORCH_ROOT, else where this file is installed, else the source tree. */
char *aiorch_root_find(void);

/* loop.c: a pollable runtime: its loop waits in a thread of its own, every
 * callback runs on the host's thread in aiorch_runtime_step. The lock
 * guards the loop's data; without opts.pollable these are no-ops. */
int aiorch_loop_poll_start(aiorch_runtime *rt);
void aiorch_loop_poll_stop(aiorch_runtime *rt);
void aiorch_loop_lock(aiorch_runtime *rt);
void aiorch_loop_unlock(aiorch_runtime *rt);
void aiorch_loop_wake(aiorch_runtime *rt); /* after watchers changed outside a step */

/* watch.c (watch.h), http1.c (http1.h) and sse.c (sse.h) have headers of their own. */

/* ---- glue ---- */

/* curl_glue.c: curl multi driven by libev (evhiperfifo shape). */
typedef struct aiorch_transfer {
    void *easy; /* CURL * */
    /* Called after curl_multi_socket_action returned, never inside curl. */
    void (*done)(struct aiorch_transfer *tr, int curl_code);
} aiorch_transfer;
typedef struct aiorch_curl_hooks {
    void (*after)(void *ud); /* after each batch of curl events: run what they made ready */
    void (*quiet)(void *ud); /* no transfer for a while: give memory back */
    void *ud;
} aiorch_curl_hooks;
aiorch_curl *aiorch_curl_new(aiorch_loop *lp, const aiorch_curl_hooks *hooks);
void aiorch_curl_free(aiorch_curl *c);
int aiorch_curl_add(aiorch_curl *c, aiorch_transfer *tr); /* CURLOPT_PRIVATE = tr */
void aiorch_curl_remove(aiorch_curl *c, aiorch_transfer *tr);
void *aiorch_curl_easy_get(aiorch_curl *c); /* pooled easy handle */
void aiorch_curl_easy_put(aiorch_curl *c, void *easy);

/* server_conn.c has a header of its own (server_conn.h). */

/* ---- scheduler (task.c) ----
 * A yielding C function: t = aiorch_task_check(L, "name"); arm the event;
 * aiorch_task_wait(t, &op); return lua_yield(L, 0) (or lua_yieldk).
 * The event handler pushes its results onto t->co and calls
 * aiorch_task_wake(t, nresults); the coroutine resumes from the loop in
 * aiorch_sched_drain, never from inside the event handler. */
aiorch_task *aiorch_task_check(lua_State *L, const char *api); /* raises outside a task */
aiorch_task *aiorch_task_require(aiorch_runtime *rt, lua_State *L,
                                 const char *api);                  /* for methods */
aiorch_task *aiorch_task_current(aiorch_runtime *rt, lua_State *L); /* NULL outside */
lua_State *aiorch_task_thread(aiorch_task *t);
void aiorch_task_wait(aiorch_task *t, aiorch_op *op);
void aiorch_task_wake(aiorch_task *t, int nargs);
/* Pops a function and nargs arguments from L and starts them as a task
 * (queued, run at the next drain). Pushes the task userdata. */
aiorch_task *aiorch_task_spawn(aiorch_runtime *rt, lua_State *L, int nargs);
/* Cancels a task and its children; returns 0 if it had already ended. */
int aiorch_task_cancel(aiorch_task *t);
int aiorch_task_ended(aiorch_task *t);
void aiorch_sched_drain(aiorch_runtime *rt);
/* Drains from the loop, soon: for work queued outside the loop's callbacks. */
void aiorch_sched_soon(aiorch_runtime *rt);
void aiorch_sched_init(aiorch_runtime *rt);
void aiorch_sched_close(aiorch_runtime *rt);
void aiorch_task_cancel_all(aiorch_runtime *rt);
void aiorch_task_watchdog_stop(aiorch_runtime *rt); /* before the lua_State closes */
/* Each *_open adds its functions to the module table on top of L, with rt as
 * upvalue 1, and registers its metatables. */
void aiorch_task_open(aiorch_runtime *rt, lua_State *L);

/* ---- Lua APIs ---- */

/* http.c */
void aiorch_http_open(aiorch_runtime *rt, lua_State *L); /* adds module.http */

/* server.c */
void aiorch_server_open(aiorch_runtime *rt, lua_State *L); /* adds module.server */
void aiorch_server_close_all(aiorch_runtime *rt);          /* listeners, open exchanges, handlers */

/* process.c */
void aiorch_process_open(aiorch_runtime *rt, lua_State *L); /* adds module.process, module.signal */

/* shm_lua.c */
void aiorch_shm_open(aiorch_runtime *rt, lua_State *L); /* adds module.shm */

/* redis.c */
void aiorch_redis_open(aiorch_runtime *rt, lua_State *L); /* adds module.redis */
void aiorch_redis_close_all(aiorch_runtime *rt);          /* their pending calls fail "closed" */

/* ---- assembly ---- */

/* job.c */
void aiorch_job_init(aiorch_runtime *rt);
void aiorch_job_close_all(aiorch_runtime *rt,
                          const char *why); /* each gets its outcome or "cancelled" */

/* module.c: builds the `aiorch` module table for this runtime. */
int aiorch_push_module(aiorch_runtime *rt, lua_State *L);
int aiorch_push_module_cached(lua_State *L); /* 0 (nothing pushed) before the first */

/* ---- runtime (runtime.c) ---- */
int aiorch_runtime_init(aiorch_runtime *rt, lua_State *L, const aiorch_options *opts);
void aiorch_runtime_teardown(aiorch_runtime *rt);

#endif
