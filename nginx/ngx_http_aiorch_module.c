/* ngx_http_aiorch_module: aiorch inside nginx.
 *
 * One aiorch runtime per worker, made in init_process, on the worker's own
 * event loop (aiorch_options.host): the runtime's sockets (libcurl's)
 * become nginx connections (ngx_get_connection + ngx_add_event,
 * level-triggered, as libcurl expects), and its timers (task sleeps,
 * deadlines, libcurl's timeout) nginx timers; work the runtime posts runs
 * as a posted event. No second loop, and no thread runs the loop.
 *
 * A location with aiorch_gateway (or aiorch_handler FILE.lua) hands each
 * request to a Lua handler through aiorch.h's exchange calls: the headers
 * (on_headers may answer at once), then the body as nginx read it. The
 * handler's answer comes back through the sink below onto nginx's output
 * chain, each write flushed; more than AIORCH_HTTP_BACKLOG unsent makes the
 * handler wait for the client's write readiness. A client that goes away
 * (or a send timeout) ends the exchange: the handler is cancelled, which
 * aborts its upstream transfers.
 *
 * This file knows nginx, and talks to the runtime only through aiorch.h. */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <netinet/tcp.h>
#include <time.h>

#include <aiorch.h>

typedef struct {
    ngx_str_t file; /* the gateway's configuration ("": from the environment), or a handler */
    ngx_uint_t gateway;
} ngx_http_aiorch_spec_t;

typedef struct {
    ngx_str_t root;     /* aiorch_root: holds scripts/ and strategies/ */
    ngx_array_t *specs; /* the handlers every worker loads */
} ngx_http_aiorch_main_conf_t;

typedef struct {
    ngx_str_t config;  /* aiorch_config */
    ngx_str_t handler; /* aiorch_handler */
    ngx_flag_t gateway;
    ngx_int_t index; /* into specs, or -1 */
} ngx_http_aiorch_loc_conf_t;

typedef struct {
    ngx_http_request_t *r;
    aiorch_exchange *x;       /* NULL once the exchange ended */
    ngx_chain_t *free, *busy; /* our output buffers */
    ngx_int_t rc;             /* what a synchronous answer ends the request with */
    unsigned in_call : 1;     /* inside a call of ours that may answer at once */
    unsigned answered : 1;    /* the whole answer went out (or was cut) */
    unsigned waiting : 1;     /* the handler waits for the backlog to drain */
} ngx_http_aiorch_ctx_t;

static ngx_int_t ngx_http_aiorch_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_aiorch_init_process(ngx_cycle_t *cycle);
static void ngx_http_aiorch_exit_process(ngx_cycle_t *cycle);
static void *ngx_http_aiorch_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_aiorch_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_aiorch_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static char *ngx_http_aiorch_root(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_aiorch_path(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_aiorch_gateway(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_aiorch_handler(ngx_http_request_t *r);

static ngx_command_t ngx_http_aiorch_commands[] = {
    {ngx_string("aiorch_root"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, ngx_http_aiorch_root,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL},
    {ngx_string("aiorch_config"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
     ngx_http_aiorch_path, NGX_HTTP_LOC_CONF_OFFSET, offsetof(ngx_http_aiorch_loc_conf_t, config),
     NULL},
    {ngx_string("aiorch_gateway"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, ngx_http_aiorch_gateway,
     NGX_HTTP_LOC_CONF_OFFSET, 0, NULL},
    {ngx_string("aiorch_handler"), NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, ngx_http_aiorch_gateway,
     NGX_HTTP_LOC_CONF_OFFSET, 0, NULL},
    ngx_null_command,
};

static ngx_http_module_t ngx_http_aiorch_module_ctx = {
    NULL,                             /* preconfiguration */
    NULL,                             /* postconfiguration */
    ngx_http_aiorch_create_main_conf, /* create main configuration */
    NULL,                             /* init main configuration */
    NULL,                             /* create server configuration */
    NULL,                             /* merge server configuration */
    ngx_http_aiorch_create_loc_conf,  /* create location configuration */
    ngx_http_aiorch_merge_loc_conf,   /* merge location configuration */
};

ngx_module_t ngx_http_aiorch_module = {
    NGX_MODULE_V1,
    &ngx_http_aiorch_module_ctx,  /* module context */
    ngx_http_aiorch_commands,     /* module directives */
    NGX_HTTP_MODULE,              /* module type */
    NULL,                         /* init master */
    ngx_http_aiorch_init_module,  /* init module */
    ngx_http_aiorch_init_process, /* init process */
    NULL,                         /* init thread */
    NULL,                         /* exit thread */
    ngx_http_aiorch_exit_process, /* exit process */
    NULL,                         /* exit master */
    NGX_MODULE_V1_PADDING,
};

/* The worker's runtime and its handlers, by spec index. */
static aiorch_runtime *ngx_http_aiorch_rt;
static aiorch_handler **ngx_http_aiorch_handlers;
static ngx_uint_t ngx_http_aiorch_nhandlers;
static ngx_uint_t ngx_http_aiorch_exiting; /* the runtime is being freed with the worker */

/* ---- configuration ------------------------------------------------------ */

static void *ngx_http_aiorch_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_aiorch_main_conf_t *amcf = ngx_pcalloc(cf->pool, sizeof *amcf);
    if (amcf == NULL) return NULL;
    amcf->specs = ngx_array_create(cf->pool, 2, sizeof(ngx_http_aiorch_spec_t));
    if (amcf->specs == NULL) return NULL;
    return amcf;
}

static void *ngx_http_aiorch_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_aiorch_loc_conf_t *alcf = ngx_pcalloc(cf->pool, sizeof *alcf);
    if (alcf == NULL) return NULL;
    alcf->gateway = NGX_CONF_UNSET;
    alcf->index = -1;
    return alcf;
}

/* The handler a location serves with: one spec per distinct file, loaded
 * once per worker. aiorch_config is inherited; the content handler is not. */
static char *ngx_http_aiorch_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_aiorch_loc_conf_t *prev = parent, *conf = child;
    ngx_http_aiorch_main_conf_t *amcf;
    ngx_http_aiorch_spec_t *spec;
    ngx_str_t *file;
    ngx_uint_t i, gateway;

    ngx_conf_merge_str_value(conf->config, prev->config, "");
    if (conf->gateway != 1 && conf->handler.len == 0) return NGX_CONF_OK;
    gateway = conf->gateway == 1;
    file = gateway ? &conf->config : &conf->handler;
    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_aiorch_module);
    spec = amcf->specs->elts;
    for (i = 0; i < amcf->specs->nelts; i++) {
        if (spec[i].gateway == gateway && spec[i].file.len == file->len &&
            ngx_strncmp(spec[i].file.data, file->data, file->len) == 0) {
            conf->index = (ngx_int_t)i;
            return NGX_CONF_OK;
        }
    }
    spec = ngx_array_push(amcf->specs);
    if (spec == NULL) return NGX_CONF_ERROR;
    spec->file = *file;
    spec->gateway = gateway;
    conf->index = (ngx_int_t)(amcf->specs->nelts - 1);
    return NGX_CONF_OK;
}

/* A path argument: relative to nginx's configuration prefix. */
static char *ngx_http_aiorch_full(ngx_conf_t *cf, ngx_str_t *out)
{
    ngx_str_t *value = cf->args->elts;
    *out = value[1];
    if (out->len == 0) return "needs a file name";
    if (ngx_conf_full_name(cf->cycle, out, 1) != NGX_OK) return NGX_CONF_ERROR;
    return NGX_CONF_OK;
}

static char *ngx_http_aiorch_path(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_str_t *field = (ngx_str_t *)((char *)conf + cmd->offset);
    if (field->data) return "is duplicate";
    return ngx_http_aiorch_full(cf, field);
}

static char *ngx_http_aiorch_root(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_aiorch_main_conf_t *amcf = conf;
    (void)cmd;
    if (amcf->root.data) return "is duplicate";
    return ngx_http_aiorch_full(cf, &amcf->root);
}

/* aiorch_gateway and aiorch_handler FILE: the location's content handler. */
static char *ngx_http_aiorch_gateway(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_aiorch_loc_conf_t *alcf = conf;
    ngx_http_core_loc_conf_t *clcf;

    if (alcf->gateway != NGX_CONF_UNSET || alcf->handler.data)
        return "is duplicate (a location has one of aiorch_gateway and aiorch_handler)";
    if (ngx_strcmp(cmd->name.data, "aiorch_gateway") == 0) {
        alcf->gateway = 1;
    } else {
        char *rc = ngx_http_aiorch_full(cf, &alcf->handler);
        if (rc != NGX_CONF_OK) return rc;
        alcf->gateway = 0;
    }
    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_aiorch_handler;
    return NGX_CONF_OK;
}

/* ---- the runtime on the worker's loop ------------------------------------ */

static char *ngx_http_aiorch_cstr(ngx_pool_t *pool, ngx_str_t *s)
{
    char *p = ngx_pnalloc(pool, s->len + 1);
    if (p == NULL) return NULL;
    ngx_memcpy(p, s->data, s->len);
    p[s->len] = '\0';
    return p;
}

/* aiorch_options.on_error: into the error log */
static void ngx_http_aiorch_report(void *ud, const char *message)
{
    (void)ud;
    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0, "aiorch: %s", message);
}

/* libcurl's sockets the runtime stopped watching but did not close (the
 * connections it keeps alive), by fd: still registered with nginx's epoll
 * for reading, so that watching one again for the next request costs no
 * system call (as libev spares them). A parked socket that turns readable
 * (the upstream closed it) is taken out of epoll then; one being closed
 * is let go (aiorch_host.closing). */
static ngx_connection_t **ngx_http_aiorch_parked;
static ngx_uint_t ngx_http_aiorch_nparked; /* the table's size */

static ngx_int_t ngx_http_aiorch_event(ngx_event_t *ev, ngx_uint_t event, ngx_uint_t want)
{
    if (want && !ev->active) return ngx_add_event(ev, event, NGX_LEVEL_EVENT);
    if (!want && ev->active) return ngx_del_event(ev, event, 0);
    return NGX_OK;
}

/* Lets an nginx connection of the runtime's go; flags: NGX_CLOSE_EVENT
 * when the fd is about to be closed (epoll forgets it by itself). */
static void ngx_http_aiorch_drop(ngx_connection_t *c, ngx_uint_t flags)
{
    if (c->read->active) ngx_del_event(c->read, NGX_READ_EVENT, flags);
    if (c->write->active) ngx_del_event(c->write, NGX_WRITE_EVENT, flags);
    c->fd = (ngx_socket_t)-1; /* libcurl's to close; and stale events skip it */
    ngx_free_connection(c);
}

/* A socket or a posted run of the runtime's is ready. */
static void ngx_http_aiorch_io_event(ngx_event_t *ev)
{
    ngx_connection_t *c = ev->data;
    if (c->data == NULL) { /* parked, and ready: the upstream closed it, say */
        if (c->read->active) ngx_del_event(c->read, NGX_READ_EVENT, 0);
        if (c->write->active) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
        return;
    }
    aiorch_runtime_ready(ngx_http_aiorch_rt, c->data, ev->write ? AIORCH_WRITE : AIORCH_READ);
}

static void ngx_http_aiorch_timer_event(ngx_event_t *ev)
{
    aiorch_runtime_ready(ngx_http_aiorch_rt, ev->data, AIORCH_TIMER);
}

/* Parks c under its fd; NGX_ERROR when the table cannot grow. */
static ngx_int_t ngx_http_aiorch_park(ngx_connection_t *c)
{
    ngx_uint_t fd = (ngx_uint_t)c->fd;
    if (fd >= ngx_http_aiorch_nparked) {
        ngx_uint_t n = fd < 64 ? 128 : fd * 2;
        ngx_connection_t **t = ngx_alloc(n * sizeof *t, ngx_cycle->log);
        if (t == NULL) return NGX_ERROR;
        ngx_memzero(t, n * sizeof *t);
        if (ngx_http_aiorch_parked) {
            ngx_memcpy(t, ngx_http_aiorch_parked, ngx_http_aiorch_nparked * sizeof *t);
            ngx_free(ngx_http_aiorch_parked);
        }
        ngx_http_aiorch_parked = t;
        ngx_http_aiorch_nparked = n;
    }
    if (ngx_http_aiorch_parked[fd])
        ngx_http_aiorch_drop(ngx_http_aiorch_parked[fd], NGX_CLOSE_EVENT);
    c->data = NULL;
    if (c->write->active) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    ngx_http_aiorch_parked[fd] = c;
    return NGX_OK;
}

static ngx_connection_t *ngx_http_aiorch_unpark(int fd)
{
    ngx_connection_t *c;
    if (fd < 0 || (ngx_uint_t)fd >= ngx_http_aiorch_nparked) return NULL;
    c = ngx_http_aiorch_parked[fd];
    ngx_http_aiorch_parked[fd] = NULL;
    return c;
}

/* aiorch_host.io: a socket of libcurl's as an nginx connection of its own,
 * level-triggered (libcurl reads a buffer at a time). Stopped, it is
 * parked (above). */
static int ngx_http_aiorch_io(void *ud, aiorch_watch *w, int fd, int events, void **slot)
{
    ngx_connection_t *c = *slot;
    ngx_int_t rc;
    (void)ud;

    if (c == NULL) {
        if (events == 0) return 0;
        c = ngx_http_aiorch_unpark(fd);
        if (c == NULL) {
            c = ngx_get_connection(fd, ngx_cycle->log);
            if (c == NULL) return -1;
            c->read->handler = ngx_http_aiorch_io_event;
            c->write->handler = ngx_http_aiorch_io_event;
            c->read->log = c->write->log = c->log;
        }
        c->data = w;
        *slot = c;
    }
    if (events == 0) {
        *slot = NULL;
        if (ngx_http_aiorch_park(c) != NGX_OK) ngx_http_aiorch_drop(c, 0);
        return 0;
    }
    rc = ngx_http_aiorch_event(c->read, NGX_READ_EVENT, events & AIORCH_READ);
    if (rc == NGX_OK) rc = ngx_http_aiorch_event(c->write, NGX_WRITE_EVENT, events & AIORCH_WRITE);
    if (rc != NGX_OK) {
        ngx_http_aiorch_drop(c, 0);
        *slot = NULL;
        return -1;
    }
    return 0;
}

/* aiorch_host.closing */
static void ngx_http_aiorch_closing(void *ud, int fd)
{
    ngx_connection_t *c = ngx_http_aiorch_unpark(fd);
    (void)ud;
    if (c) ngx_http_aiorch_drop(c, NGX_CLOSE_EVENT);
}

/* How far nginx's cached time lags: a timer must not fire early. */
static ngx_msec_t ngx_http_aiorch_lag(void)
{
    struct timespec ts;
    ngx_msec_t now;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    now = (ngx_msec_t)ts.tv_sec * 1000 + (ngx_msec_t)(ts.tv_nsec / 1000000);
    return now > ngx_current_msec && now - ngx_current_msec < 1000 ? now - ngx_current_msec : 0;
}

/* Timer events released, kept for the next ones (a request arms several):
 * a list through their data pointers, at most NGX_HTTP_AIORCH_SPARE. */
#define NGX_HTTP_AIORCH_SPARE 1024
static ngx_event_t *ngx_http_aiorch_spare;
static ngx_uint_t ngx_http_aiorch_nspare;

/* aiorch_host.timer: an nginx timer, or a posted event for "soon". A weak
 * timer is cancelable: it does not hold an exiting worker. */
static void ngx_http_aiorch_timer(void *ud, aiorch_watch *w, long ms, int flags, void **slot)
{
    ngx_event_t *ev = *slot;
    (void)ud;

    if (ev == NULL) {
        if (ms < 0) return;
        if (ngx_http_aiorch_spare) {
            ev = ngx_http_aiorch_spare;
            ngx_http_aiorch_spare = ev->data;
            ngx_http_aiorch_nspare--;
            ngx_memzero(ev, sizeof *ev);
        } else {
            ev = ngx_calloc(sizeof(ngx_event_t), ngx_cycle->log);
            if (ev == NULL) return; /* logged; the watcher will not fire */
        }
        ev->handler = ngx_http_aiorch_timer_event;
        ev->data = w;
        ev->log = ngx_cycle->log;
        *slot = ev;
    }
    if (ms < 0 || (flags & AIORCH_SOON)) {
        if (ev->timer_set) ngx_del_timer(ev);
    }
    if (ms < 0 || !(flags & AIORCH_SOON)) {
        if (ev->posted) {
            ngx_delete_posted_event(ev);
        }
    }
    if (ms < 0) return;
    ev->cancelable = (flags & AIORCH_WEAK) != 0;
    if (flags & AIORCH_SOON) {
        if (!ev->posted) {
            ngx_post_event(ev, &ngx_posted_events);
        }
        return;
    }
    ngx_add_timer(ev, (ngx_msec_t)ms + ngx_http_aiorch_lag());
}

/* aiorch_host.release */
static void ngx_http_aiorch_release(void *ud, void *slot)
{
    ngx_event_t *ev = slot;
    (void)ud;
    if (ev->timer_set) ngx_del_timer(ev);
    if (ev->posted) {
        ngx_delete_posted_event(ev);
    }
    if (ngx_http_aiorch_nspare >= NGX_HTTP_AIORCH_SPARE) {
        ngx_free(ev);
        return;
    }
    ev->data = ngx_http_aiorch_spare;
    ngx_http_aiorch_spare = ev;
    ngx_http_aiorch_nspare++;
}

static const aiorch_host ngx_http_aiorch_host = {
    ngx_http_aiorch_io,      ngx_http_aiorch_timer, ngx_http_aiorch_release, NULL,
    ngx_http_aiorch_closing,
};

/* Loads every handler into rt; NGX_ERROR (logged) when one cannot load. */
static ngx_int_t ngx_http_aiorch_load(ngx_cycle_t *cycle, aiorch_runtime *rt,
                                      ngx_http_aiorch_main_conf_t *amcf, aiorch_handler **out)
{
    ngx_http_aiorch_spec_t *spec = amcf->specs->elts;
    const char *root = aiorch_runtime_root(rt);
    ngx_uint_t i;

    for (i = 0; i < amcf->specs->nelts; i++) {
        char *file = ngx_http_aiorch_cstr(cycle->pool, &spec[i].file), *path = file;
        const char *argv[1] = {file};
        int argc = 0;
        aiorch_handler *h;
        if (file == NULL) return NGX_ERROR;
        if (spec[i].gateway) {
            size_t n = ngx_strlen(root) + sizeof("/scripts/aiorch/gateway/hosted.lua");
            path = ngx_pnalloc(cycle->pool, n);
            if (path == NULL) return NGX_ERROR;
            ngx_sprintf((u_char *)path, "%s/scripts/aiorch/gateway/hosted.lua%Z", root);
            argc = 1;
        }
        h = aiorch_handler_load(rt, path, argc, argv);
        if (h == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "aiorch: %s %s: %s",
                          spec[i].gateway ? "aiorch_gateway with aiorch_config" : "aiorch_handler",
                          spec[i].file.len ? file : "(none: from the environment)",
                          aiorch_runtime_error(rt));
            return NGX_ERROR;
        }
        if (out) out[i] = h;
    }
    return NGX_OK;
}

static aiorch_runtime *ngx_http_aiorch_new(ngx_cycle_t *cycle, ngx_http_aiorch_main_conf_t *amcf,
                                           const aiorch_host *host)
{
    aiorch_options opts;
    ngx_memzero(&opts, sizeof opts);
    opts.root = amcf->root.len ? ngx_http_aiorch_cstr(cycle->pool, &amcf->root) : NULL;
    opts.on_error = ngx_http_aiorch_report;
    opts.host = host;
    return aiorch_runtime_new(&opts);
}

/* In the master (and nginx -t): every handler must load, or the
 * configuration is refused with the reason. */
static ngx_int_t ngx_http_aiorch_init_module(ngx_cycle_t *cycle)
{
    ngx_http_aiorch_main_conf_t *amcf;
    aiorch_runtime *rt;
    ngx_int_t rc;

    if (ngx_http_cycle_get_module_main_conf(cycle, ngx_http_module) == NULL) return NGX_OK;
    amcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_aiorch_module);
    if (amcf == NULL || amcf->specs->nelts == 0) return NGX_OK;
    rt = ngx_http_aiorch_new(cycle, amcf, NULL);
    if (rt == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "aiorch: cannot create a runtime");
        return NGX_ERROR;
    }
    rc = ngx_http_aiorch_load(cycle, rt, amcf, NULL);
    aiorch_runtime_free(rt);
    return rc;
}

/* One runtime per worker, on its loop, with every handler loaded. */
static ngx_int_t ngx_http_aiorch_init_process(ngx_cycle_t *cycle)
{
    ngx_http_aiorch_main_conf_t *amcf;

    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) return NGX_OK;
    if (ngx_http_cycle_get_module_main_conf(cycle, ngx_http_module) == NULL) return NGX_OK;
    amcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_aiorch_module);
    if (amcf == NULL || amcf->specs->nelts == 0) return NGX_OK;
    ngx_http_aiorch_exiting = 0;
    ngx_http_aiorch_rt = ngx_http_aiorch_new(cycle, amcf, &ngx_http_aiorch_host);
    if (ngx_http_aiorch_rt == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "aiorch: cannot create the worker's runtime");
        return NGX_ERROR;
    }
    ngx_http_aiorch_nhandlers = amcf->specs->nelts;
    ngx_http_aiorch_handlers = ngx_pcalloc(cycle->pool, amcf->specs->nelts * sizeof(void *));
    if (ngx_http_aiorch_handlers == NULL ||
        ngx_http_aiorch_load(cycle, ngx_http_aiorch_rt, amcf, ngx_http_aiorch_handlers) != NGX_OK) {
        aiorch_runtime_free(ngx_http_aiorch_rt);
        ngx_http_aiorch_rt = NULL;
        return NGX_ERROR;
    }
    return NGX_OK;
}

/* The worker exits (a reload, a stop): the runtime and all it holds go.
 * Exchanges still open are cut; their requests go with the worker. */
static void ngx_http_aiorch_exit_process(ngx_cycle_t *cycle)
{
    (void)cycle;
    if (ngx_http_aiorch_rt == NULL) return;
    ngx_http_aiorch_exiting = 1;
    aiorch_runtime_free(ngx_http_aiorch_rt);
    ngx_http_aiorch_rt = NULL;
    for (ngx_uint_t fd = 0; fd < ngx_http_aiorch_nparked; fd++) /* none, once curl closed all */
        if (ngx_http_aiorch_parked[fd]) ngx_http_aiorch_drop(ngx_http_aiorch_parked[fd], 0);
    ngx_free(ngx_http_aiorch_parked);
    ngx_http_aiorch_parked = NULL;
    ngx_http_aiorch_nparked = 0;
    while (ngx_http_aiorch_spare) {
        ngx_event_t *ev = ngx_http_aiorch_spare;
        ngx_http_aiorch_spare = ev->data;
        ngx_free(ev);
    }
    ngx_http_aiorch_nspare = 0;
    ngx_http_aiorch_handlers = NULL;
    ngx_http_aiorch_nhandlers = 0;
}

/* ---- a request's answer: the sink ---------------------------------------- */

/* Ends the request, unless a call of ours that runs inside its content
 * handler will return rc to nginx. ctx may be gone after this. */
static void ngx_http_aiorch_finish(ngx_http_aiorch_ctx_t *ctx, ngx_int_t rc)
{
    ngx_http_request_t *r = ctx->r;
    ngx_connection_t *c = r->connection;

    ctx->answered = 1;
    ctx->x = NULL;
    if (ctx->in_call) {
        ctx->rc = rc;
        return;
    }
    if (ngx_http_aiorch_exiting) return; /* the worker goes, and its requests with it */
    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}

/* The client is gone: the handler is told (it may be running this very
 * call), and the request ends. */
static void ngx_http_aiorch_gone(ngx_http_aiorch_ctx_t *ctx, ngx_int_t rc)
{
    aiorch_exchange *x = ctx->x;
    ctx->x = NULL;
    if (x) aiorch_exchange_gone(x);
    ngx_http_aiorch_finish(ctx, rc);
}

/* aiorch_http_sink.head */
static int ngx_http_aiorch_head(void *ud, const aiorch_http_response *res)
{
    ngx_http_aiorch_ctx_t *ctx = ud;
    ngx_http_request_t *r = ctx->r;
    ngx_table_elt_t *h;
    ngx_int_t rc;
    size_t i;

    if (r->connection->error) return -1;
    r->headers_out.status = (ngx_uint_t)res->status;
    for (i = 0; i < res->nheaders; i++) {
        const aiorch_header *hd = &res->headers[i];
        u_char *v = ngx_pnalloc(r->pool, hd->value_len);
        if (v == NULL) return -1;
        ngx_memcpy(v, hd->value, hd->value_len);
        if (hd->name_len == 12 &&
            ngx_strncasecmp((u_char *)hd->name, (u_char *)"content-type", 12) == 0) {
            r->headers_out.content_type.data = v;
            r->headers_out.content_type.len = hd->value_len;
            r->headers_out.content_type_len = hd->value_len;
            r->headers_out.content_type_lowcase = NULL;
            continue;
        }
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) return -1;
        h->hash = 1;
        h->key.data = ngx_pnalloc(r->pool, hd->name_len);
        if (h->key.data == NULL) return -1;
        ngx_memcpy(h->key.data, hd->name, hd->name_len);
        h->key.len = hd->name_len;
        h->value.data = v;
        h->value.len = hd->value_len;
        h->lowcase_key = NULL;
    }
    r->headers_out.content_length_n = res->length >= 0 ? (off_t)res->length : -1;
    r->headers_out.content_length = NULL;
    if (res->close) r->keepalive = 0;
    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK) {
        ctx->rc = NGX_ERROR;
        return -1;
    }
    ctx->rc = rc;
    return 0;
}

/* Sends what is queued (and in, when given), with the client's write
 * readiness and the send timeout armed while bytes wait. Returns the
 * bytes unsent, or -1 when the client is gone. */
static long ngx_http_aiorch_send(ngx_http_aiorch_ctx_t *ctx, ngx_chain_t *in)
{
    ngx_http_request_t *r = ctx->r;
    ngx_connection_t *c = r->connection;
    ngx_http_core_loc_conf_t *clcf;
    ngx_chain_t *cl;
    ngx_int_t rc;
    long pending = 0;

    rc = ngx_http_output_filter(r, in);
    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &in,
                            (ngx_buf_tag_t)&ngx_http_aiorch_module);
    if (rc == NGX_ERROR || c->error) return -1;
    ctx->rc = rc;
    for (cl = ctx->busy; cl; cl = cl->next)
        pending += (long)ngx_buf_size(cl->buf);
    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);
    if (c->data == r && ngx_handle_write_event(c->write, clcf->send_lowat) != NGX_OK) return -1;
    if (c->write->active && !c->write->ready) {
        ngx_add_timer(c->write, clcf->send_timeout);
    } else if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }
    return pending;
}

/* aiorch_http_sink.body: each write is one buffer, flushed (an event of a
 * stream must not wait for more). */
static long ngx_http_aiorch_body(void *ud, const char *data, size_t len, int last)
{
    ngx_http_aiorch_ctx_t *ctx = ud;
    ngx_http_request_t *r = ctx->r;
    ngx_chain_t *cl;
    ngx_buf_t *b;
    long pending;

    if (r->connection->error) {
        ngx_http_aiorch_gone(ctx, NGX_ERROR);
        return -1;
    }
    if (r->header_only) { /* HEAD, 204, 304: the head was all */
        if (last) ngx_http_aiorch_finish(ctx, ctx->rc);
        return 0;
    }
    cl = ngx_chain_get_free_buf(r->pool, &ctx->free);
    if (cl == NULL) {
        ngx_http_aiorch_gone(ctx, NGX_ERROR);
        return -1;
    }
    b = cl->buf;
    if (len > (size_t)(b->end - b->start)) { /* a reused one too small, or a new one */
        size_t size = len > 4096 ? len : 4096;
        b->start = ngx_palloc(r->pool, size);
        if (b->start == NULL) {
            ngx_http_aiorch_gone(ctx, NGX_ERROR);
            return -1;
        }
        b->end = b->start + size;
    }
    b->pos = b->start;
    b->last = b->start ? ngx_cpymem(b->start, data, len) : b->start;
    b->temporary = len > 0;
    b->flush = 1;
    b->last_buf = last && r == r->main;
    b->last_in_chain = last != 0;
    b->tag = (ngx_buf_tag_t)&ngx_http_aiorch_module;
    pending = ngx_http_aiorch_send(ctx, cl);
    if (pending < 0) {
        ngx_http_aiorch_gone(ctx, NGX_ERROR);
        return -1;
    }
    if (last) {
        ngx_http_aiorch_finish(ctx, ctx->rc); /* what is left, nginx's writer sends */
        return pending;
    }
    ctx->waiting = pending > AIORCH_HTTP_BACKLOG;
    return pending;
}

/* aiorch_http_sink.abort: the connection is cut (an HTTP/2 stream reset). */
static void ngx_http_aiorch_abort(void *ud)
{
    ngx_http_aiorch_ctx_t *ctx = ud;
    ctx->x = NULL;
    ngx_http_aiorch_finish(ctx, NGX_ERROR);
}

static const aiorch_http_sink ngx_http_aiorch_sink = {
    ngx_http_aiorch_head,
    ngx_http_aiorch_body,
    ngx_http_aiorch_abort,
};

/* The client's connection can take more: what waits goes out, and a
 * handler waiting on the backlog goes on. */
static void ngx_http_aiorch_write(ngx_http_request_t *r)
{
    ngx_http_aiorch_ctx_t *ctx = ngx_http_get_module_ctx(r, ngx_http_aiorch_module);
    ngx_connection_t *c = r->connection;
    long pending;

    if (ctx == NULL || ctx->answered) return;
    if (c->write->timedout) {
        c->timedout = 1;
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT, "aiorch: client timed out");
        ngx_http_aiorch_gone(ctx, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }
    pending = ngx_http_aiorch_send(ctx, NULL);
    if (pending < 0) {
        ngx_http_aiorch_gone(ctx, NGX_ERROR);
        return;
    }
    if (ctx->waiting && ctx->x && pending <= AIORCH_HTTP_BACKLOG) {
        ctx->waiting = 0;
        aiorch_exchange_writable(ctx->x);
    }
}

/* ngx_pool_cleanup_t: the request ends without its exchange having ended
 * (the client went away, a timeout, an error of nginx's). */
static void ngx_http_aiorch_cleanup(void *data)
{
    ngx_http_aiorch_ctx_t *ctx = data;
    aiorch_exchange *x = ctx->x;
    ctx->x = NULL;
    ctx->answered = 1;
    if (x && !ngx_http_aiorch_exiting && ngx_http_aiorch_rt) aiorch_exchange_gone(x);
}

/* ---- a request ------------------------------------------------------------ */

/* The body as nginx read it: in memory, or (past client_body_buffer_size)
 * in its temporary file. */
static ngx_int_t ngx_http_aiorch_read_body(ngx_http_request_t *r, u_char **out, size_t *len)
{
    ngx_chain_t *cl;
    size_t n = 0;
    u_char *p;

    *out = NULL;
    *len = 0;
    if (r->request_body == NULL || r->request_body->bufs == NULL) return NGX_OK;
    for (cl = r->request_body->bufs; cl; cl = cl->next)
        n += (size_t)(cl->buf->in_file ? cl->buf->file_last - cl->buf->file_pos
                                       : cl->buf->last - cl->buf->pos);
    p = ngx_pnalloc(r->pool, n ? n : 1);
    if (p == NULL) return NGX_ERROR;
    *out = p;
    *len = n;
    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        ngx_buf_t *b = cl->buf;
        if (b->in_file) {
            ssize_t got =
                ngx_read_file(b->file, p, (size_t)(b->file_last - b->file_pos), b->file_pos);
            if (got != b->file_last - b->file_pos) return NGX_ERROR;
            p += got;
        } else {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
        }
    }
    return NGX_OK;
}

/* A connection's marker: set on it once (a cleanup of its pool that does
 * nothing but say so). */
static void ngx_http_aiorch_marker(void *data)
{
    (void)data;
}

/* What the kernel may queue unsent, as aiorch serve sets it: a client that
 * does not read holds its upstream back within AIORCH_HTTP_BACKLOG and
 * this, not within a send buffer that grows to megabytes on a fast link.
 * Once per connection. */
static void ngx_http_aiorch_notsent(ngx_connection_t *c)
{
    int unsent = AIORCH_HTTP_BACKLOG;
    ngx_pool_cleanup_t *cln;
    for (cln = c->pool->cleanup; cln; cln = cln->next)
        if (cln->handler == ngx_http_aiorch_marker) return;
    cln = ngx_pool_cleanup_add(c->pool, 0);
    if (cln == NULL) return;
    cln->handler = ngx_http_aiorch_marker;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &unsent, sizeof unsent);
}

/* ngx_http_read_client_request_body's post handler: the body is in. */
static void ngx_http_aiorch_body_in(ngx_http_request_t *r)
{
    ngx_http_aiorch_ctx_t *ctx = ngx_http_get_module_ctx(r, ngx_http_aiorch_module);
    ngx_http_aiorch_loc_conf_t *alcf = ngx_http_get_module_loc_conf(r, ngx_http_aiorch_module);
    ngx_connection_t *c = r->connection;
    size_t max = aiorch_handler_max_body(ngx_http_aiorch_handlers[alcf->index]);
    u_char *body;
    size_t len;

    if (ctx == NULL || ctx->x == NULL) return;
    if (ngx_http_aiorch_read_body(r, &body, &len) != NGX_OK) {
        ngx_http_aiorch_gone(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }
    if (max && len > max) { /* a chunked body: its size is known only now */
        aiorch_exchange *x = ctx->x;
        ctx->x = NULL;
        aiorch_exchange_refuse(x, 413);
        return;
    }
    /* From here on the client's connection is watched for its going away,
     * and for room to write (upstream's way, ngx_http_upstream_init). */
    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_aiorch_write;
#if (NGX_HTTP_V2)
    if (r->stream == NULL)
#endif
    {
        ngx_http_aiorch_notsent(c);
        if (c->read->timer_set) ngx_del_timer(c->read);
        if ((ngx_event_flags & NGX_USE_CLEAR_EVENT) && !c->write->active &&
            ngx_add_event(c->write, NGX_WRITE_EVENT, NGX_CLEAR_EVENT) == NGX_ERROR) {
            ngx_http_aiorch_gone(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
    }
    aiorch_exchange_start(ctx->x, (const char *)body, len);
}

/* The content handler of aiorch_gateway and aiorch_handler. */
static ngx_int_t ngx_http_aiorch_handler(ngx_http_request_t *r)
{
    ngx_http_aiorch_loc_conf_t *alcf = ngx_http_get_module_loc_conf(r, ngx_http_aiorch_module);
    ngx_http_aiorch_ctx_t *ctx;
    ngx_pool_cleanup_t *cln;
    aiorch_http_request req;
    aiorch_header *hv;
    aiorch_handler *h;
    ngx_list_part_t *part;
    ngx_table_elt_t *th;
    ngx_uint_t i, n = 0;
    ngx_int_t rc;
    size_t max;

    if (ngx_http_aiorch_rt == NULL || alcf->index < 0 ||
        (ngx_uint_t)alcf->index >= ngx_http_aiorch_nhandlers)
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    h = ngx_http_aiorch_handlers[alcf->index];
    ctx = ngx_pcalloc(r->pool, sizeof *ctx);
    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (ctx == NULL || cln == NULL) return NGX_HTTP_INTERNAL_SERVER_ERROR;
    ctx->r = r;
    ngx_http_set_ctx(r, ctx, ngx_http_aiorch_module);
    cln->handler = ngx_http_aiorch_cleanup;
    cln->data = ctx;

    for (part = &r->headers_in.headers.part; part; part = part->next)
        n += part->nelts;
    hv = ngx_palloc(r->pool, (n ? n : 1) * sizeof *hv);
    if (hv == NULL) return NGX_HTTP_INTERNAL_SERVER_ERROR;
    n = 0;
    for (part = &r->headers_in.headers.part; part; part = part->next) {
        th = part->elts;
        for (i = 0; i < part->nelts; i++) {
            hv[n].name = (const char *)th[i].key.data;
            hv[n].name_len = th[i].key.len;
            hv[n].value = (const char *)th[i].value.data;
            hv[n].value_len = th[i].value.len;
            n++;
        }
    }
    req.method = ngx_http_aiorch_cstr(r->pool, &r->method_name);
    if (req.method == NULL) return NGX_HTTP_INTERNAL_SERVER_ERROR;
    req.target = (const char *)r->unparsed_uri.data;
    req.target_len = r->unparsed_uri.len;
    req.headers = hv;
    req.nheaders = n;

    /* on_headers may answer now: the body is not wanted then. */
    ctx->in_call = 1;
    ctx->rc = NGX_OK;
    ctx->x = aiorch_exchange_open(h, &req, &ngx_http_aiorch_sink, ctx);
    max = aiorch_handler_max_body(h);
    if (ctx->x && max && r->headers_in.content_length_n > (off_t)max) {
        aiorch_exchange *x = ctx->x;
        ctx->x = NULL;
        aiorch_exchange_refuse(x, 413);
    }
    ctx->in_call = 0;
    if (ctx->x == NULL) {
        if (!ctx->answered) return NGX_HTTP_INTERNAL_SERVER_ERROR;
        if (ctx->rc != NGX_ERROR && ngx_http_discard_request_body(r) != NGX_OK) return NGX_ERROR;
        return ctx->rc;
    }
    rc = ngx_http_read_client_request_body(r, ngx_http_aiorch_body_in);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        aiorch_exchange *x = ctx->x;
        ctx->x = NULL;
        if (x) aiorch_exchange_gone(x);
        return rc;
    }
    return NGX_DONE;
}
