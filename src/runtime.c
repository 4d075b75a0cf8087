/* One runtime instance: a lua_State, a libev loop and what hangs off them. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "internal.h"

#define DEFAULT_BUDGET 100000000L

static void default_report(void *ud, const char *message)
{
    (void)ud;
    fprintf(stderr, "aiorch: %s\n", message);
}

static int panic(lua_State *L)
{
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "aiorch: PANIC: unprotected error in call to Lua API (%s)\n", msg ? msg : "?");
    return 0; /* Lua aborts */
}

/* lua_WarnFunction as the standalone lua's: off until "@on". */
static void warn_cb(void *ud, const char *msg, int tocont)
{
    aiorch_runtime *rt = ud;
    if (!rt->warn_cont && *msg == '@') { /* a control message */
        if (strcmp(msg, "@on") == 0) rt->warn_on = 1;
        if (strcmp(msg, "@off") == 0) rt->warn_on = 0;
        return;
    }
    if (rt->warn_on)
        fprintf(stderr, "%s%s%s", rt->warn_cont ? "" : "Lua warning: ", msg, tocont ? "" : "\n");
    rt->warn_cont = tocont;
}

static char *dup_or_null(const char *s)
{
    return s && *s ? strdup(s) : NULL;
}

/* Prepends ROOT/scripts to package.path so `require "aiorch.x"` finds the Lua layer. */
static void set_package_path(aiorch_runtime *rt, lua_State *L)
{
    lua_getglobal(L, "package");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/scripts/?.lua;%s", rt->root,
                    lua_tostring(L, -1) ? lua_tostring(L, -1) : "");
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

int aiorch_runtime_init(aiorch_runtime *rt, lua_State *L, const aiorch_options *opts)
{
    aiorch_options none = {0};
    if (!opts) opts = &none;
    const char *env;
    rt->L = L;
    if (opts->host)
        rt->lp.host = *opts->host;
    else
        rt->lp.ev = rt->loop;
    rt->on_error = opts->on_error ? opts->on_error : default_report;
    rt->error_ud = opts->error_ud;
    rt->budget = opts->instruction_budget;
    if (rt->budget <= 0 && (env = getenv("AIORCH_INSTRUCTION_BUDGET")) && *env)
        rt->budget = strtol(env, NULL, 10);
    if (rt->budget <= 0) rt->budget = DEFAULT_BUDGET;
    rt->root = opts->root ? strdup(opts->root) : aiorch_root_find();
    rt->user_path = dup_or_null(opts->user_path ? opts->user_path : getenv("AIORCH_PATH"));
    /* curl (and the TLS library under it) starts with the first request:
     * a process that never calls out (the gateway's master) never pays. */
    rt->curl = NULL;
    if (!rt->root) return -1;
    aiorch_sched_init(rt);
    aiorch_job_init(rt);
    rt->S = lua_newthread(L);
    rt->S_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    set_package_path(rt, L);
    aiorch_push_module(rt, L);
    lua_pop(L, 1);
    return 0;
}

void aiorch_runtime_teardown(aiorch_runtime *rt)
{
    if (rt->L) {
        aiorch_job_close_all(rt, "the runtime was freed");
        aiorch_task_cancel_all(rt);
        aiorch_server_close_all(rt);
        aiorch_redis_close_all(rt);
        aiorch_sched_close(rt); /* a host's loop goes on: nothing of ours may stay on it */
        aiorch_watch_close(&rt->job_w);
    }
    aiorch_task_watchdog_stop(rt);
    if (rt->curl) aiorch_curl_free(rt->curl);
    rt->curl = NULL;
    free(rt->root);
    free(rt->user_path);
    rt->root = rt->user_path = NULL;
}

aiorch_runtime *aiorch_runtime_new(const aiorch_options *opts)
{
    const aiorch_host *host = opts ? opts->host : NULL;
    if (opts && opts->pollable && opts->loop) {
        fprintf(stderr, "aiorch: a pollable runtime makes its own loop: opts.loop must be NULL\n");
        return NULL;
    }
    if (host && (opts->loop || opts->pollable || !host->io || !host->timer || !host->release)) {
        fprintf(stderr, "aiorch: opts.host needs io, timer and release, and neither opts.loop "
                        "nor opts.pollable\n");
        return NULL;
    }
    aiorch_runtime *rt = calloc(1, sizeof *rt);
    if (!rt) return NULL;
    rt->loop = opts && opts->loop ? opts->loop : NULL;
    if (!rt->loop && !host) {
        rt->loop = ev_loop_new(EVFLAG_AUTO);
        rt->own_loop = 1;
    }
    lua_State *L = lua_newstate(aiorch_lua_alloc, rt);
    if ((!rt->loop && !host) || !L) {
        fprintf(stderr, "aiorch: cannot create the runtime: out of memory\n");
        if (L) lua_close(L);
        aiorch_alloc_trim(rt);
        if (rt->own_loop && rt->loop) ev_loop_destroy(rt->loop);
        free(rt);
        return NULL;
    }
    rt->own_L = 1;
    lua_atpanic(L, panic);
    lua_setwarnf(L, warn_cb, rt);
    /* The collector keeps Lua's own pause (a cycle at 2x the live heap)
     * while few tasks are live; task.c (gc_load) lowers it under load. */
    luaL_openlibs(L);
    if (aiorch_runtime_init(rt, L, opts) != 0) {
        fprintf(stderr, "aiorch: cannot create the runtime\n");
        aiorch_runtime_free(rt);
        return NULL;
    }
    if (opts && opts->pollable && aiorch_loop_poll_start(rt) != 0) {
        fprintf(stderr, "aiorch: cannot start the runtime's loop thread\n");
        aiorch_runtime_free(rt);
        return NULL;
    }
    return rt;
}

void aiorch_runtime_free(aiorch_runtime *rt)
{
    if (!rt) return;
    aiorch_loop_poll_stop(rt); /* this thread alone owns the loop from here on */
    aiorch_runtime_teardown(rt);
    if (rt->own_L && rt->L) lua_close(rt->L);
    aiorch_alloc_trim(rt);
    if (rt->own_loop && rt->loop) ev_loop_destroy(rt->loop);
    free(rt);
}

void aiorch_runtime_ready(aiorch_runtime *rt, aiorch_watch *w, int events)
{
    (void)rt;
    aiorch_watch_ready(w, events);
}

struct lua_State *aiorch_runtime_lua(aiorch_runtime *rt)
{
    return rt->L;
}

struct ev_loop *aiorch_runtime_loop(aiorch_runtime *rt)
{
    return rt->loop;
}

const char *aiorch_runtime_root(aiorch_runtime *rt)
{
    return rt->root;
}

const char *aiorch_runtime_error(aiorch_runtime *rt)
{
    return rt->error;
}

static int start(aiorch_runtime *rt, const char *path, int argc, char **argv)
{
    lua_State *S = rt->S;
    rt->error[0] = '\0';
    if (rt->current) {
        snprintf(rt->error, sizeof rt->error, "cannot start %s from inside a task", path);
        return -1;
    }
    if (luaL_loadfile(S, path) != LUA_OK) {
        snprintf(rt->error, sizeof rt->error, "%s", lua_tostring(S, -1));
        lua_pop(S, 1);
        return -1;
    }
    luaL_checkstack(S, argc + 2, "too many arguments");
    for (int i = 0; i < argc; i++)
        lua_pushstring(S, argv[i]);
    rt->main = aiorch_task_spawn(rt, S, argc);
    rt->main_ended = 0;
    rt->main_status = 0;
    lua_pop(S, 1);
    aiorch_sched_drain(rt);
    /* Failed before its first yield: the caller hears it now (finish_error
     * put the message in rt->error). */
    return rt->main_ended && rt->main_status != 0 && rt->error[0] ? -1 : 0;
}

int aiorch_runtime_start(aiorch_runtime *rt, const char *path, int argc, char **argv)
{
    aiorch_loop_lock(rt);
    int r = start(rt, path, argc, argv);
    aiorch_loop_wake(rt);
    aiorch_loop_unlock(rt);
    return r;
}

int aiorch_runtime_busy(aiorch_runtime *rt)
{
    return rt->main != NULL;
}

int aiorch_runtime_run(aiorch_runtime *rt, const char *path, int argc, char **argv)
{
    if (rt->poll || !rt->loop) {
        snprintf(rt->error, sizeof rt->error,
                 rt->poll ? "aiorch_runtime_run: the runtime is pollable: drive it with "
                            "aiorch_runtime_step"
                          : "aiorch_runtime_run: a host's loop drives this runtime");
        return 1;
    }
    if (start(rt, path, argc, argv) != 0) return 1;
    while (!rt->main_ended) {
        if (!ev_run(rt->loop, EVRUN_ONCE) && !rt->ready_head && !rt->main_ended) {
            snprintf(rt->error, sizeof rt->error, "%s waits for something that can never happen",
                     path);
            aiorch_task_cancel_all(rt);
            return 1;
        }
        aiorch_sched_drain(rt);
    }
    return rt->main_status;
}

int aiorch_runtime_wait(aiorch_runtime *rt)
{
    if (!rt->loop && !rt->poll) {
        snprintf(rt->error, sizeof rt->error,
                 "aiorch_runtime_wait: a host's loop drives this runtime");
        return -1;
    }
    if (rt->poll) {
        struct pollfd pfd = {.fd = aiorch_runtime_fd(rt), .events = POLLIN};
        while (rt->njobs > 0) {
            if (poll(&pfd, 1, -1) < 0 && errno != EINTR) return -1;
            aiorch_runtime_step(rt);
        }
        return 0;
    }
    while (rt->njobs > 0) {
        if (!ev_run(rt->loop, EVRUN_ONCE) && !ev_pending_count(rt->loop) && rt->njobs > 0) {
            snprintf(rt->error, sizeof rt->error,
                     "%zu jobs wait for something that can never happen", rt->njobs);
            aiorch_job_close_all(rt, rt->error);
            rt->closing = 0;
            return -1;
        }
    }
    return 0;
}
