/* aiorch: embeddable orchestrator for calls to AI providers.
 *
 * One runtime = one lua_State + one libev loop. The host may pass its own
 * loop (and drive it with ev_run) or let the runtime create one. Nothing
 * here is process-global, so several runtimes can live in one process. */
#ifndef AIORCH_H
#define AIORCH_H

#include <stddef.h>

struct ev_loop;
struct lua_State;

#ifdef __cplusplus
extern "C" {
#endif

#define AIORCH_VERSION "0.1.0"

typedef struct aiorch_runtime aiorch_runtime;

/* Called with each error that no Lua code caught (a failed task that
 * nobody awaited, a failing handler). The default prints to stderr. */
typedef void (*aiorch_error_fn)(void *ud, const char *message);

typedef struct aiorch_options {
    struct ev_loop *loop;     /* NULL: the runtime makes and owns one */
    const char *root;         /* holds scripts/ and strategies/; NULL: built-in */
    const char *user_path;    /* ':'-separated user dirs searched first; NULL: $AIORCH_PATH */
    long instruction_budget;  /* Lua instructions a task may run without yielding; 0: default */
    aiorch_error_fn on_error;
    void *error_ud;
} aiorch_options;

/* Returns NULL on failure (and prints why to stderr). opts may be NULL. */
aiorch_runtime *aiorch_runtime_new(const aiorch_options *opts);

/* Cancels every task, aborts every transfer, closes every socket, and frees
 * the Lua state and, when the runtime made it, the loop. */
void aiorch_runtime_free(aiorch_runtime *rt);

struct lua_State *aiorch_runtime_lua(aiorch_runtime *rt);
struct ev_loop *aiorch_runtime_loop(aiorch_runtime *rt);
const char *aiorch_runtime_root(aiorch_runtime *rt); /* holds scripts/ and strategies/ */

/* Loads a Lua file and starts it as a task with the given arguments. It
 * runs until its first yield; the host's loop does the rest. Returns 0, or
 * -1 with the reason in aiorch_runtime_error(). */
int aiorch_runtime_start(aiorch_runtime *rt, const char *path, int argc, char **argv);

/* 1 while the task started last is still running. */
int aiorch_runtime_busy(aiorch_runtime *rt);

/* Starts the file as the main task and runs the loop until it ends.
 * Returns the process exit status the script asks for: its first return
 * value when it is an integer, 0 when it returns nothing, 1 when it failed. */
int aiorch_runtime_run(aiorch_runtime *rt, const char *path, int argc, char **argv);

/* The last error message of start/run, or "" */
const char *aiorch_runtime_error(aiorch_runtime *rt);

#ifdef __cplusplus
}
#endif

#endif
