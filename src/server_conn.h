/* server_conn.c: the connections of the runtime's own HTTP/1.1 server
 * (aiorch.server): accepting (with a back-off when descriptors run out),
 * reading requests (http1.c) under the client timeouts and the limits,
 * writing responses with backpressure, lingering closes, and the drain of
 * a shutdown. No Lua: a request goes to the handler side through hooks
 * (server.c's exchange functions, the calls a host such as nginx makes
 * too), and its answer comes back through an aiorch_http_sink. */
#ifndef AIORCH_SERVER_CONN_H
#define AIORCH_SERVER_CONN_H

#include "internal.h"

typedef struct srv_listener srv_listener;

/* The handler side, as server.c provides it. */
typedef struct srv_hooks {
    aiorch_exchange *(*open)(aiorch_handler *h, const aiorch_http_request *req,
                             const aiorch_http_sink *sink, void *ud);
    void (*start)(aiorch_exchange *x, const char *body, size_t len);
    /* the body read so far, for on_refuse */
    void (*refuse)(aiorch_exchange *x, int status, const char *body, size_t len);
    void (*writable)(aiorch_exchange *x);
    void (*gone)(aiorch_exchange *x);   /* the client went away */
    void (*cancel)(aiorch_exchange *x); /* the server closes it */
    /* After each event: run the handlers that it made ready. */
    void (*settle)(aiorch_runtime *rt);
    /* A shutdown ended, cut requests cut at its deadline. */
    void (*shut_done)(aiorch_handler *h, long long cut);
} srv_hooks;

/* The limits (docs/limits.md); 0: none. Timeouts in seconds. */
typedef struct srv_limits {
    size_t max_body, max_header, max_buffered;
    long long max_conns;
    double header_to, body_to, read_to, idle_to, send_to;
} srv_limits;

typedef struct srv_stats {
    long long accepted, open, refused, timed_out, buffered, accept_failed;
} srv_stats;

/* Binds host:port (0: any free port) and starts accepting. Returns NULL
 * with a message in err. */
srv_listener *aiorch_srv_listen(aiorch_runtime *rt, const char *host, int port, int reuseport,
                                const srv_limits *lim, const srv_hooks *hooks, aiorch_handler *h,
                                char *err, size_t errsz);
/* Stops listening, closes every connection (cancelling the handlers of
 * responses not finished) and frees l. */
void aiorch_srv_close(srv_listener *l);
int aiorch_srv_port(const srv_listener *l);
const char *aiorch_srv_host(const srv_listener *l);
void aiorch_srv_stats(const srv_listener *l, srv_stats *out);
void aiorch_srv_limits(const srv_listener *l, srv_limits *out);
/* raise_nofile: fits max_connections to RLIMIT_NOFILE (raising it when it can). */
void aiorch_srv_fit_nofile(srv_listener *l);

/* Stops accepting at once, closes idle connections, lets the requests in
 * flight finish (with connection: close) and cuts the rest after ms.
 * Returns 0 when nothing was left to wait for, 1 when hooks->shut_done
 * will say when it ended, -1 when a shutdown is in progress already. */
int aiorch_srv_shutdown(srv_listener *l, double ms);
int aiorch_srv_shutting(const srv_listener *l);
/* Ends a shutdown now (its caller went): cuts what is left. */
void aiorch_srv_shutdown_now(srv_listener *l);

#endif
