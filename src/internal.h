/* Shared by the runtime's C files; not part of the public API. */
#ifndef AIORCH_INTERNAL_H
#define AIORCH_INTERNAL_H

#include <ev.h>
#include <lua.h>
#include <lauxlib.h>
#include <pthread.h>
#include <stdint.h>

#include "aiorch.h"

typedef struct aiorch_task aiorch_task;
typedef struct aiorch_curl aiorch_curl;

/* What a waiting task is waiting on; cancel() undoes it and frees it. */
typedef struct aiorch_op {
    void (*cancel)(struct aiorch_op *op);
} aiorch_op;

struct aiorch_runtime {
    struct ev_loop *loop;
    int own_loop;
    lua_State *L;
    lua_State *S;            /* a scratch thread, never resumed */
    int S_ref;
    int own_L;               /* 0 when loaded as a C module into a host's state */
    aiorch_curl *curl;
    aiorch_task *current;    /* the task whose coroutine is running, or NULL */
    aiorch_task *ready_head; /* tasks to resume, in order */
    aiorch_task *ready_tail;
    aiorch_task *live;       /* every task not yet ended */
    long nlive;              /* how many */
    int gc_pause;            /* task.c: the GC pause to restore after a busy spell, or 0 */
    int draining;
    long budget;             /* instructions per resume */
    long used;
    uint64_t seq;            /* orders task completions */
    aiorch_task *main;       /* started by aiorch_runtime_start */
    int main_ended;
    int main_status;         /* its exit status */
    aiorch_error_fn on_error;
    void *error_ud;
    char error[512];
    char *root;
    char *user_path;
    void *servers;           /* server.c: open aiorch.server listeners */
    struct http_req *http_reqs; /* http.c: the requests in flight */
    /* task.c: the watchdog thread, which arms the budget hook on a long resume */
    pthread_t wd_thread;
    pthread_mutex_t wd_mu;
    pthread_cond_t wd_cv;
    int wd_state;            /* 0: not started, 1: running, -1: could not start */
    int wd_stop;
    lua_State *wd_co;        /* the coroutine being resumed, or NULL (under wd_mu) */
    lua_State *wd_armed;     /* the one the watchdog armed, or NULL (under wd_mu) */
    unsigned long wd_seq;    /* counts resumes (under wd_mu) */
    /* runtime.c: freed small Lua blocks kept for reuse, by size class */
    void *blocks[17];
    unsigned nblocks[17];
    int warn_on, warn_cont; /* runtime.c: Lua warnings (warn_cb) */
    /* job.c: the jobs of the C API */
    struct aiorch_job *jobs;                  /* every job not yet freed */
    struct aiorch_job *done_head, *done_tail; /* ended, their callbacks not yet called */
    size_t njobs;
    ev_check job_w;                           /* fed: runs new jobs, delivers ended ones */
    int closing;                              /* being freed: no new jobs */
    struct aiorch_poll *poll;                 /* loop.c: the loop thread of a pollable runtime */
    struct rclient *redis_clients;            /* redis.c: the open aiorch.redis clients */
};

/* The runtime of a Lua-visible function: upvalue 1 of every module function. */
#define aiorch_rt_of(L) ((aiorch_runtime *)lua_touserdata((L), lua_upvalueindex(1)))

/* runtime.c */
int aiorch_runtime_init(aiorch_runtime *rt, lua_State *L, const aiorch_options *opts);
void aiorch_runtime_teardown(aiorch_runtime *rt);
void aiorch_report(aiorch_runtime *rt, const char *fmt, ...);
double aiorch_now_ms(void);
void aiorch_alloc_trim(aiorch_runtime *rt); /* gives the kept blocks back to malloc */

/* task.c — the scheduler.
 * A yielding C function: t = aiorch_task_check(L, "name"); arm the event;
 * aiorch_task_wait(t, &op); return lua_yield(L, 0) (or lua_yieldk).
 * The event handler pushes its results onto t->co and calls
 * aiorch_task_wake(t, nresults); the coroutine resumes from the loop in
 * aiorch_sched_drain, never from inside the event handler. */
aiorch_task *aiorch_task_check(lua_State *L, const char *api); /* raises outside a task */
aiorch_task *aiorch_task_require(aiorch_runtime *rt, lua_State *L, const char *api); /* for methods */
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
void aiorch_task_cancel_all(aiorch_runtime *rt);
void aiorch_task_watchdog_stop(aiorch_runtime *rt); /* before the lua_State closes */
/* Each *_open adds its functions to the module table on top of L, with rt as
 * upvalue 1, and registers its metatables. */
void aiorch_task_open(aiorch_runtime *rt, lua_State *L);

/* curl_glue.c — curl multi driven by libev (evhiperfifo shape). */
typedef struct aiorch_transfer {
    void *easy; /* CURL * */
    /* Called after curl_multi_socket_action returned, never inside curl. */
    void (*done)(struct aiorch_transfer *tr, int curl_code);
} aiorch_transfer;
aiorch_curl *aiorch_curl_new(aiorch_runtime *rt);
void aiorch_curl_free(aiorch_curl *c);
int aiorch_curl_add(aiorch_curl *c, aiorch_transfer *tr);   /* CURLOPT_PRIVATE = tr */
void aiorch_curl_remove(aiorch_curl *c, aiorch_transfer *tr);
void *aiorch_curl_easy_get(aiorch_curl *c);                 /* pooled easy handle */
void aiorch_curl_easy_put(aiorch_curl *c, void *easy);

/* http.c */
void aiorch_http_open(aiorch_runtime *rt, lua_State *L);  /* adds module.http */

/* server.c */
void aiorch_server_open(aiorch_runtime *rt, lua_State *L); /* adds module.server */
void aiorch_server_close_all(aiorch_runtime *rt);

/* process.c */
void aiorch_process_open(aiorch_runtime *rt, lua_State *L); /* adds module.process, module.signal */

/* shm_lua.c */
void aiorch_shm_open(aiorch_runtime *rt, lua_State *L); /* adds module.shm */

/* redis.c */
void aiorch_redis_open(aiorch_runtime *rt, lua_State *L); /* adds module.redis */
void aiorch_redis_close_all(aiorch_runtime *rt);          /* their pending calls fail "closed" */

/* root.c: $AIORCH_ROOT, else where this file is installed, else the source tree. */
char *aiorch_root_find(void);

/* job.c */
void aiorch_job_init(aiorch_runtime *rt);
void aiorch_job_close_all(aiorch_runtime *rt, const char *why); /* each gets its outcome or "cancelled" */

/* loop.c — a pollable runtime: its loop waits in a thread of its own, every
 * callback runs on the host's thread in aiorch_runtime_step. The lock
 * guards the loop's data; without opts.pollable these are no-ops. */
int aiorch_loop_poll_start(aiorch_runtime *rt);
void aiorch_loop_poll_stop(aiorch_runtime *rt);
void aiorch_loop_lock(aiorch_runtime *rt);
void aiorch_loop_unlock(aiorch_runtime *rt);
void aiorch_loop_wake(aiorch_runtime *rt); /* after watchers changed outside a step */

/* module.c — builds the `aiorch` module table for this runtime. */
int aiorch_push_module(aiorch_runtime *rt, lua_State *L);
int aiorch_push_module_cached(lua_State *L); /* 0 (nothing pushed) before the first */

#endif
