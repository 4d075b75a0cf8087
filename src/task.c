/* Tasks: Lua coroutines resumed from the loop (spawn, await, gather, first,
 * cancel). A task's pending operation lives in t->op; completions only
 * queue the task, and aiorch_sched_drain resumes it. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define TASK_MT "aiorch.task"

enum {
    T_READY,   /* queued to run */
    T_RUNNING, /* its coroutine is on the C stack */
    T_WAITING, /* yielded on t->op */
    T_DONE,
    T_FAILED,
    T_CANCELLED,
};

static const char *const state_names[] = {"pending", "running", "waiting",
                                          "done",    "failed",  "cancelled"};

typedef struct waitnode waitnode;
typedef struct waitset waitset;

struct aiorch_task {
    aiorch_runtime *rt;
    lua_State *co;
    int co_ref;   /* anchors the thread while the task lives */
    int self_ref; /* anchors the userdata while the task lives */
    int state;
    int nargs; /* values on co's stack to resume with */
    int started;
    int queued;
    int cancel_requested;
    int timed_out;   /* the last wait ended by its deadline */
    int retrieved;   /* someone looked at the outcome */
    int timer_sleep; /* the timer is a sleep, not a wait deadline */
    uint64_t done_seq;
    aiorch_op *op;
    aiorch_task *ready_prev, *ready_next;
    aiorch_task *live_prev, *live_next;
    aiorch_task *parent, *children, *sib_prev, *sib_next;
    waitnode *waiters;  /* waitsets watching this task */
    waitset *ws;        /* the waitset this task waits on */
    aiorch_watch timer; /* sleep, or the deadline of a wait */
    aiorch_op sleep_op;
};

struct waitnode {
    waitset *ws;
    aiorch_task *task;
    waitnode *prev, *next;
};

/* A task waiting for one (ANY) or all (ALL) of a set of tasks. */
struct waitset {
    aiorch_op op;
    aiorch_task *owner;
    int any;
    int remaining;
    int n;
    waitnode nodes[];
};

/* ---- the ready queue ---- */

static void ready_push(aiorch_task *t)
{
    aiorch_runtime *rt = t->rt;
    if (t->queued) return;
    t->queued = 1;
    t->ready_next = NULL;
    t->ready_prev = rt->ready_tail;
    if (rt->ready_tail)
        rt->ready_tail->ready_next = t;
    else
        rt->ready_head = t;
    rt->ready_tail = t;
}

static void ready_remove(aiorch_task *t)
{
    aiorch_runtime *rt = t->rt;
    if (!t->queued) return;
    t->queued = 0;
    if (t->ready_prev)
        t->ready_prev->ready_next = t->ready_next;
    else
        rt->ready_head = t->ready_next;
    if (t->ready_next)
        t->ready_next->ready_prev = t->ready_prev;
    else
        rt->ready_tail = t->ready_prev;
    t->ready_prev = t->ready_next = NULL;
}

static int ended(const aiorch_task *t)
{
    return t->state >= T_DONE;
}

int aiorch_task_ended(aiorch_task *t)
{
    return ended(t);
}

lua_State *aiorch_task_thread(aiorch_task *t)
{
    return t->co;
}

aiorch_task *aiorch_task_current(aiorch_runtime *rt, lua_State *L)
{
    aiorch_task *t = rt->current;
    return (t && t->co == L) ? t : NULL;
}

aiorch_task *aiorch_task_check(lua_State *L, const char *api)
{
    return aiorch_task_require(aiorch_rt_of(L), L, api);
}

aiorch_task *aiorch_task_require(aiorch_runtime *rt, lua_State *L, const char *api)
{
    aiorch_task *t = aiorch_task_current(rt, L);
    if (!t)
        luaL_error(L, "%s: must be called from an aiorch task (see aiorch.run / aiorch.spawn)",
                   api);
    return t;
}

void aiorch_task_wait(aiorch_task *t, aiorch_op *op)
{
    t->op = op;
    t->state = T_WAITING;
}

void aiorch_task_wake(aiorch_task *t, int nargs)
{
    if (ended(t)) return;
    t->op = NULL;
    t->nargs = nargs;
    if (t->state == T_WAITING) t->state = T_READY;
    ready_push(t);
}

/* ---- the instruction budget ---- */

static char budget_key;
static char debug_key;   /* a boolean: aiorch.debug() */
static char stopped_key; /* weak table: thread -> the message it was stopped with */

#define HOOK_COUNT 1000 /* instructions between two calls of the hook */

/* lua_Hook on a count: stops a task that runs too long without yielding. */
static void budget_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &budget_key);
    aiorch_runtime *rt = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (!rt || !rt->current) return;
    rt->used += HOOK_COUNT;
    if (rt->used <= rt->budget) return;
    /* Stopped already (a pcall caught it): the same message again, naming
     * where the loop ran rather than where the pcall sits. */
    lua_rawgetp(L, LUA_REGISTRYINDEX, &stopped_key);
    if (lua_gethookcount(L) == 1) {
        lua_pushthread(L);
        if (lua_rawget(L, -2) == LUA_TSTRING) lua_error(L);
        lua_pop(L, 1);
    }
    /* Fire on every instruction from now on, so pcall cannot swallow it. */
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1);
    luaL_where(L, 0); /* level 0 in a hook: the function that ran too long */
    lua_pushfstring(L, "instruction budget exceeded (%I instructions without yielding)",
                    (lua_Integer)rt->budget);
    lua_concat(L, 2);
    lua_pushthread(L);
    lua_pushvalue(L, -2);
    lua_rawset(L, -4);
    lua_error(L);
}

/* A count hook makes Lua stop at every instruction (~15% of the gateway's
 * CPU), so a task runs without one until a resume has lasted WATCH_NS: a
 * thread then arms it. lua_sethook may be called asynchronously (Lua's own
 * interpreter arms its hook from a signal handler); wd_mu keeps the
 * coroutine alive meanwhile. The budget counts from the arming. */
#define WATCH_NS 50000000L
#define IDLE_WATCH_NS 1000000000L /* after a period without a resume: few wake-ups when idle */

static void arm(lua_State *co)
{
    lua_sethook(co, budget_hook, LUA_MASKCOUNT, HOOK_COUNT);
}

static void *watchdog(void *arg)
{
    aiorch_runtime *rt = arg;
    unsigned long seen = 0;
    long period = WATCH_NS;
    struct timespec ts;

    pthread_mutex_lock(&rt->wd_mu);
    while (!rt->wd_stop) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += period / 1000000000L;
        ts.tv_nsec += period % 1000000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&rt->wd_cv, &rt->wd_mu, &ts);
        /* the same resume is still running a whole period later */
        if (rt->wd_co && rt->wd_seq == seen && !rt->wd_armed) {
            arm(rt->wd_co);
            rt->wd_armed = rt->wd_co;
        }
        /* Nothing ran for a whole period: look less often. A resume that
         * begins meanwhile is armed at most IDLE_WATCH_NS + WATCH_NS late. */
        period = !rt->wd_co && rt->wd_seq == seen ? IDLE_WATCH_NS : WATCH_NS;
        seen = rt->wd_seq;
    }
    pthread_mutex_unlock(&rt->wd_mu);
    return NULL;
}

static int watchdog_start(aiorch_runtime *rt)
{
    pthread_condattr_t ca;
    int ok;

    if (rt->wd_state) return rt->wd_state > 0;
    rt->wd_state = -1;
    if (pthread_condattr_init(&ca)) return 0;
    ok = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0 &&
         pthread_cond_init(&rt->wd_cv, &ca) == 0;
    pthread_condattr_destroy(&ca);
    if (!ok) return 0;
    if (pthread_mutex_init(&rt->wd_mu, NULL)) {
        pthread_cond_destroy(&rt->wd_cv);
        return 0;
    }
    rt->wd_stop = 0;
    if (aiorch_thread_start(&rt->wd_thread, watchdog, rt)) {
        pthread_mutex_destroy(&rt->wd_mu);
        pthread_cond_destroy(&rt->wd_cv);
        return 0;
    }
    rt->wd_state = 1;
    return 1;
}

void aiorch_task_watchdog_stop(aiorch_runtime *rt)
{
    if (rt->wd_state <= 0) return;
    pthread_mutex_lock(&rt->wd_mu);
    rt->wd_stop = 1;
    pthread_cond_signal(&rt->wd_cv);
    pthread_mutex_unlock(&rt->wd_mu);
    pthread_join(rt->wd_thread, NULL);
    pthread_mutex_destroy(&rt->wd_mu);
    pthread_cond_destroy(&rt->wd_cv);
    rt->wd_state = 0;
}

static lua_State *watch_begin(aiorch_runtime *rt, lua_State *co)
{
    lua_State *prev;
    if (rt->wd_state <= 0) return NULL;
    pthread_mutex_lock(&rt->wd_mu);
    prev = rt->wd_co;
    rt->wd_co = co;
    rt->wd_seq++;
    pthread_mutex_unlock(&rt->wd_mu);
    return prev;
}

static void watch_end(aiorch_runtime *rt, lua_State *co, lua_State *prev)
{
    if (rt->wd_state <= 0) return;
    pthread_mutex_lock(&rt->wd_mu);
    if (rt->wd_armed == co) {
        lua_sethook(co, NULL, 0, 0);
        rt->wd_armed = NULL;
    }
    rt->wd_co = prev;
    rt->wd_seq++;
    pthread_mutex_unlock(&rt->wd_mu);
}

/* coroutine.create and coroutine.wrap: a coroutine made inside a task
 * carries the hook from the start, since the watchdog arms only the
 * task's own. Upvalues: rt, the original function. */
static int co_make(lua_State *L)
{
    aiorch_runtime *rt = lua_touserdata(L, lua_upvalueindex(1));
    lua_State *co;

    lua_pushvalue(L, lua_upvalueindex(2));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    if (!rt->current || lua_gettop(L) < 1) return lua_gettop(L);
    co = lua_tothread(L, 1);
    if (!co && lua_tocfunction(L, 1) && lua_getupvalue(L, 1, 1)) { /* wrap's: the coroutine */
        co = lua_tothread(L, -1);
        lua_pop(L, 1);
    }
    if (co) arm(co);
    return lua_gettop(L);
}

static void co_wrap_make(aiorch_runtime *rt, lua_State *L)
{
    static const char *const names[] = {"create", "wrap"};
    size_t i;
    if (lua_getglobal(L, "coroutine") != LUA_TTABLE) {
        lua_pop(L, 1);
        return;
    }
    for (i = 0; i < 2; i++) {
        if (lua_getfield(L, -1, names[i]) != LUA_TFUNCTION || lua_tocfunction(L, -1) == co_make) {
            lua_pop(L, 1);
            continue;
        }
        lua_pushlightuserdata(L, rt);
        lua_insert(L, -2);
        lua_pushcclosure(L, co_make, 2);
        lua_setfield(L, -2, names[i]);
    }
    lua_pop(L, 1);
}

/* ---- the collector under load ---- */

/* Lua's heap peaks at the GC pause times the live heap. With thousands of
 * tasks in flight (long streams) memory is what runs out first, so the
 * collector starts earlier then; with few it keeps the runtime's pause,
 * which costs less CPU per request. Only in a state of our own. */
#define BUSY_TASKS 1024
#define BUSY_PAUSE 120 /* percent */

static void gc_load(aiorch_runtime *rt)
{
#ifdef LUA_GCSETPAUSE /* Lua 5.4; the pause alone, leaving the mode as it is */
    if (!rt->own_L) return;
    /* lua_gc refuses (-1) inside a finalizer: tried again at the next task */
    if (!rt->gc_pause && rt->nlive >= BUSY_TASKS) {
        int prev = lua_gc(rt->L, LUA_GCSETPAUSE, BUSY_PAUSE);
        if (prev > 0) rt->gc_pause = prev;
    } else if (rt->gc_pause && rt->nlive <= BUSY_TASKS / 2) {
        if (lua_gc(rt->L, LUA_GCSETPAUSE, rt->gc_pause) >= 0) rt->gc_pause = 0;
    }
#else
    (void)rt;
#endif
}

/* ---- ending a task ---- */

static void waitset_free(waitset *ws);
static void waitset_fire(waitset *ws);
static void task_timer_cb(aiorch_watch *w, int events);

static void push_self(aiorch_task *t, lua_State *S)
{
    lua_rawgeti(S, LUA_REGISTRYINDEX, t->self_ref);
}

/* Stores the outcome table as the task's user value. Expects it on S. */
static void store_outcome(aiorch_task *t, lua_State *S)
{
    push_self(t, S);
    lua_insert(S, -2);
    lua_setiuservalue(S, -2, 1);
    lua_pop(S, 1);
}

static void unlink_child(aiorch_task *t)
{
    if (!t->parent) return;
    if (t->sib_prev)
        t->sib_prev->sib_next = t->sib_next;
    else
        t->parent->children = t->sib_next;
    if (t->sib_next) t->sib_next->sib_prev = t->sib_prev;
    t->parent = t->sib_prev = t->sib_next = NULL;
}

static void finish(aiorch_task *t, int state)
{
    aiorch_runtime *rt = t->rt;
    t->state = state;
    t->done_seq = ++rt->seq;
    t->op = NULL;
    ready_remove(t);
    aiorch_watch_close(&t->timer);
    unlink_child(t);
    while (t->children)
        unlink_child(t->children);
    if (t->live_prev)
        t->live_prev->live_next = t->live_next;
    else
        rt->live = t->live_next;
    if (t->live_next) t->live_next->live_prev = t->live_prev;
    t->live_prev = t->live_next = NULL;
    rt->nlive--;
    gc_load(rt);

    /* Wake whoever waits on it (before the anchor goes: they hold it too). */
    while (t->waiters) {
        waitnode *n = t->waiters;
        waitset *ws = n->ws;
        t->waiters = n->next;
        if (t->waiters) t->waiters->prev = NULL;
        n->task = NULL;
        n->prev = n->next = NULL;
        if (ws->any || --ws->remaining == 0) waitset_fire(ws);
    }
    if (rt->main == t) {
        rt->main = NULL;
        rt->main_ended = 1;
    }
    luaL_unref(rt->S, LUA_REGISTRYINDEX, t->co_ref);
    t->co_ref = LUA_NOREF;
    t->co = NULL;
    luaL_unref(rt->S, LUA_REGISTRYINDEX, t->self_ref);
    t->self_ref = LUA_NOREF;
}

static void finish_ok(aiorch_task *t, int nres)
{
    lua_State *S = t->rt->S;
    luaL_checkstack(S, nres + 4, "too many results");
    lua_xmove(t->co, S, nres);
    lua_createtable(S, nres, 1);
    lua_insert(S, -(nres + 1));
    for (int i = nres; i >= 1; i--)
        lua_rawseti(S, -1 - i, i);
    lua_pushinteger(S, nres);
    lua_setfield(S, -2, "n");
    if (t->rt->main == t) {
        lua_rawgeti(S, -1, 1);
        int isint = 0;
        lua_Integer code = lua_tointegerx(S, -1, &isint);
        t->rt->main_status = isint ? (int)code : (lua_toboolean(S, -1) || lua_isnil(S, -1)) ? 0 : 1;
        lua_pop(S, 1);
    }
    store_outcome(t, S);
    finish(t, T_DONE);
}

static int tostring_call(lua_State *L)
{
    luaL_tolstring(L, 1, NULL);
    return 1;
}

/* Replaces the error value on top of S with a message: await returns a
 * string, always. A __tostring runs protected; it may itself fail. */
static const char *error_message(lua_State *S)
{
    int t = lua_type(S, -1), printable = t == LUA_TNUMBER;
    if (t == LUA_TSTRING) return lua_tostring(S, -1);
    if (!printable && luaL_getmetafield(S, -1, "__tostring") != LUA_TNIL) {
        lua_pop(S, 1);
        printable = 1;
    }
    if (printable) {
        lua_pushcfunction(S, tostring_call);
        lua_pushvalue(S, -2);
        if (lua_pcall(S, 1, 1, 0) == LUA_OK && lua_type(S, -1) == LUA_TSTRING) {
            lua_remove(S, -2);
            return lua_tostring(S, -1);
        }
        lua_pop(S, 1);
    }
    lua_pushfstring(S, "(error object is a %s value)", luaL_typename(S, -1));
    lua_remove(S, -2);
    return lua_tostring(S, -1);
}

static void finish_error(aiorch_task *t)
{
    aiorch_runtime *rt = t->rt;
    lua_State *S = rt->S;
    lua_xmove(t->co, S, 1);
    const char *msg = error_message(S);
    lua_createtable(S, 0, 2);
    lua_insert(S, -2);
    if (rt->main == t) {
        rt->main_status = 1;
        snprintf(rt->error, sizeof rt->error, "%s", msg);
        t->retrieved = 1;
    }
    /* Only a report in debug mode shows it (t_gc). */
    if (lua_rawgetp(S, LUA_REGISTRYINDEX, &debug_key) == LUA_TBOOLEAN && lua_toboolean(S, -1)) {
        luaL_traceback(S, t->co, msg, 0);
        lua_setfield(S, -4, "traceback");
    }
    lua_pop(S, 1);
    lua_setfield(S, -2, "error");
    store_outcome(t, S);
    finish(t, T_FAILED);
}

/* ---- running tasks ---- */

static void resume(aiorch_task *t)
{
    aiorch_runtime *rt = t->rt;
    int nres = 0, status;
    aiorch_task *prev = rt->current;
    lua_State *prev_co;
    ready_remove(t);
    t->state = T_RUNNING;
    t->started = 1;
    rt->current = t;
    rt->used = 0;
    prev_co = watch_begin(rt, t->co);
    status = lua_resume(t->co, rt->S, t->nargs, &nres);
    watch_end(rt, t->co, prev_co);
    rt->current = prev;
    t->nargs = 0;
    if (status == LUA_YIELD) {
        lua_pop(t->co, nres);
        if (t->cancel_requested) {
            aiorch_task_cancel(t);
        } else if (t->state == T_RUNNING) {
            /* A bare coroutine.yield(): let the others run, then go on. */
            t->state = T_READY;
            ready_push(t);
        }
    } else if (status == LUA_OK) {
        finish_ok(t, nres);
    } else {
        finish_error(t);
    }
}

void aiorch_sched_drain(aiorch_runtime *rt)
{
    if (rt->draining) return;
    rt->draining = 1;
    while (rt->ready_head)
        resume(rt->ready_head);
    rt->draining = 0;
}

/* posted: runs the tasks queued outside the loop's own callbacks (by a
 * host's call). */
static void soon_cb(aiorch_watch *w, int events)
{
    (void)events;
    aiorch_sched_drain(w->data);
}

void aiorch_sched_init(aiorch_runtime *rt)
{
    aiorch_watch_timer_init(&rt->soon_w, &rt->lp, soon_cb, rt, 0);
}

void aiorch_sched_soon(aiorch_runtime *rt)
{
    if (!aiorch_watch_active(&rt->soon_w)) aiorch_watch_post(&rt->soon_w);
    aiorch_loop_wake(rt);
}

void aiorch_sched_close(aiorch_runtime *rt)
{
    aiorch_watch_close(&rt->soon_w);
}

static aiorch_task *check_task(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, TASK_MT);
}

aiorch_task *aiorch_task_spawn(aiorch_runtime *rt, lua_State *L, int nargs)
{
    luaL_checktype(L, -(nargs + 1), LUA_TFUNCTION);
    aiorch_task *t = lua_newuserdatauv(L, sizeof *t, 1);
    memset(t, 0, sizeof *t);
    t->rt = rt;
    t->co_ref = t->self_ref = LUA_NOREF;
    luaL_setmetatable(L, TASK_MT);
    lua_insert(L, -(nargs + 2)); /* task fn args... */
    t->co = lua_newthread(L);
    if (!watchdog_start(rt)) arm(t->co); /* no thread: hooked all along */
    lua_insert(L, -(nargs + 2));         /* task thread fn args... */
    lua_xmove(L, t->co, nargs + 1);      /* task thread */
    t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    t->nargs = nargs;
    t->state = T_READY;
    aiorch_watch_timer_init(&t->timer, &rt->lp, task_timer_cb, t, 0);

    t->live_next = rt->live;
    if (rt->live) rt->live->live_prev = t;
    rt->live = t;
    rt->nlive++;
    gc_load(rt);
    if (rt->current) {
        t->parent = rt->current;
        t->sib_next = rt->current->children;
        if (t->sib_next) t->sib_next->sib_prev = t;
        rt->current->children = t;
    }
    ready_push(t);
    return t;
}

int aiorch_task_cancel(aiorch_task *t)
{
    if (ended(t)) return 0;
    if (t->state == T_RUNNING) {
        /* It is on the C stack: stop it at its next yield. */
        t->cancel_requested = 1;
        return 1;
    }
    t->state = T_CANCELLED; /* no wakes from here on */
    /* Its pending operation first: it may be a wait on one of the children,
     * which that child's end below would free under us. */
    if (t->op) {
        aiorch_op *op = t->op;
        t->op = NULL;
        op->cancel(op);
    }
    while (t->children) {
        aiorch_task *c = t->children;
        unlink_child(c);
        aiorch_task_cancel(c);
    }
    ready_remove(t);
    if (t->started) {
        /* Closes its to-be-closed variables; errors there are dropped. */
#if LUA_VERSION_RELEASE_NUM >= 50406
        lua_closethread(t->co, t->rt->S);
#else
        lua_resetthread(t->co);
#endif
    }
    lua_State *S = t->rt->S;
    lua_createtable(S, 0, 1);
    lua_pushboolean(S, 1);
    lua_setfield(S, -2, "cancelled");
    store_outcome(t, S);
    if (t->rt->main == t) t->rt->main_status = 1;
    finish(t, T_CANCELLED);
    return 1;
}

void aiorch_task_cancel_all(aiorch_runtime *rt)
{
    while (rt->live) {
        aiorch_task *t = rt->live;
        if (t->state == T_RUNNING) t->state = T_WAITING; /* runtime teardown */
        aiorch_task_cancel(t);
    }
}

/* ---- outcomes ---- */

/* Pushes what await returns for an ended task at idx. */
static int push_results(lua_State *L, int idx, aiorch_task *t)
{
    t->retrieved = 1;
    lua_getiuservalue(L, idx, 1);
    if (t->state == T_DONE) {
        int n = (int)(lua_getfield(L, -1, "n"), lua_tointeger(L, -1));
        lua_pop(L, 1);
        luaL_checkstack(L, n, "too many results");
        for (int i = 1; i <= n; i++)
            lua_rawgeti(L, -i, i);
        lua_remove(L, -(n + 1));
        return n;
    }
    lua_pushnil(L);
    if (t->state == T_FAILED) {
        lua_pushliteral(L, "error");
        lua_getfield(L, -3, "error");
    } else {
        lua_pushliteral(L, "cancelled");
        lua_pushliteral(L, "cancelled");
    }
    lua_remove(L, -4);
    return 3;
}

/* ---- waitsets ---- */

static void waitset_detach(waitset *ws)
{
    for (int i = 0; i < ws->n; i++) {
        waitnode *n = &ws->nodes[i];
        if (!n->task) continue;
        if (n->prev)
            n->prev->next = n->next;
        else
            n->task->waiters = n->next;
        if (n->next) n->next->prev = n->prev;
        n->task = NULL;
    }
}

static void waitset_free(waitset *ws)
{
    aiorch_task *owner = ws->owner;
    waitset_detach(ws);
    aiorch_watch_stop(&owner->timer);
    owner->ws = NULL;
    free(ws);
}

static void waitset_fire(waitset *ws)
{
    aiorch_task *owner = ws->owner;
    waitset_free(ws);
    aiorch_task_wake(owner, 0);
}

static void waitset_cancel(aiorch_op *op)
{
    waitset_free((waitset *)op);
}

/* timer: the deadline of a wait, or the end of a sleep */
static void task_timer_cb(aiorch_watch *w, int events)
{
    (void)events;
    aiorch_task *t = w->data;
    aiorch_runtime *rt = t->rt;
    if (t->timer_sleep) {
        aiorch_task_wake(t, 0);
    } else if (t->ws) {
        t->timed_out = 1;
        waitset_fire(t->ws);
    }
    aiorch_sched_drain(rt);
}

static void arm_timer(aiorch_task *t, double ms, int sleep)
{
    t->timer_sleep = sleep;
    aiorch_watch_start(&t->timer, ms < 0 ? 0 : ms / 1000.0);
}

/* Makes self wait for any or all of the listed tasks, with an optional deadline. */
static void wait_on(lua_State *L, aiorch_task *self, aiorch_task **list, int n, int any,
                    double timeout_ms)
{
    waitset *ws = malloc(sizeof *ws + (size_t)n * sizeof(waitnode));
    if (!ws) luaL_error(L, "out of memory");
    ws->op.cancel = waitset_cancel;
    ws->owner = self;
    ws->any = any;
    ws->remaining = n;
    ws->n = n;
    for (int i = 0; i < n; i++) {
        waitnode *node = &ws->nodes[i];
        node->ws = ws;
        node->task = list[i];
        node->prev = NULL;
        node->next = list[i]->waiters;
        if (node->next) node->next->prev = node;
        list[i]->waiters = node;
    }
    self->ws = ws;
    self->timed_out = 0;
    if (timeout_ms >= 0) arm_timer(self, timeout_ms, 0);
    aiorch_task_wait(self, &ws->op);
}

static double opt_timeout(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx)) return -1;
    double ms = luaL_checknumber(L, idx);
    luaL_argcheck(L, ms >= 0, idx, "timeout must be >= 0 ms");
    return ms;
}

/* ---- Lua API ---- */

/* A thread's stack grows by doubling from Lua's 40 slots; a task known to
 * run deep code (a gateway request: about 300) can start with the slots it
 * needs, instead of allocating and copying the stack three times on the way. */
#define SPAWN_STACK_MAX 4096 /* slots: 64 KiB */

/* aiorch.spawn([opts,] fn, ...); opts.stack: the slots the task starts with */
static int l_spawn(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    lua_Integer stack = 0;
    if (lua_type(L, 1) == LUA_TTABLE) {
        lua_getfield(L, 1, "stack");
        stack = luaL_optinteger(L, -1, 0);
        luaL_argcheck(L, stack >= 0 && stack <= SPAWN_STACK_MAX, 1, "opts.stack must be 0 to 4096");
        lua_pop(L, 1);
        lua_remove(L, 1);
    }
    luaL_checktype(L, 1, LUA_TFUNCTION);
    aiorch_task *t = aiorch_task_spawn(rt, L, lua_gettop(L) - 1);
    if (stack > 0) lua_checkstack(t->co, (int)stack);
    return 1;
}

static int await_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    aiorch_task *self = aiorch_task_require(check_task(L, 1)->rt, L, "task:await");
    if (self->timed_out) {
        self->timed_out = 0;
        lua_pushnil(L);
        lua_pushliteral(L, "timeout");
        lua_pushliteral(L, "timeout");
        return 3;
    }
    return push_results(L, 1, check_task(L, 1));
}

static int t_await(lua_State *L)
{
    aiorch_task *t = check_task(L, 1);
    double timeout = opt_timeout(L, 2);
    lua_settop(L, 2);
    if (ended(t)) return push_results(L, 1, t);
    aiorch_task *self = aiorch_task_require(t->rt, L, "task:await");
    if (self == t) return luaL_error(L, "task:await: a task cannot await itself");
    wait_on(L, self, &t, 1, 0, timeout);
    return lua_yieldk(L, 0, 0, await_k);
}

static int t_cancel(lua_State *L)
{
    lua_pushboolean(L, aiorch_task_cancel(check_task(L, 1)));
    return 1;
}

static int t_status(lua_State *L)
{
    aiorch_task *t = check_task(L, 1);
    lua_pushstring(L, state_names[t->state]);
    return 1;
}

static int t_tostring(lua_State *L)
{
    aiorch_task *t = check_task(L, 1);
    lua_pushfstring(L, "aiorch.task (%s): %p", state_names[t->state], (void *)t);
    return 1;
}

/* __gc: reports an error that nobody looked at, on one line (with the
 * traceback in debug mode); cancels at lua_close. */
static int t_gc(lua_State *L)
{
    aiorch_task *t = check_task(L, 1);
    if (!ended(t)) {
        aiorch_task_cancel(t);
    } else if (t->state == T_FAILED && !t->retrieved) {
        lua_getiuservalue(L, 1, 1);
        if (lua_getfield(L, -1, "traceback") != LUA_TSTRING) {
            lua_pop(L, 1);
            lua_getfield(L, -1, "error");
        }
        aiorch_report(t->rt, "task failed and nobody awaited it: %s", lua_tostring(L, -1));
        lua_pop(L, 2);
    }
    return 0;
}

/* aiorch.debug([on]): debug mode, where the runtime's own reports carry
 * tracebacks. Starts on when AIORCH_DEBUG is set (and not "0"). */
static int l_debug(lua_State *L)
{
    if (!lua_isnoneornil(L, 1)) {
        lua_pushboolean(L, lua_toboolean(L, 1));
        lua_rawsetp(L, LUA_REGISTRYINDEX, &debug_key);
    }
    lua_rawgetp(L, LUA_REGISTRYINDEX, &debug_key);
    return 1;
}

/* Checks the list of tasks at idx; pushes an array of them (a userdata). */
static aiorch_task **check_tasks(lua_State *L, int idx, int *n)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = (int)luaL_len(L, idx);
    aiorch_task **list = lua_newuserdatauv(L, (size_t)(*n ? *n : 1) * sizeof *list, 0);
    for (int i = 1; i <= *n; i++) {
        lua_rawgeti(L, idx, i);
        aiorch_task *t = luaL_testudata(L, -1, TASK_MT);
        if (!t)
            luaL_error(L, "bad task list: item %d is a %s, not a task", i, luaL_typename(L, -1));
        list[i - 1] = t;
        lua_pop(L, 1);
    }
    return list;
}

/* Pushes values, errors, messages for the tasks in table 1: for a task
 * that did not succeed, errors[i] and messages[i] are the kind and message
 * its await gives; unfinished ones are cancelled and get "timeout". */
static int push_gathered(lua_State *L)
{
    int n = (int)luaL_len(L, 1);
    lua_createtable(L, n, 1);
    lua_createtable(L, n, 1);
    lua_createtable(L, n, 1);
    int values = lua_gettop(L) - 2, errors = values + 1, messages = values + 2;
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i);
        aiorch_task *t = check_task(L, -1);
        if (!ended(t)) {
            aiorch_task_cancel(t);
            lua_pushliteral(L, "timeout");
            lua_pushvalue(L, -1);
            lua_rawseti(L, errors, i);
            lua_rawseti(L, messages, i);
        } else {
            int top = lua_gettop(L);
            int nr = push_results(L, top, t);
            if (t->state == T_DONE) {
                if (nr > 0) {
                    lua_pushvalue(L, top + 1);
                    lua_rawseti(L, values, i);
                }
            } else {
                lua_rawseti(L, messages, i);
                lua_rawseti(L, errors, i);
            }
            lua_settop(L, top);
        }
        lua_pop(L, 1);
    }
    for (int k = values; k <= messages; k++) {
        lua_pushinteger(L, n);
        lua_setfield(L, k, "n");
    }
    return 3;
}

static int gather_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    aiorch_task *self = aiorch_task_check(L, "aiorch.gather");
    self->timed_out = 0;
    lua_settop(L, 2);
    return push_gathered(L);
}

static int l_gather(lua_State *L)
{
    int n;
    double timeout = opt_timeout(L, 2);
    lua_settop(L, 2);
    aiorch_task **list = check_tasks(L, 1, &n);
    int pending = 0;
    for (int i = 0; i < n; i++)
        if (!ended(list[i])) list[pending++] = list[i];
    if (pending == 0) {
        lua_settop(L, 2);
        return push_gathered(L);
    }
    aiorch_task *self = aiorch_task_check(L, "aiorch.gather");
    wait_on(L, self, list, pending, 0, timeout);
    return lua_yieldk(L, 0, 0, gather_k);
}

/* first(tasks, pred, timeout): slot 4 holds the examined flags, slot 5 the deadline. */
static int first_scan(lua_State *L)
{
    aiorch_task *self = aiorch_rt_of(L)->current;
    int n = (int)luaL_len(L, 1);
    for (;;) {
        /* The earliest finished task not yet examined. */
        aiorch_task *best = NULL;
        int best_i = 0, unfinished = 0;
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, 1, i);
            aiorch_task *t = check_task(L, -1);
            lua_pop(L, 1);
            if (!ended(t)) {
                unfinished++;
                continue;
            }
            if (lua_rawgeti(L, 4, i) != LUA_TNIL) {
                lua_pop(L, 1);
                continue;
            }
            lua_pop(L, 1);
            if (!best || t->done_seq < best->done_seq) best = t, best_i = i;
        }
        if (!best) {
            int timed_out = self && self->timed_out;
            if (self) self->timed_out = 0;
            if (unfinished == 0 || timed_out) {
                lua_settop(L, 5);
                lua_pushnil(L);
                if (unfinished) {
                    lua_pushliteral(L, "timeout");
                    lua_pushliteral(L, "timeout");
                } else {
                    lua_pushliteral(L, "none");
                    lua_pushfstring(L, "no task of %d gave a value that satisfies the predicate",
                                    n);
                }
                return 3 + push_gathered(L);
            }
            if (!self) self = aiorch_task_check(L, "aiorch.first");
            aiorch_task **list = lua_newuserdatauv(L, (size_t)unfinished * sizeof *list, 0);
            int k = 0;
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, 1, i);
                aiorch_task *t = check_task(L, -1);
                lua_pop(L, 1);
                if (!ended(t)) list[k++] = t;
            }
            double timeout = -1;
            if (!lua_isnil(L, 5)) timeout = lua_tonumber(L, 5) - aiorch_now_ms();
            wait_on(L, self, list, k, 1, timeout);
            lua_pop(L, 1);
            return -1; /* caller yields */
        }
        lua_pushboolean(L, 1);
        lua_rawseti(L, 4, best_i);
        lua_rawgeti(L, 1, best_i);
        int top = lua_gettop(L);
        int nr = push_results(L, top, best);
        int ok = 0;
        if (best->state == T_DONE && nr > 0) {
            if (lua_isnil(L, 2)) {
                ok = lua_toboolean(L, top + 1);
            } else {
                lua_pushvalue(L, 2);
                lua_pushvalue(L, top + 1);
                lua_call(L, 1, 1);
                ok = lua_toboolean(L, -1);
                lua_pop(L, 1);
            }
        }
        if (ok) {
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, 1, i);
                aiorch_task_cancel(check_task(L, -1));
                lua_pop(L, 1);
            }
            lua_pushvalue(L, top + 1);
            lua_pushinteger(L, best_i);
            return 2;
        }
        lua_settop(L, 5);
    }
}

static int first_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    int r = first_scan(L);
    return r >= 0 ? r : lua_yieldk(L, 0, 0, first_k);
}

static int l_first(lua_State *L)
{
    int n;
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
    double timeout = opt_timeout(L, 3);
    lua_settop(L, 3);
    check_tasks(L, 1, &n);
    lua_pop(L, 1);
    lua_newtable(L); /* 4: examined */
    if (timeout >= 0)
        lua_pushnumber(L, aiorch_now_ms() + timeout);
    else
        lua_pushnil(L); /* 5: deadline */
    int r = first_scan(L);
    return r >= 0 ? r : lua_yieldk(L, 0, 0, first_k);
}

/* sleep's pending operation: the task's own timer. */
static void sleep_cancel(aiorch_op *op)
{
    aiorch_task *t = (aiorch_task *)((char *)op - offsetof(aiorch_task, sleep_op));
    aiorch_watch_stop(&t->timer);
}

static int l_sleep(lua_State *L)
{
    double ms = luaL_checknumber(L, 1);
    luaL_argcheck(L, ms >= 0, 1, "sleep time must be >= 0 ms");
    aiorch_task *self = aiorch_task_check(L, "aiorch.sleep");
    self->sleep_op.cancel = sleep_cancel;
    aiorch_task_wait(self, &self->sleep_op);
    if (ms == 0)
        aiorch_task_wake(self, 0); /* to the back of the queue */
    else
        arm_timer(self, ms, 1);
    return lua_yield(L, 0);
}

static int l_current(lua_State *L)
{
    aiorch_task *t = aiorch_task_current(aiorch_rt_of(L), L);
    if (!t) return 0;
    push_self(t, L);
    return 1;
}

static int l_now(lua_State *L)
{
    lua_pushnumber(L, aiorch_now_ms());
    return 1;
}

/* aiorch.run(fn, ...): for hosts without a loop of their own running. */
static int l_run(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (rt->current) return luaL_error(L, "aiorch.run: already inside a task; use aiorch.spawn");
    if (!rt->loop) return luaL_error(L, "aiorch.run: this runtime runs on a host's loop");
    aiorch_task *t = aiorch_task_spawn(rt, L, lua_gettop(L) - 1);
    int idx = lua_gettop(L);
    aiorch_sched_drain(rt);
    while (!ended(t)) {
        if (!ev_run(rt->loop, EVRUN_ONCE) && !rt->ready_head && !ended(t)) {
            aiorch_task_cancel(t);
            return luaL_error(L, "aiorch.run: the task waits for something that can never happen");
        }
        aiorch_sched_drain(rt);
    }
    return push_results(L, idx, t);
}

static const luaL_Reg task_methods[] = {
    {"await", t_await},
    {"cancel", t_cancel},
    {"status", t_status},
    {NULL, NULL},
};

static const luaL_Reg task_meta[] = {
    {"__gc", t_gc},
    {"__tostring", t_tostring},
    {NULL, NULL},
};

static const luaL_Reg task_funcs[] = {
    {"spawn", l_spawn}, {"gather", l_gather},   {"first", l_first},
    {"sleep", l_sleep}, {"current", l_current}, {"now", l_now},
    {"run", l_run},     {"debug", l_debug},     {NULL, NULL},
};

void aiorch_task_open(aiorch_runtime *rt, lua_State *L)
{
    lua_pushlightuserdata(L, rt);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &budget_key);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &stopped_key);
    const char *dbg = getenv("AIORCH_DEBUG");
    lua_pushboolean(L, dbg && *dbg && strcmp(dbg, "0") != 0);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &debug_key);
    co_wrap_make(rt, L);
    if (luaL_newmetatable(L, TASK_MT)) {
        luaL_setfuncs(L, task_meta, 0);
        luaL_newlib(L, task_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, task_funcs, 1);
}
