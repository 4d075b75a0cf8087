/* aiorch: embeddable orchestrator for calls to AI providers.
 *
 * One runtime = one lua_State + one libev loop. Nothing here is
 * process-global: several runtimes can live in one process, and each thread
 * may have its own (a runtime, and everything it hands out, belongs to one
 * thread at a time). A host drives a runtime in one of four ways:
 *
 *   - its own loop: aiorch_runtime_wait() runs it until every job ended;
 *   - the host's libev loop (opts.loop): the host's ev_run drives it;
 *   - any other loop (libuv, epoll, kqueue; opts.pollable = 1): the host
 *     watches aiorch_runtime_fd() for reading and calls
 *     aiorch_runtime_step() when it is readable. Nothing else is needed: no
 *     timer, no socket list (see aiorch_runtime_fd); the runtime's libev
 *     loop waits in a thread of its own;
 *   - the host's own loop, with no thread and no loop of the runtime's
 *     (opts.host): the runtime hands the host each socket to watch and
 *     each timer to arm, and the host calls aiorch_runtime_ready (see
 *     aiorch_host). The nginx module runs this way.
 *
 * Work is submitted as jobs (aiorch_job_submit_*): a Lua file, a Lua chunk,
 * or an orchestration of an AIRequest given as JSON. Each job ends with
 * exactly one call of on_result or on_error, unless the host cancels it.
 *
 * Callbacks run on the thread that drives the runtime, from inside
 * aiorch_runtime_step / aiorch_runtime_wait / the host's ev_run, never from
 * inside a submit call. They may submit and cancel jobs; they may not free
 * the runtime. */
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
typedef struct aiorch_job aiorch_job;

/* ---- a host's own event loop (opts.host) ----
 *
 * In the shape of libcurl's multi_socket interface, one call per watcher:
 * the runtime asks the host to watch a socket, or to arm a timer, naming
 * its watcher; when the socket is ready or the timer is due, the host
 * calls aiorch_runtime_ready(rt, w, events) from its loop. Everything the
 * runtime does (Lua, libcurl, every callback) then runs inside those
 * calls, on the host's thread. Not available to such a runtime: its own
 * HTTP server (aiorch.server; the host serves HTTP, see aiorch_exchange),
 * aiorch.process and aiorch.signal, aiorch_runtime_run/wait/step. */
typedef struct aiorch_watch aiorch_watch;

#define AIORCH_READ 1
#define AIORCH_WRITE 2
#define AIORCH_TIMER 4
#define AIORCH_WEAK 1 /* timer flag: background work; it must not keep the host running */
#define AIORCH_SOON 2 /* timer flag: run it right after the current callback returns */

typedef struct aiorch_host {
    /* Watch fd for events (AIORCH_READ, AIORCH_WRITE or both, reported
     * level-triggered: as long as the socket stays ready), or stop
     * watching it (events 0: the runtime may close the fd next, or keep it
     * for later). *slot is the host's per-watcher data: NULL at first,
     * kept by the runtime. Returns 0, or -1 when the host cannot watch it. */
    int (*io)(void *ud, aiorch_watch *w, int fd, int events, void **slot);
    /* Arm w once, ms milliseconds from now (ms 0: after the host polls
     * again; with AIORCH_SOON: as soon as the current callback returns,
     * before it polls), or disarm it (ms < 0). A timer armed again moves. */
    void (*timer)(void *ud, aiorch_watch *w, long ms, int flags, void **slot);
    /* The runtime is done with a watcher, which is stopped: free *slot. */
    void (*release)(void *ud, void *slot);
    void *ud;
    /* Optional (may be NULL): the runtime closes fd now, a socket it
     * watched before (its watcher is stopped by then). A host that keeps a
     * stopped socket registered, to spare a system call when the socket
     * is watched again (libcurl stops watching a connection it keeps
     * alive, and watches it again for the next request), drops it here;
     * a socket it reports ready meanwhile without a watcher, it drops at
     * once. */
    void (*closing)(void *ud, int fd);
} aiorch_host;

/* Called with each error that no Lua code caught and that belongs to no job
 * (a failed task that nobody awaited, a failing handler). The default
 * prints to stderr. */
typedef void (*aiorch_error_fn)(void *ud, const char *message);

typedef struct aiorch_options {
    struct ev_loop *loop;    /* the host's libev loop; NULL: the runtime makes and owns one */
    int pollable;            /* 1: driven through aiorch_runtime_fd/step (needs loop == NULL) */
    const char *root;        /* holds scripts/ and strategies/; NULL: $AIORCH_ROOT, else found
                                from where the library (or program) is installed */
    const char *user_path;   /* ':'-separated user dirs searched first; NULL: $AIORCH_PATH */
    long instruction_budget; /* Lua instructions a task may run without yielding; 0: default
                                ($AIORCH_INSTRUCTION_BUDGET, else 100 million) */
    aiorch_error_fn on_error;
    void *error_ud;
    const aiorch_host *host; /* the host's loop drives the runtime (copied; needs loop == NULL,
                                pollable == 0) */
} aiorch_options;

/* ---- the runtime ---- */

/* Returns NULL on failure (and prints why to stderr). opts may be NULL. */
aiorch_runtime *aiorch_runtime_new(const aiorch_options *opts);

/* Cancels every job (each one not yet ended gets on_error "cancelled"; one
 * that ended gets its outcome) and every task, aborts every transfer,
 * closes every socket, and frees the Lua state and, when the runtime made
 * it, the loop. May be called at any time, except from a callback. */
void aiorch_runtime_free(aiorch_runtime *rt);

/* The runtime's Lua state, for hosts that add functions of their own. In a
 * pollable runtime use it only from inside a callback: a step holds the
 * lock that keeps the loop thread off the loop's data meanwhile. */
struct lua_State *aiorch_runtime_lua(aiorch_runtime *rt);

/* The runtime's libev loop (the host's, or its own). A pollable runtime's
 * loop belongs to its loop thread: do not run or change it. */
struct ev_loop *aiorch_runtime_loop(aiorch_runtime *rt);

/* The directory holding scripts/ and strategies/: opts.root, else
 * $AIORCH_ROOT, else PREFIX/share/aiorch found from the installed library,
 * program or Lua module, else (a build tree) the source tree. */
const char *aiorch_runtime_root(aiorch_runtime *rt);

/* Runs the runtime until every job has ended and been delivered: on its own
 * loop, on the host's libev loop (running it, other watchers included), or
 * by polling its fd. Returns 0, or -1 when jobs are left that wait for
 * something that can never happen (they are cancelled, with on_error). */
int aiorch_runtime_wait(aiorch_runtime *rt);

/* Jobs submitted and not yet ended (or ended and not yet delivered). */
size_t aiorch_runtime_jobs(aiorch_runtime *rt);

/* ---- foreign loops (opts.pollable = 1) ----
 *
 * libev publishes neither its backend's fd nor its next timer, so the
 * runtime cannot hand out "watch these sockets, wake me at T" without
 * re-implementing libev. Instead its libev loop waits in a thread of its
 * own (libev's documented "thread locking" pattern): when anything is ready
 * (a socket, a timer, a submitted job) that thread makes the fd readable
 * and waits; every callback then runs on the host's thread, inside
 * aiorch_runtime_step. The host needs one fd and no timer: a uv_poll_t, an
 * epoll or kqueue entry. A host that wants no thread at all hands out its
 * own sockets and timers instead (opts.host). */

/* The fd to watch for reading (level- or edge-triggered both work), or -1
 * when the runtime is not pollable. Do not read or close it. */
int aiorch_runtime_fd(aiorch_runtime *rt);

/* Runs everything that is ready, then returns; never blocks. Call it when
 * the fd is readable (a call at any other time is harmless). Without
 * opts.pollable it runs one non-blocking pass of the runtime's loop. */
void aiorch_runtime_step(aiorch_runtime *rt);

/* A host's socket or timer of watcher w is ready (events: AIORCH_READ,
 * AIORCH_WRITE, AIORCH_TIMER): the runtime runs what it was waiting for.
 * Only for a watcher the runtime has not stopped since. */
void aiorch_runtime_ready(aiorch_runtime *rt, aiorch_watch *w, int events);

/* ---- jobs ---- */

/* How a job reports. Each pointer may be NULL. The strings are valid only
 * during the call; json is NUL-terminated and len is its length. */
typedef struct aiorch_job_callbacks {
    /* Once, on success: the job's result as JSON. */
    void (*on_result)(void *ud, const char *json, size_t len);
    /* Once, on failure. kind is a stable word: "error" (the Lua code
     * raised; message is the error), "load" (the code or the scripts could
     * not be loaded), "invalid" (a bad request, naming the field), "encode"
     * (the result has no JSON form), "cancelled" (the runtime was freed, or
     * Lua code cancelled the task), or the kind the job returned. */
    void (*on_error)(void *ud, const char *kind, const char *message);
    /* Zero or more times before on_result, while the job runs: a stream
     * event as JSON (orchestrations only, see aiorch_job_submit_orchestration). */
    void (*on_event)(void *ud, const char *json, size_t len);
    void *ud;
} aiorch_job_callbacks;

/* Runs a Lua file as a task with argv[0..argc-1] as its arguments (`...`).
 * The result is the file's first return value encoded as JSON (nil is
 * "null"); a return of nil, kind, message is a failure (on_error(kind,
 * message)). Returns the job, or NULL when the runtime refuses any job
 * (it is being freed, out of memory; see aiorch_runtime_error). Nothing of
 * the job runs inside this call: a file that cannot be loaded, or that
 * raises at once, reports through on_error like any other failure.
 *
 * The job handle stays valid until its on_result or on_error returns, or
 * until aiorch_job_cancel; the runtime frees it. cb is copied. */
aiorch_job *aiorch_job_submit_file(aiorch_runtime *rt, const char *path, int argc,
                                   const char *const *argv, const aiorch_job_callbacks *cb);

/* The same for a chunk of Lua source (len bytes; name names it in errors,
 * NULL: "=job"). */
aiorch_job *aiorch_job_submit_chunk(aiorch_runtime *rt, const char *code, size_t len,
                                    const char *name, int argc, const char *const *argv,
                                    const aiorch_job_callbacks *cb);

/* Orchestrates an AIRequest given as a JSON object (user_question, context,
 * messages, temperature, max_tokens, ...) with a strategy (NULL: "fallback")
 * over providers ("openai,anthropic"; NULL: every available one, in
 * priority order), as `aiorch ask` does. on_result gets the
 * StandardAIResponse (a JSON array of them for "parallel"); a request
 * refused before any call is on_error("invalid", message naming the field).
 * With on_event, the answer streams: each event of the provider that owns
 * the stream, e.g. {"type":"text","text":"Hel","provider":"openai"} (see
 * docs/canonical.md, "Stream events"). Providers, keys and base URLs come
 * from the environment (OPENAI_API_KEY, OPENAI_BASE_URL, ...). */
aiorch_job *aiorch_job_submit_orchestration(aiorch_runtime *rt, const char *request_json,
                                            const char *strategy, const char *providers,
                                            const aiorch_job_callbacks *cb);

/* Ends a job now: its task and transfers are cancelled and no callback of
 * it is called any more; the handle is freed. A no-op from inside the
 * job's own on_result or on_error. May be called from any callback. */
void aiorch_job_cancel(aiorch_job *job);

/* ---- serving HTTP: a request object and a response writer ----
 *
 * A handler is Lua code that answers HTTP requests: handler(req, res), with
 * req a table (method, path, headers in lower case, body, id, received_at)
 * and res a response writer (res:start, res:write with backpressure,
 * res:finish, res:respond, res:abort; docs/lua-api.md). It does not know
 * who serves the connection: the runtime's own HTTP/1.1 server
 * (aiorch.server, `aiorch serve`), or a host's, such as the nginx module,
 * which hands each request over with these calls and writes what the
 * handler answers through its sink. */

typedef struct aiorch_handler aiorch_handler;
typedef struct aiorch_exchange aiorch_exchange;

typedef struct aiorch_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
} aiorch_header;

/* A request as the host read it (the body comes later). */
typedef struct aiorch_http_request {
    const char *method; /* "GET", "POST", ... (NUL-terminated) */
    const char *target; /* the path and query, as sent */
    size_t target_len;
    const aiorch_header *headers; /* as sent: the handler sees the names in lower
                                     case, and a repeated one's values joined by ", " */
    size_t nheaders;
} aiorch_http_request;

/* The head of a response, as the handler made it. */
typedef struct aiorch_http_response {
    int status;                   /* 100..999 */
    const aiorch_header *headers; /* checked: names are tokens, values hold no CR, LF or
                                     NUL; never content-length, transfer-encoding, connection */
    size_t nheaders;
    long long length; /* the body's length, or -1: not known, the body streams */
    int close;        /* the handler asked for the connection to close after it */
} aiorch_http_response;

/* Where the handler's answer goes: the host's. A response is head(), then
 * body() calls, the last one with last = 1, or abort() at any point. After
 * body(last) or abort() the runtime never calls the sink for that exchange
 * again, and the exchange handle is no longer the host's to use. Strings
 * live for the call only. */
typedef struct aiorch_http_sink {
    /* The status and headers. Returns 0, or -1 when the client is gone. */
    int (*head)(void *ud, const aiorch_http_response *res);
    /* Body bytes (len may be 0); last: the body ends with them. Returns the
     * bytes the host still holds unsent for this client, or -1 when it is
     * gone. Above AIORCH_HTTP_BACKLOG the handler's writes wait until the
     * host calls aiorch_exchange_writable. For a HEAD request, and a status
     * without a body, the runtime sends no body bytes. */
    long (*body)(void *ud, const char *data, size_t len, int last);
    /* Cuts the response short: the client must not take it as complete. */
    void (*abort)(void *ud);
} aiorch_http_sink;

/* Unsent bytes per client beyond which a handler's res:write waits. */
#define AIORCH_HTTP_BACKLOG (64 * 1024)

/* Loads a Lua file that returns a handler: a function(req, res), or a
 * table {handler = function(req, res), on_headers = function(req),
 * on_refuse = function(status, req), max_body = bytes} (the hooks as
 * aiorch.server.listen takes them). It runs at once (not as a task: it must
 * not yield) with argv as `...`. Returns NULL with the reason in
 * aiorch_runtime_error. The runtime frees its handlers with it. */
aiorch_handler *aiorch_handler_load(aiorch_runtime *rt, const char *path, int argc,
                                    const char *const *argv);

/* The handler's max_body (0: none given): the host refuses a larger body
 * with aiorch_exchange_refuse(x, 413). */
size_t aiorch_handler_max_body(const aiorch_handler *h);

/* A request whose headers are in. Runs the handler's on_headers, which may
 * answer at once (authentication, before any of the body is read): then
 * the whole answer has gone through the sink, inside this call, and NULL
 * is returned; the host reads no body. NULL is also returned, after a 500
 * through the sink, when the runtime is out of memory. Otherwise returns
 * the exchange: read the body, then call aiorch_exchange_start. */
aiorch_exchange *aiorch_exchange_open(aiorch_handler *h, const aiorch_http_request *req,
                                      const aiorch_http_sink *sink, void *ud);

/* The body is in (len bytes, copied): the handler runs, from the loop (not
 * inside this call), and answers through the sink. */
void aiorch_exchange_start(aiorch_exchange *x, const char *body, size_t len);

/* The host refuses the request before its handler runs (413 beyond
 * max_body, 408 too slow, 400 malformed, 503): on_refuse words the answer,
 * which goes through the sink inside this call; x ends. */
void aiorch_exchange_refuse(aiorch_exchange *x, int status);

/* The host's unsent bytes for x are down to AIORCH_HTTP_BACKLOG or less:
 * writes that wait go on (from the loop). */
void aiorch_exchange_writable(aiorch_exchange *x);

/* The client went away (or the host drops the request): the handler's task
 * is cancelled, which aborts its upstream transfers, and x ends; the sink
 * is not called again. Also the answer to a sink call that returned -1,
 * from inside that call or later. */
void aiorch_exchange_gone(aiorch_exchange *x);

/* ---- a main task (the aiorch command's way) ---- */

/* Loads a Lua file and starts it as the main task with the given
 * arguments; it runs until its first yield, and the loop does the rest.
 * Returns 0, or -1 with the reason in aiorch_runtime_error() (a file that
 * cannot be loaded, or a task that failed before its first yield). */
int aiorch_runtime_start(aiorch_runtime *rt, const char *path, int argc, char **argv);

/* 1 while the main task is still running. When it ended in failure,
 * aiorch_runtime_error() says why. */
int aiorch_runtime_busy(aiorch_runtime *rt);

/* Starts the file as the main task and runs the runtime's loop until it
 * ends (not for a pollable runtime). Returns the process exit status the
 * script asks for: its first return value when it is an integer, 0 when it
 * returns nothing, 1 when it failed. */
int aiorch_runtime_run(aiorch_runtime *rt, const char *path, int argc, char **argv);

/* The last error message of start/run/submit, or "" */
const char *aiorch_runtime_error(aiorch_runtime *rt);

#ifdef __cplusplus
}
#endif

#endif
