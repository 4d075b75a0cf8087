/* Jobs: the C API's unit of work (aiorch_job_submit_*).
 *
 * A job is a task running scripts/aiorch/job.lua's run(finish, fn, ...): it
 * runs fn as a child task, so that a raise, a spent budget or a cancel of
 * fn all end in the runner, which hands the outcome to finish (a C closure
 * over a box that points back at the job). Submitting only queues the task
 * and posts rt->job_w; the watcher's callback runs the scheduler and
 * delivers ended jobs, so host callbacks never run inside a submit call nor
 * inside Lua (except on_event, which runs in the job's own task). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { JOB_PENDING, JOB_ENDED, JOB_DELIVERING };

struct aiorch_job {
    aiorch_runtime *rt;
    aiorch_job_callbacks cb;
    aiorch_job **box; /* the Lua side's pointer: NULL once the job is freed */
    int box_ref;
    int task_ref;
    aiorch_task *task;
    int state;
    int ok;
    char *text; /* the result's JSON, or the error's message */
    size_t len;
    char *kind;
    aiorch_job *prev, *next; /* rt->jobs */
    aiorch_job *done_next;
};

#define BOX_MT "aiorch.job"

static void job_free(aiorch_job *job)
{
    aiorch_runtime *rt = job->rt;
    lua_State *S = rt->S;
    if (job->prev)
        job->prev->next = job->next;
    else
        rt->jobs = job->next;
    if (job->next) job->next->prev = job->prev;
    rt->njobs--;
    if (job->box) *job->box = NULL;
    luaL_unref(S, LUA_REGISTRYINDEX, job->box_ref);
    luaL_unref(S, LUA_REGISTRYINDEX, job->task_ref);
    free(job->text);
    free(job->kind);
    free(job);
}

static void feed(aiorch_runtime *rt)
{
    if (!aiorch_watch_active(&rt->job_w)) aiorch_watch_post(&rt->job_w);
    aiorch_loop_wake(rt);
}

/* Records the outcome and queues the job for delivery. */
static void job_end(aiorch_job *job, int ok, const char *kind, const char *text, size_t len)
{
    aiorch_runtime *rt = job->rt;
    if (job->state != JOB_PENDING) return;
    job->state = JOB_ENDED;
    job->ok = ok;
    job->kind = kind ? strdup(kind) : NULL;
    job->text = malloc(len + 1);
    if (job->text) {
        memcpy(job->text, text, len);
        job->text[len] = '\0';
        job->len = len;
    }
    job->done_next = NULL;
    if (rt->done_tail)
        rt->done_tail->done_next = job;
    else
        rt->done_head = job;
    rt->done_tail = job;
    feed(rt);
}

static void deliver(aiorch_job *job)
{
    const aiorch_job_callbacks *cb = &job->cb;
    const char *text = job->text ? job->text : "out of memory";
    job->state = JOB_DELIVERING;
    if (job->ok && job->text && job->kind == NULL) {
        if (cb->on_result) cb->on_result(cb->ud, text, job->len);
    } else if (cb->on_error) {
        cb->on_error(cb->ud, job->kind ? job->kind : "error", text);
    }
    job_free(job);
}

/* posted: runs the tasks that new jobs queued and delivers the jobs that
 * ended. */
static void jobs_cb(aiorch_watch *w, int events)
{
    (void)events;
    aiorch_runtime *rt = w->data;
    aiorch_job *job;
    aiorch_sched_drain(rt);
    while ((job = rt->done_head)) {
        rt->done_head = job->done_next;
        if (!rt->done_head) rt->done_tail = NULL;
        deliver(job);
    }
}

void aiorch_job_init(aiorch_runtime *rt)
{
    aiorch_watch_timer_init(&rt->job_w, &rt->lp, jobs_cb, rt, 0);
}

/* finish(true, json) or finish(false, kind, message): upvalue 1 is the box. */
static int l_finish(lua_State *L)
{
    aiorch_job *job = *(aiorch_job **)lua_touserdata(L, lua_upvalueindex(1));
    size_t len;
    const char *text;
    if (!job) return 0;
    if (lua_toboolean(L, 1)) {
        text = luaL_checklstring(L, 2, &len);
        job_end(job, 1, NULL, text, len);
    } else {
        const char *kind = luaL_checkstring(L, 2);
        text = luaL_checklstring(L, 3, &len);
        job_end(job, 0, kind, text, len);
    }
    return 0;
}

/* emit(json): a stream event, to on_event at once. Upvalue 1 is the box. */
static int l_emit(lua_State *L)
{
    aiorch_job *job = *(aiorch_job **)lua_touserdata(L, lua_upvalueindex(1));
    size_t len;
    const char *json = luaL_checklstring(L, 1, &len);
    if (job && job->state == JOB_PENDING && job->cb.on_event)
        job->cb.on_event(job->cb.ud, json, len);
    return 0;
}

/* Pushes the field of scripts/aiorch/job.lua, or returns -1 with the message pushed. */
static int push_runner(lua_State *S, const char *field)
{
    lua_getglobal(S, "require");
    lua_pushliteral(S, "aiorch.job");
    if (lua_pcall(S, 1, 1, 0) != LUA_OK) return -1;
    if (!lua_istable(S, -1) || lua_getfield(S, -1, field) != LUA_TFUNCTION) {
        lua_settop(S, 0);
        lua_pushfstring(S, "aiorch.job has no function %s", field);
        return -1;
    }
    lua_remove(S, -2);
    return 0;
}

static aiorch_job *job_new(aiorch_runtime *rt, const aiorch_job_callbacks *cb)
{
    aiorch_job *job;
    if (rt->closing) {
        snprintf(rt->error, sizeof rt->error, "the runtime is being freed");
        return NULL;
    }
    job = calloc(1, sizeof *job);
    if (!job) {
        snprintf(rt->error, sizeof rt->error, "out of memory");
        return NULL;
    }
    job->rt = rt;
    if (cb) job->cb = *cb;
    job->box_ref = job->task_ref = LUA_NOREF;
    job->next = rt->jobs;
    if (rt->jobs) rt->jobs->prev = job;
    rt->jobs = job;
    rt->njobs++;
    /* The box: the Lua closures' way back to the job, cleared when it goes. */
    job->box = lua_newuserdatauv(rt->S, sizeof *job->box, 0);
    *job->box = job;
    job->box_ref = luaL_ref(rt->S, LUA_REGISTRYINDEX);
    return job;
}

/* Stack of S: [fn args...]. Starts run(finish, fn, args...) as the job's
 * task; or, when fn is missing (status != LUA_OK), ends the job with the
 * message on top of S as a "load" failure. */
static void job_start(aiorch_runtime *rt, aiorch_job *job, int status, int nargs)
{
    lua_State *S = rt->S;
    size_t len;
    const char *msg;
    if (status == LUA_OK && push_runner(S, "run") != 0) status = LUA_ERRRUN;
    if (status != LUA_OK) {
        msg = lua_tolstring(S, -1, &len);
        if (!msg) msg = "cannot load the job", len = strlen(msg);
        job_end(job, 0, "load", msg, len);
        lua_settop(S, 0);
        return;
    }
    lua_insert(S, -(nargs + 2)); /* run fn args... */
    lua_rawgeti(S, LUA_REGISTRYINDEX, job->box_ref);
    lua_pushcclosure(S, l_finish, 1);
    lua_insert(S, -(nargs + 2)); /* run finish fn args... */
    /* A job belongs to no task, even when submitted from inside one (on_event). */
    aiorch_task *current = rt->current;
    rt->current = NULL;
    job->task = aiorch_task_spawn(rt, S, nargs + 2);
    rt->current = current;
    job->task_ref = luaL_ref(S, LUA_REGISTRYINDEX);
    lua_settop(S, 0);
    feed(rt);
}

static void push_args(lua_State *S, int argc, const char *const *argv)
{
    luaL_checkstack(S, argc + 8, "too many arguments");
    for (int i = 0; i < argc; i++)
        lua_pushstring(S, argv[i]);
}

aiorch_job *aiorch_job_submit_file(aiorch_runtime *rt, const char *path, int argc,
                                   const char *const *argv, const aiorch_job_callbacks *cb)
{
    aiorch_loop_lock(rt);
    aiorch_job *job = job_new(rt, cb);
    if (job) {
        int status = luaL_loadfile(rt->S, path);
        if (status == LUA_OK) push_args(rt->S, argc, argv);
        job_start(rt, job, status, status == LUA_OK ? argc : 0);
    }
    aiorch_loop_unlock(rt);
    return job;
}

aiorch_job *aiorch_job_submit_chunk(aiorch_runtime *rt, const char *code, size_t len,
                                    const char *name, int argc, const char *const *argv,
                                    const aiorch_job_callbacks *cb)
{
    aiorch_loop_lock(rt);
    aiorch_job *job = job_new(rt, cb);
    if (job) {
        int status = luaL_loadbufferx(rt->S, code, len, name ? name : "=job", "t");
        if (status == LUA_OK) push_args(rt->S, argc, argv);
        job_start(rt, job, status, status == LUA_OK ? argc : 0);
    }
    aiorch_loop_unlock(rt);
    return job;
}

aiorch_job *aiorch_job_submit_orchestration(aiorch_runtime *rt, const char *request_json,
                                            const char *strategy, const char *providers,
                                            const aiorch_job_callbacks *cb)
{
    aiorch_loop_lock(rt);
    aiorch_job *job = job_new(rt, cb);
    if (job) {
        lua_State *S = rt->S;
        int status = push_runner(S, "orchestrate");
        if (status == LUA_OK) {
            luaL_checkstack(S, 8, "orchestrate");
            if (job->cb.on_event) {
                lua_rawgeti(S, LUA_REGISTRYINDEX, job->box_ref);
                lua_pushcclosure(S, l_emit, 1);
            } else {
                lua_pushnil(S);
            }
            lua_pushstring(S, request_json);
            lua_pushstring(S, strategy);
            lua_pushstring(S, providers);
        }
        job_start(rt, job, status, 4);
    }
    aiorch_loop_unlock(rt);
    return job;
}

void aiorch_job_cancel(aiorch_job *job)
{
    aiorch_runtime *rt;
    if (!job || job->state == JOB_DELIVERING) return;
    rt = job->rt;
    if (rt->closing) return;
    aiorch_loop_lock(rt);
    if (job->state == JOB_PENDING && job->task) {
        *job->box = NULL; /* nothing it does from here on reaches the host */
        aiorch_task_cancel(job->task);
    } else if (job->state == JOB_ENDED) {
        aiorch_job **p = &rt->done_head;
        aiorch_job *prev = NULL;
        while (*p && *p != job)
            prev = *p, p = &(*p)->done_next;
        if (*p) *p = job->done_next;
        if (rt->done_tail == job) rt->done_tail = prev;
    }
    job_free(job);
    aiorch_loop_wake(rt);
    aiorch_loop_unlock(rt);
}

size_t aiorch_runtime_jobs(aiorch_runtime *rt)
{
    return rt->njobs;
}

/* Every job now: the ended ones get their outcome, the others
 * on_error("cancelled", why) and their tasks are cancelled. */
void aiorch_job_close_all(aiorch_runtime *rt, const char *why)
{
    aiorch_job *job;
    rt->closing = 1;
    aiorch_watch_stop(&rt->job_w);
    while ((job = rt->done_head)) {
        rt->done_head = job->done_next;
        if (!rt->done_head) rt->done_tail = NULL;
        deliver(job);
    }
    while ((job = rt->jobs)) {
        *job->box = NULL;
        if (job->task) aiorch_task_cancel(job->task);
        job->ok = 0;
        free(job->kind);
        free(job->text);
        job->kind = strdup("cancelled");
        job->text = strdup(why);
        deliver(job);
    }
}
