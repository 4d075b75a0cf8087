/* aiorch.process and aiorch.signal: child processes and signals on the
 * runtime's loop.
 *
 * The state of one runtime (its children, the SIGCHLD watcher, its signal
 * watchers) lives in a userdata in the registry, made on first use and
 * finalised with the lua_State. Children are reaped from an ev_signal on
 * SIGCHLD with waitpid(pid, WNOHANG) on each of our own pids only, so the
 * children of io.popen and os.execute are left to them. libev's ev_child
 * only works on the default loop: when the runtime runs on it, an ev_child
 * per child is used instead (libev reaps with waitpid(-1) there). */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* close_range */
#endif

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/types.h>
#include <sys/wait.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <unistd.h>

#include "internal.h"

#define PROC_STATE_MT "aiorch.process.state"
/* The messages of nil, "timeout", message */
#define WAIT_TIMEOUT "the child is still running"
#define SIG_TIMEOUT "no signal arrived in time"

extern char **environ;

typedef struct proc_state proc_state;
typedef struct proc_child proc_child;
typedef struct proc_waiter proc_waiter;
typedef struct sig_watch sig_watch;
typedef struct sig_waiter sig_waiter;

/* A task in process.wait: woken by the child's exit or its deadline. */
struct proc_waiter {
    aiorch_op op; /* first member: the scheduler hands back &op */
    aiorch_task *task;
    proc_child *child;
    proc_waiter *next, **pprev;
    ev_timer timer;
};

/* A child spawned by this runtime, until a wait has returned its status. */
struct proc_child {
    proc_state *st;
    pid_t pid;
    int exited, status;
    proc_waiter *waiters;
    proc_child *next, **pprev;
    ev_child cw; /* only on the default loop */
    int cw_unref;
};

/* A task in signal.wait: one node per signal it listens for. */
typedef struct sig_node {
    sig_waiter *w;
    sig_watch *watch;
    struct sig_node *next, **pprev;
} sig_node;

struct sig_waiter {
    aiorch_op op;
    aiorch_task *task;
    ev_timer timer;
    int n;
    sig_node nodes[];
};

/* One caught signal: caught from the first wait on, until reset. */
struct sig_watch {
    proc_state *st;
    int signum;
    int pending; /* arrived while nobody waited */
    int unref;   /* the watcher does not keep the loop alive */
    ev_signal w;
    sig_node *waiters;
    sig_watch *next;
};

struct proc_state {
    aiorch_runtime *rt;
    proc_child *children;
    ev_signal chld_w;
    int chld_unref;
    int waiting; /* tasks in process.wait */
    sig_watch *sigs;
};

static const struct {
    const char *name;
    int num;
} sig_names[] = {
    {"SIGHUP", SIGHUP},   {"SIGINT", SIGINT},     {"SIGQUIT", SIGQUIT}, {"SIGILL", SIGILL},
    {"SIGTRAP", SIGTRAP}, {"SIGABRT", SIGABRT},   {"SIGBUS", SIGBUS},   {"SIGFPE", SIGFPE},
    {"SIGKILL", SIGKILL}, {"SIGUSR1", SIGUSR1},   {"SIGSEGV", SIGSEGV}, {"SIGUSR2", SIGUSR2},
    {"SIGPIPE", SIGPIPE}, {"SIGALRM", SIGALRM},   {"SIGTERM", SIGTERM}, {"SIGCHLD", SIGCHLD},
    {"SIGCONT", SIGCONT}, {"SIGSTOP", SIGSTOP},   {"SIGTSTP", SIGTSTP}, {"SIGTTIN", SIGTTIN},
    {"SIGTTOU", SIGTTOU}, {"SIGWINCH", SIGWINCH},
};

#define NSIGNAMES (sizeof sig_names / sizeof sig_names[0])

static const char *sig_name(int num)
{
    size_t i;
    for (i = 0; i < NSIGNAMES; i++)
        if (sig_names[i].num == num) return sig_names[i].name;
    return "SIGUNKNOWN";
}

/* "TERM", "SIGTERM" or "sigterm" → SIGTERM; raises on an unknown name. */
static int sig_check(lua_State *L, int idx)
{
    const char *s = luaL_checkstring(L, idx);
    size_t i;
    for (i = 0; i < NSIGNAMES; i++)
        if (strcasecmp(s, sig_names[i].name) == 0 || strcasecmp(s, sig_names[i].name + 3) == 0)
            return sig_names[i].num;
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal '%s'", s));
}

/* ---- the runtime's state ---------------------------------------------- */

static char state_key;

static void chld_check(proc_state *st);
static void child_ref_update(proc_child *ch, int stop);

/* ev_signal on SIGCHLD: reaps our children that have exited */
static void chld_on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    proc_state *st = w->data;
    (void)loop;
    (void)revents;
    chld_check(st);
    aiorch_sched_drain(st->rt);
}

/* The SIGCHLD watcher keeps the loop alive only while a task waits. */
static void chld_watch_update(proc_state *st)
{
    struct ev_loop *loop = st->rt->loop;
    int want_active = st->children != NULL && !ev_is_default_loop(loop);
    int want_ref = st->waiting > 0;

    if (ev_is_active(&st->chld_w) && (!want_active || want_ref) && st->chld_unref) {
        ev_ref(loop); /* libev: ref again before stopping an unref'd watcher */
        st->chld_unref = 0;
    }
    if (!want_active) {
        if (ev_is_active(&st->chld_w)) ev_signal_stop(loop, &st->chld_w);
        return;
    }
    if (!ev_is_active(&st->chld_w)) ev_signal_start(loop, &st->chld_w);
    if (!want_ref && !st->chld_unref) {
        ev_unref(loop);
        st->chld_unref = 1;
    }
}

static void sig_watch_stop(sig_watch *sw)
{
    struct ev_loop *loop = sw->st->rt->loop;
    if (!ev_is_active(&sw->w)) return;
    if (sw->unref) ev_ref(loop);
    sw->unref = 0;
    ev_signal_stop(loop, &sw->w);
}

/* __gc of the state: the runtime goes (its tasks were cancelled before).
 * Children still running are left running. */
static int state_gc(lua_State *L)
{
    proc_state *st = luaL_checkudata(L, 1, PROC_STATE_MT);
    struct ev_loop *loop = st->rt->loop;
    while (st->children) {
        proc_child *ch = st->children;
        while (ch->waiters) { /* not expected: tasks are cancelled first */
            proc_waiter *w = ch->waiters;
            ch->waiters = w->next;
            ev_timer_stop(loop, &w->timer);
            free(w);
        }
        st->children = ch->next;
        child_ref_update(ch, 1);
        if (ev_is_active(&ch->cw)) ev_child_stop(loop, &ch->cw);
        free(ch);
    }
    st->waiting = 0;
    chld_watch_update(st);
    while (st->sigs) {
        sig_watch *sw = st->sigs;
        st->sigs = sw->next;
        sig_watch_stop(sw);
        free(sw);
    }
    return 0;
}

static proc_state *state_get(lua_State *L)
{
    aiorch_runtime *rt = aiorch_rt_of(L);
    proc_state *st;
    if (!rt->loop)
        luaL_error(L, "aiorch.process and aiorch.signal: not in a runtime on a host's loop");
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &state_key) == LUA_TUSERDATA) {
        st = lua_touserdata(L, -1);
        lua_pop(L, 1);
        return st;
    }
    lua_pop(L, 1);
    st = lua_newuserdatauv(L, sizeof *st, 0);
    memset(st, 0, sizeof *st);
    st->rt = rt;
    ev_signal_init(&st->chld_w, chld_on_signal, SIGCHLD);
    st->chld_w.data = st;
    if (luaL_newmetatable(L, PROC_STATE_MT)) {
        lua_pushcfunction(L, state_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &state_key);
    return st;
}

/* ---- children --------------------------------------------------------- */

static proc_child *child_find(proc_state *st, pid_t pid)
{
    proc_child *ch;
    for (ch = st->children; ch; ch = ch->next)
        if (ch->pid == pid) return ch;
    return NULL;
}

static void child_unlink(proc_child *ch)
{
    *ch->pprev = ch->next;
    if (ch->next) ch->next->pprev = ch->pprev;
}

/* An ev_child keeps the loop alive only while a task waits (as SIGCHLD's
 * watcher does); stop=1 readies it for ev_child_stop. */
static void child_ref_update(proc_child *ch, int stop)
{
    struct ev_loop *loop = ch->st->rt->loop;
    int want_ref = stop || ch->waiters != NULL;
    if (!ev_is_active(&ch->cw)) return;
    if (want_ref && ch->cw_unref) {
        ev_ref(loop);
        ch->cw_unref = 0;
    } else if (!want_ref && !ch->cw_unref) {
        ev_unref(loop);
        ch->cw_unref = 1;
    }
}

/* Pushes what process.wait returns for an exited child; returns the count. */
static int push_status(lua_State *L, int status)
{
    if (WIFEXITED(status)) {
        lua_pushinteger(L, WEXITSTATUS(status));
        return 1;
    }
    luaL_pushfail(L);
    lua_pushliteral(L, "signal");
    lua_pushstring(L, sig_name(WIFSIGNALED(status) ? WTERMSIG(status) : 0));
    return 3;
}

static void waiter_free(proc_waiter *w)
{
    proc_state *st = w->child->st;
    *w->pprev = w->next;
    if (w->next) w->next->pprev = w->pprev;
    child_ref_update(w->child, 0);
    ev_timer_stop(st->rt->loop, &w->timer);
    st->waiting--;
    free(w);
}

/* The child exited: every waiter gets its status, and the record goes. */
static void child_exited(proc_child *ch, int status)
{
    proc_state *st = ch->st;
    ch->exited = 1;
    ch->status = status;
    child_ref_update(ch, 1);
    if (ev_is_active(&ch->cw)) ev_child_stop(st->rt->loop, &ch->cw);
    if (!ch->waiters) return; /* kept for the next wait */
    while (ch->waiters) {
        proc_waiter *w = ch->waiters;
        aiorch_task *t = w->task;
        lua_State *co = aiorch_task_thread(t);
        waiter_free(w);
        lua_checkstack(co, 3);
        aiorch_task_wake(t, push_status(co, status));
    }
    child_unlink(ch);
    free(ch);
    chld_watch_update(st);
}

static void chld_check(proc_state *st)
{
    proc_child *ch = st->children, *next;
    for (; ch; ch = next) {
        int status;
        pid_t r;
        next = ch->next;
        if (ch->exited) continue;
        do
            r = waitpid(ch->pid, &status, WNOHANG);
        while (r < 0 && errno == EINTR);
        if (r == ch->pid && (WIFEXITED(status) || WIFSIGNALED(status)))
            child_exited(ch, status);
        else if (r < 0 && errno == ECHILD) /* reaped by someone else: status lost */
            child_exited(ch, 0xff00);
    }
}

/* ev_child (default loop only) */
static void child_on_exit(struct ev_loop *loop, ev_child *w, int revents)
{
    proc_child *ch = w->data;
    aiorch_runtime *rt = ch->st->rt;
    (void)loop;
    (void)revents;
    if (WIFEXITED(w->rstatus) || WIFSIGNALED(w->rstatus)) child_exited(ch, w->rstatus);
    aiorch_sched_drain(rt);
}

/* Finds the program the way execvp would, in the parent (the child must
 * only make async-signal-safe calls: curl may run resolver threads). */
static char *find_program(const char *file)
{
    const char *path = getenv("PATH"), *p;
    size_t fl = strlen(file);
    if (strchr(file, '/')) return strdup(file);
    if (!path || !*path) path = "/usr/local/bin:/usr/bin:/bin";
    for (p = path;; p++) {
        const char *e = strchr(p, ':');
        size_t dl = e ? (size_t)(e - p) : strlen(p);
        char *full = malloc(dl + fl + 3);
        if (!full) return NULL;
        if (dl == 0)
            memcpy(full, ".", 2), dl = 1;
        else
            memcpy(full, p, dl);
        full[dl] = '/';
        memcpy(full + dl + 1, file, fl + 1);
        if (access(full, X_OK) == 0) return full;
        free(full);
        if (!e) break;
        p = e;
    }
    return strdup(file); /* execve reports ENOENT */
}

/* Closes every descriptor from lo up, except the n in keep (ascending). */
static void close_from(int lo, const int *keep, int n)
{
    int i;
#ifdef __linux__
    int from = lo, ok = 1;
    for (i = 0; i < n; i++) {
        if (keep[i] < from) continue;
        if (keep[i] > from && close_range((unsigned)from, (unsigned)keep[i] - 1, 0) < 0) ok = 0;
        from = keep[i] + 1;
    }
    if (ok && close_range((unsigned)from, ~0U, 0) == 0) return;
#endif
    { /* one by one (no close_range) */
        long max = sysconf(_SC_OPEN_MAX), fd;
        if (max < 0 || max > 65536) max = 65536;
        for (fd = lo; fd < max; fd++) {
            for (i = 0; i < n && keep[i] != fd; i++) {
            }
            if (i == n) close((int)fd);
        }
    }
}

/* Opens a stdout/stderr redirection file; -1 with errno on failure. */
static int open_out(const char *path)
{
    return open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

#define SPAWN_PASS_MAX 16

/* Everything spawn needs, built before the fork. Freed by spawn_free. */
typedef struct spawn_args {
    char *prog;
    char **argv, **envp;
    int nenv_own; /* envp[0..nenv_own) were allocated here */
    int out_fd, err_fd;
    int death_sig; /* sent to the child when we die (0: none) */
    pid_t parent;
    int pass[SPAWN_PASS_MAX]; /* descriptors the child keeps (opts.pass_fds) */
    int npass;
} spawn_args;

static int spawn_free_ud(lua_State *L)
{
    spawn_args *a = lua_touserdata(L, 1);
    int i;
    free(a->prog);
    if (a->argv) {
        for (i = 0; a->argv[i]; i++)
            free(a->argv[i]);
        free(a->argv);
    }
    if (a->envp) {
        for (i = 0; i < a->nenv_own; i++)
            free(a->envp[i]);
        free(a->envp);
    }
    if (a->out_fd >= 0) close(a->out_fd);
    if (a->err_fd >= 0) close(a->err_fd);
    memset(a, 0, sizeof *a);
    a->out_fd = a->err_fd = -1;
    return 0;
}

static char *dup_or_raise(lua_State *L, const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (!p) luaL_error(L, "out of memory");
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* Whether environment entry e ("NAME=value") is overridden by the env table at idx. */
static int env_overridden(lua_State *L, int idx, const char *e)
{
    const char *eq = strchr(e, '=');
    int t;
    if (!eq) return 0;
    lua_pushlstring(L, e, (size_t)(eq - e));
    t = lua_rawget(L, idx);
    lua_pop(L, 1);
    return t != LUA_TNIL;
}

/* envp = the current environment with the table at idx applied
 * (a string sets, false removes). */
static void build_env(lua_State *L, spawn_args *a, int idx)
{
    size_t n = 0, extra = 0, k = 0;
    char **ep;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t nl;
        const char *name;
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "process.spawn: env names must be strings");
        name = lua_tolstring(L, -2, &nl);
        if (nl == 0 || strchr(name, '=') || strlen(name) != nl)
            luaL_error(L, "process.spawn: bad env name '%s'", name);
        if (!(lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER ||
              (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1))))
            luaL_error(L, "process.spawn: env value of '%s' must be a string or false", name);
        extra++;
        lua_pop(L, 1);
    }
    for (ep = environ; ep && *ep; ep++)
        n++;
    a->envp = calloc(n + extra + 1, sizeof *a->envp);
    if (!a->envp) luaL_error(L, "out of memory");
    /* Our own strings first, so that spawn_free knows which to free. */
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -1) != LUA_TBOOLEAN) {
            size_t nl, vl;
            const char *name = lua_tolstring(L, -2, &nl);
            const char *val = lua_tolstring(L, -1, &vl);
            char *e = malloc(nl + vl + 2);
            if (!e) luaL_error(L, "out of memory");
            memcpy(e, name, nl);
            e[nl] = '=';
            memcpy(e + nl + 1, val, vl + 1);
            a->envp[k++] = e;
            a->nenv_own = (int)k;
        }
        lua_pop(L, 1);
    }
    for (ep = environ; ep && *ep; ep++)
        if (!env_overridden(L, idx, *ep)) a->envp[k++] = *ep;
    a->envp[k] = NULL;
}

/* In the child, between fork and exec: async-signal-safe calls only. */
static void child_exec(const spawn_args *a, int errfd)
{
    sigset_t none;
    struct sigaction dfl;
    int e, i, keep[SPAWN_PASS_MAX + 1], nkeep = 0;
    /* libev may block signals (signalfd), and ignored ones stay ignored
     * across exec: the program starts with the defaults. */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (i = 1; i < NSIG; i++)
        if (i != SIGKILL && i != SIGSTOP) sigaction(i, &dfl, NULL);
#ifdef __linux__
    if (a->death_sig) {
        if (prctl(PR_SET_PDEATHSIG, a->death_sig) < 0) goto fail;
        if (getppid() != a->parent) _exit(127); /* we died before the prctl */
    }
#endif
    if (a->out_fd >= 0 && dup2(a->out_fd, 1) < 0) goto fail;
    if (a->err_fd >= 0 && dup2(a->err_fd, 2) < 0) goto fail;
    /* No descriptor of ours leaks into the program but those it is passed. */
    for (i = 0; i < a->npass; i++) {
        if (fcntl(a->pass[i], F_SETFD, 0) < 0) goto fail;
        keep[nkeep++] = a->pass[i];
    }
    keep[nkeep++] = errfd;
    for (i = 1; i < nkeep; i++) { /* ascending (insertion sort: no allocation here) */
        int v = keep[i], j = i;
        for (; j > 0 && keep[j - 1] > v; j--)
            keep[j] = keep[j - 1];
        keep[j] = v;
    }
    close_from(3, keep, nkeep);
    execve(a->prog, a->argv, a->envp);
fail:
    e = errno;
    while (write(errfd, &e, sizeof e) < 0 && errno == EINTR) {
    }
    _exit(127);
}

/* aiorch.process.spawn(argv[, {env=, stdout=, stderr=}]) → pid | nil, "spawn", message */
static int l_spawn(lua_State *L)
{
    proc_state *st;
    spawn_args *a;
    lua_Integer i, argc;
    int pfd[2], e = 0;
    ssize_t r;
    pid_t pid;
    proc_child *ch;

    luaL_checktype(L, 1, LUA_TTABLE);
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    argc = luaL_len(L, 1);
    luaL_argcheck(L, argc >= 1, 1, "argv must list at least the program");
    st = state_get(L);
    a = lua_newuserdatauv(L, sizeof *a, 0); /* 3: freed by its __close */
    memset(a, 0, sizeof *a);
    a->out_fd = a->err_fd = -1;
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, spawn_free_ud);
    lua_setfield(L, -2, "__close");
    lua_setmetatable(L, 3);
    lua_toclose(L, 3);

    a->argv = calloc((size_t)argc + 1, sizeof *a->argv);
    if (!a->argv) return luaL_error(L, "out of memory");
    for (i = 1; i <= argc; i++) {
        size_t n;
        const char *s;
        int t = lua_rawgeti(L, 1, i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            return luaL_argerror(L, 1, lua_pushfstring(L, "argv[%d] must be a string", (int)i));
        s = lua_tolstring(L, -1, &n);
        if (strlen(s) != n) return luaL_argerror(L, 1, "argv strings must not hold NUL bytes");
        a->argv[i - 1] = dup_or_raise(L, s, n);
        lua_pop(L, 1);
    }
    a->prog = find_program(a->argv[0]);
    if (!a->prog) return luaL_error(L, "out of memory");
    if (lua_istable(L, 2)) {
        static const char *const known[] = {"env",          "stdout",   "stderr",
                                            "death_signal", "pass_fds", NULL};
        lua_pushnil(L);
        while (lua_next(L, 2)) {
            const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
            int j = 0;
            while (k && known[j] && strcmp(k, known[j]) != 0)
                j++;
            if (!k || !known[j])
                return luaL_argerror(L, 2, lua_pushfstring(L, "unknown option '%s'", k ? k : "?"));
            lua_pop(L, 1);
        }
        if (lua_getfield(L, 2, "death_signal") != LUA_TNIL) {
            a->death_sig = sig_check(L, lua_gettop(L));
            a->parent = getpid();
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 2, "pass_fds") != LUA_TNIL) {
            lua_Integer n, j;
            luaL_argcheck(L, lua_istable(L, -1), 2, "'pass_fds' must be a list of descriptors");
            n = luaL_len(L, -1);
            luaL_argcheck(L, n <= SPAWN_PASS_MAX, 2, "'pass_fds' lists at most 16 descriptors");
            for (j = 1; j <= n; j++) {
                int isnum;
                lua_Integer fd = (lua_rawgeti(L, -1, j), lua_tointegerx(L, -1, &isnum));
                lua_pop(L, 1);
                if (!isnum || fd < 3 || fd > INT32_MAX || fcntl((int)fd, F_GETFD) < 0)
                    return luaL_argerror(
                        L, 2,
                        lua_pushfstring(L, "pass_fds[%d]: not an open descriptor >= 3", (int)j));
                a->pass[a->npass++] = (int)fd;
            }
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 2, "env") != LUA_TNIL) {
            luaL_argcheck(L, lua_istable(L, -1), 2, "'env' must be a table");
            build_env(L, a, lua_gettop(L));
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 2, "stdout") != LUA_TNIL) {
            luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2, "'stdout' must be a file name");
            if ((a->out_fd = open_out(lua_tostring(L, -1))) < 0) e = errno;
        }
        lua_pop(L, 1);
        if (!e && lua_getfield(L, 2, "stderr") != LUA_TNIL) {
            luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2, "'stderr' must be a file name");
            if ((a->err_fd = open_out(lua_tostring(L, -1))) < 0) e = errno;
        }
        lua_pop(L, 1);
        if (e) {
            luaL_pushfail(L);
            lua_pushliteral(L, "spawn");
            lua_pushfstring(L, "cannot open output file: %s", strerror(e));
            return 3;
        }
    }
    ch = calloc(1, sizeof *ch);
    if (!ch) return luaL_error(L, "out of memory");
    /* The child reports a failed exec on this pipe; EOF means it ran. */
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        e = errno;
        free(ch);
        return luaL_error(L, "process.spawn: pipe: %s", strerror(e));
    }
    /* Listed (pid 0: skipped by chld_check) before the fork, so that the
     * SIGCHLD watcher is on when a quick child exits. */
    ch->st = st;
    ch->exited = 1;
    ch->next = st->children;
    if (ch->next) ch->next->pprev = &ch->next;
    ch->pprev = &st->children;
    st->children = ch;
    chld_watch_update(st);
    pid = fork();
    if (pid == 0) child_exec(a, pfd[1]);
    e = errno;
    close(pfd[1]);
    if (pid < 0) {
        close(pfd[0]);
        child_unlink(ch);
        free(ch);
        chld_watch_update(st);
        luaL_pushfail(L);
        lua_pushliteral(L, "spawn");
        lua_pushfstring(L, "fork: %s", strerror(e));
        return 3;
    }
    ch->pid = pid;
    ch->exited = 0;
    do
        r = read(pfd[0], &e, sizeof e);
    while (r < 0 && errno == EINTR);
    close(pfd[0]);
    if (r == (ssize_t)sizeof e) {
        /* exec failed: the child is gone already; reap it quietly */
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        child_unlink(ch);
        free(ch);
        chld_watch_update(st);
        luaL_pushfail(L);
        lua_pushliteral(L, "spawn");
        lua_pushfstring(L, "%s: %s", a->argv[0], strerror(e));
        return 3;
    }
    if (ev_is_default_loop(st->rt->loop)) {
        ev_child_init(&ch->cw, child_on_exit, pid, 0);
        ch->cw.data = ch;
        ev_child_start(st->rt->loop, &ch->cw);
        child_ref_update(ch, 0);
    }
    chld_watch_update(st);
    lua_pushinteger(L, pid);
    return 1;
}

static pid_t pid_check(lua_State *L, int idx)
{
    lua_Integer pid = luaL_checkinteger(L, idx);
    luaL_argcheck(L, pid > 0 && pid <= INT32_MAX, idx, "pid must be a positive process id");
    return (pid_t)pid;
}

/* aiorch.process.kill(pid, signame) → true | nil, kind, message */
static int l_kill(lua_State *L)
{
    pid_t pid = pid_check(L, 1);
    int sig = sig_check(L, 2);
    proc_state *st = state_get(L);
    proc_child *ch = child_find(st, pid);

    if (ch && ch->exited) { /* reaped: the pid may belong to someone else now */
        luaL_pushfail(L);
        lua_pushliteral(L, "exited");
        lua_pushliteral(L, "the process has exited");
        return 3;
    }
    if (kill(pid, sig) < 0) {
        int e = errno;
        luaL_pushfail(L);
        lua_pushstring(L, e == ESRCH ? "no_process" : e == EPERM ? "permission" : "kill");
        lua_pushstring(L, strerror(e));
        return 3;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* aiorch_op.cancel of process.wait: forget the waiter; the child stays known */
static void wait_cancel(aiorch_op *op)
{
    proc_waiter *w = (proc_waiter *)op;
    proc_state *st = w->child->st;
    waiter_free(w);
    chld_watch_update(st);
}

/* ev_timer: process.wait's deadline */
static void wait_on_timeout(struct ev_loop *loop, ev_timer *tw, int revents)
{
    proc_waiter *w = tw->data;
    proc_state *st = w->child->st;
    aiorch_task *t = w->task;
    lua_State *co = aiorch_task_thread(t);
    (void)loop;
    (void)revents;
    waiter_free(w);
    chld_watch_update(st);
    lua_checkstack(co, 3);
    luaL_pushfail(co);
    lua_pushliteral(co, "timeout");
    lua_pushliteral(co, WAIT_TIMEOUT);
    aiorch_task_wake(t, 3);
    aiorch_sched_drain(st->rt);
}

static double timeout_arg(lua_State *L, int idx)
{
    double ms;
    if (lua_isnoneornil(L, idx)) return -1;
    ms = luaL_checknumber(L, idx);
    luaL_argcheck(L, ms >= 0, idx, "timeout must be >= 0 ms");
    return ms;
}

/* aiorch.process.wait(pid[, timeout_ms]) → code | nil, "signal", name | nil, "timeout", message */
static int l_wait(lua_State *L)
{
    pid_t pid = pid_check(L, 1);
    double ms = timeout_arg(L, 2);
    proc_state *st = state_get(L);
    proc_child *ch = child_find(st, pid);
    aiorch_task *t;
    proc_waiter *w;

    if (!ch)
        return luaL_argerror(L, 1, "not a child spawned by this runtime (or already waited for)");
    if (!ch->exited && !ev_is_default_loop(st->rt->loop))
        chld_check(st); /* a SIGCHLD not seen yet */
    if (ch->exited) {
        int status = ch->status;
        child_unlink(ch);
        free(ch);
        chld_watch_update(st);
        return push_status(L, status);
    }
    t = aiorch_task_check(L, "process.wait");
    if (ms == 0) {
        luaL_pushfail(L);
        lua_pushliteral(L, "timeout");
        lua_pushliteral(L, WAIT_TIMEOUT);
        return 3;
    }
    w = calloc(1, sizeof *w);
    if (!w) return luaL_error(L, "out of memory");
    w->op.cancel = wait_cancel;
    w->task = t;
    w->child = ch;
    w->next = ch->waiters;
    if (w->next) w->next->pprev = &w->next;
    w->pprev = &ch->waiters;
    ch->waiters = w;
    child_ref_update(ch, 0);
    st->waiting++;
    ev_timer_init(&w->timer, wait_on_timeout, ms / 1000.0, 0.);
    w->timer.data = w;
    if (ms > 0) {
        ev_now_update(st->rt->loop);
        ev_timer_start(st->rt->loop, &w->timer);
    }
    chld_watch_update(st);
    aiorch_task_wait(t, &w->op);
    return lua_yield(L, 0);
}

/* aiorch.process.pid() */
static int l_pid(lua_State *L)
{
    lua_pushinteger(L, getpid());
    return 1;
}

/* aiorch.process.exe(): the running program's path (Linux), or nil */
static int l_exe(lua_State *L)
{
    char buf[4096];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0) return 0;
    lua_pushlstring(L, buf, (size_t)n);
    return 1;
}

/* ---- signals ---------------------------------------------------------- */

static void sig_ref_update(sig_watch *sw)
{
    struct ev_loop *loop = sw->st->rt->loop;
    if (!ev_is_active(&sw->w)) return;
    if (sw->waiters && sw->unref) {
        ev_ref(loop);
        sw->unref = 0;
    } else if (!sw->waiters && !sw->unref) {
        ev_unref(loop); /* a caught signal alone does not keep the loop alive */
        sw->unref = 1;
    }
}

static void sig_waiter_free(sig_waiter *w)
{
    int i;
    for (i = 0; i < w->n; i++) {
        sig_node *nd = &w->nodes[i];
        *nd->pprev = nd->next;
        if (nd->next) nd->next->pprev = nd->pprev;
        sig_ref_update(nd->watch);
    }
    ev_timer_stop(w->nodes[0].watch->st->rt->loop, &w->timer);
    free(w);
}

/* ev_signal: a watched signal arrived; the oldest waiter gets it */
static void sig_on_signal(struct ev_loop *loop, ev_signal *ew, int revents)
{
    sig_watch *sw = ew->data;
    aiorch_runtime *rt = sw->st->rt;
    (void)loop;
    (void)revents;
    if (!sw->waiters) {
        sw->pending = 1;
        return;
    }
    {
        sig_node *nd = sw->waiters;
        while (nd->next) /* the list is newest first */
            nd = nd->next;
        sig_waiter *w = nd->w;
        aiorch_task *t = w->task;
        lua_State *co = aiorch_task_thread(t);
        sig_waiter_free(w);
        lua_checkstack(co, 1);
        lua_pushstring(co, sig_name(sw->signum));
        aiorch_task_wake(t, 1);
    }
    aiorch_sched_drain(rt);
}

/* aiorch_op.cancel of signal.wait; the signals stay caught */
static void sig_wait_cancel(aiorch_op *op)
{
    sig_waiter_free((sig_waiter *)op);
}

/* ev_timer: signal.wait's deadline */
static void sig_on_timeout(struct ev_loop *loop, ev_timer *tw, int revents)
{
    sig_waiter *w = tw->data;
    aiorch_runtime *rt = w->nodes[0].watch->st->rt;
    aiorch_task *t = w->task;
    lua_State *co = aiorch_task_thread(t);
    (void)loop;
    (void)revents;
    sig_waiter_free(w);
    lua_checkstack(co, 3);
    luaL_pushfail(co);
    lua_pushliteral(co, "timeout");
    lua_pushliteral(co, SIG_TIMEOUT);
    aiorch_task_wake(t, 3);
    aiorch_sched_drain(rt);
}

static sig_watch *sig_watch_get(lua_State *L, proc_state *st, int signum)
{
    sig_watch *sw;
    for (sw = st->sigs; sw; sw = sw->next)
        if (sw->signum == signum) return sw;
    sw = calloc(1, sizeof *sw);
    if (!sw) luaL_error(L, "out of memory");
    sw->st = st;
    sw->signum = signum;
    ev_signal_init(&sw->w, sig_on_signal, signum);
    sw->w.data = sw;
    ev_signal_start(st->rt->loop, &sw->w);
    ev_unref(st->rt->loop);
    sw->unref = 1;
    sw->next = st->sigs;
    st->sigs = sw;
    return sw;
}

/* Collects the signal numbers named at idx (a name or a list) into sigs. */
static int sig_list(lua_State *L, int idx, int *sigs, int max)
{
    int n = 0, i, j;
    if (lua_type(L, idx) == LUA_TTABLE) {
        lua_Integer len = luaL_len(L, idx);
        luaL_argcheck(L, len >= 1 && len <= max, idx, "list 1 to 16 signal names");
        for (i = 1; i <= (int)len; i++) {
            lua_rawgeti(L, idx, i);
            sigs[n++] = sig_check(L, lua_gettop(L));
            lua_pop(L, 1);
        }
    } else {
        sigs[n++] = sig_check(L, idx);
    }
    for (i = 0; i < n; i++) {
        if (sigs[i] == SIGKILL || sigs[i] == SIGSTOP)
            luaL_argerror(L, idx, "SIGKILL and SIGSTOP cannot be caught");
        if (sigs[i] == SIGCHLD) luaL_argerror(L, idx, "SIGCHLD belongs to aiorch.process");
        for (j = 0; j < i; j++)
            if (sigs[j] == sigs[i]) luaL_argerror(L, idx, "a signal is listed twice");
    }
    return n;
}

/* aiorch.signal.wait(name_or_list[, timeout_ms]) → name | nil, "timeout", message */
static int l_sig_wait(lua_State *L)
{
    int sigs[16], n, i;
    double ms = timeout_arg(L, 2);
    proc_state *st;
    aiorch_task *t;
    sig_waiter *w;

    n = sig_list(L, 1, sigs, 16);
    t = aiorch_task_check(L, "signal.wait");
    st = state_get(L);
    for (i = 0; i < n; i++) {
        sig_watch *sw = sig_watch_get(L, st, sigs[i]);
        if (sw->pending) { /* arrived while nobody waited */
            sw->pending = 0;
            lua_pushstring(L, sig_name(sigs[i]));
            return 1;
        }
    }
    if (ms == 0) {
        luaL_pushfail(L);
        lua_pushliteral(L, "timeout");
        lua_pushliteral(L, SIG_TIMEOUT);
        return 3;
    }
    w = calloc(1, sizeof *w + (size_t)n * sizeof(sig_node));
    if (!w) return luaL_error(L, "out of memory");
    w->op.cancel = sig_wait_cancel;
    w->task = t;
    w->n = n;
    for (i = 0; i < n; i++) {
        sig_node *nd = &w->nodes[i];
        sig_watch *sw = sig_watch_get(L, st, sigs[i]);
        nd->w = w;
        nd->watch = sw;
        nd->next = sw->waiters;
        if (nd->next) nd->next->pprev = &nd->next;
        nd->pprev = &sw->waiters;
        sw->waiters = nd;
        sig_ref_update(sw);
    }
    ev_timer_init(&w->timer, sig_on_timeout, ms / 1000.0, 0.);
    w->timer.data = w;
    if (ms > 0) {
        ev_now_update(st->rt->loop);
        ev_timer_start(st->rt->loop, &w->timer);
    }
    aiorch_task_wait(t, &w->op);
    return lua_yield(L, 0);
}

/* aiorch.signal.reset(name): gives the signal its default action back */
static int l_sig_reset(lua_State *L)
{
    int signum = sig_check(L, 1);
    proc_state *st = state_get(L);
    sig_watch **p = &st->sigs, *sw;
    for (; (sw = *p); p = &sw->next) {
        if (sw->signum != signum) continue;
        if (sw->waiters)
            return luaL_error(L, "signal.reset: a task waits for %s", sig_name(signum));
        *p = sw->next;
        sig_watch_stop(sw);
        free(sw);
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushboolean(L, 0);
    return 1;
}

static const luaL_Reg process_funcs[] = {
    {"spawn", l_spawn}, {"kill", l_kill}, {"wait", l_wait},
    {"pid", l_pid},     {"exe", l_exe},   {NULL, NULL},
};

static const luaL_Reg signal_funcs[] = {
    {"wait", l_sig_wait},
    {"reset", l_sig_reset},
    {NULL, NULL},
};

void aiorch_process_open(aiorch_runtime *rt, lua_State *L)
{
    lua_createtable(L, 0, 5);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, process_funcs, 1);
    lua_setfield(L, -2, "process");
    lua_createtable(L, 0, 2);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, signal_funcs, 1);
    lua_setfield(L, -2, "signal");
}
