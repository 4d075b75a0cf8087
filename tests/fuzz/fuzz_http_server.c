/* libFuzzer target: the server's request path (src/server.c), driven as a
 * client would. One runtime with one listening server (http_server.lua)
 * serves every input: each input is written over a new loopback connection,
 * then the write side is shut, and the loop runs until the server has
 * answered and closed it. A handler failure, a server that never closes,
 * a connection or descriptor left over, bytes still counted against
 * max_buffered, or a response that is not HTTP/1.1 aborts.
 *
 * Input: one byte k (low 3 bits), k 16-bit cut points, then the bytes sent.
 * Each piece between cuts is sent in its own loop iteration, after the
 * server has read the one before, so requests arrive split there. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>
#include <lauxlib.h>
#include <lua.h>

#include "aiorch.h"

#define HANG_S 10.0 /* far beyond any answer: the server's linger is 2 s */

static aiorch_runtime *rt;
static struct ev_loop *loop;
static int server_ref = LUA_NOREF, port, first_fd = -1;

typedef struct {
    ev_io io;
    ev_timer hang, pace;
    const uint8_t *data;
    size_t len, sent;
    size_t cuts[8], ncuts, next; /* sorted; cuts[next] ends the next piece */
    char head[9];                /* the first bytes answered */
    size_t got;
    int done;
} client;

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_http_server: %s\n", what);
    abort();
}

static void on_error(void *ud, const char *message)
{
    (void)ud;
    fprintf(stderr, "fuzz_http_server: runtime error: %s\n", message);
    abort();
}

/* A counter of server:stats(): "open" connections, "buffered" bytes. */
static lua_Integer server_stat(const char *name)
{
    lua_State *L = aiorch_runtime_lua(rt);
    lua_Integer n;
    lua_rawgeti(L, LUA_REGISTRYINDEX, server_ref);
    lua_getfield(L, -1, "stats");
    lua_insert(L, -2);
    lua_call(L, 1, 1);
    lua_getfield(L, -1, name);
    n = lua_tointeger(L, -1);
    lua_pop(L, 2);
    return n;
}

static void setup(void)
{
    aiorch_options opts = {.on_error = on_error};
    lua_State *L;

    rt = aiorch_runtime_new(&opts);
    if (!rt) fail("no runtime");
    loop = aiorch_runtime_loop(rt);
    if (aiorch_runtime_start(rt, AIORCH_FUZZ_DIR "/http_server.lua", 0, NULL) != 0)
        fail(aiorch_runtime_error(rt));
    L = aiorch_runtime_lua(rt);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, "fuzz_server");
    lua_getfield(L, -1, "port");
    port = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    server_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    if (port <= 0) fail("the server did not start");
}

static void client_read(client *c, int fd)
{
    char buf[16384];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            size_t k = (size_t)n < sizeof c->head - c->got ? (size_t)n : sizeof c->head - c->got;
            memcpy(c->head + c->got, buf, k);
            c->got += k;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        c->done = 1; /* EOF, or a reset after an early close */
        return;
    }
}

/* ev_timer, once per loop iteration: sends the next piece */
static void on_pace(struct ev_loop *l, ev_timer *w, int revents)
{
    client *c = w->data;
    size_t end = c->next < c->ncuts ? c->cuts[c->next] : c->len;
    (void)revents;
    while (c->sent < end) {
        ssize_t n = send(c->io.fd, c->data + c->sent, end - c->sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0) { /* the server closed early: the rest goes unsent */
            c->sent = end = c->len;
            break;
        }
        c->sent += (size_t)n;
    }
    if (c->sent == end && c->next < c->ncuts) c->next++;
    if (c->sent == c->len) {
        shutdown(c->io.fd, SHUT_WR);
        return;
    }
    ev_timer_set(w, 0., 0.);
    ev_timer_start(l, w);
}

/* ev_io: the client's socket */
static void on_client(struct ev_loop *l, ev_io *w, int revents)
{
    client *c = (client *)w;
    (void)l;
    (void)revents;
    client_read(c, w->fd);
    if (c->done) ev_io_stop(loop, w);
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* ev_timer */
static void on_hang(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
    fail("the server neither answered nor closed the connection");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct sockaddr_in sa;
    client c;
    int fd;

    if (!rt) setup();
    memset(&c, 0, sizeof c);
    if (size < 1 || size < 1 + 2 * (size_t)(data[0] & 7)) return 0;
    c.ncuts = data[0] & 7;
    c.data = data + 1 + 2 * c.ncuts;
    c.len = size - 1 - 2 * c.ncuts;
    for (size_t i = 0; i < c.ncuts; i++)
        c.cuts[i] = (size_t)(data[1 + 2 * i] | data[2 + 2 * i] << 8) % (c.len + 1);
    qsort(c.cuts, c.ncuts, sizeof c.cuts[0], cmp_size);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) fail(strerror(errno));
    /* Each input closes what it opened, so the number stays low (the
     * sanitizers' symbolizer may hold a few more). */
    if (first_fd < 0) first_fd = fd;
    if (fd > first_fd + 32) fail("descriptors accumulate");
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int tries = 0; connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0; tries++) {
        struct timespec ms10 = {0, 10000000};
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int err = 0;
        socklen_t len = sizeof err;
        if (errno == EINPROGRESS || errno == EINTR) { /* finishes on its own */
            while (poll(&p, 1, -1) < 0 && errno == EINTR)
                ;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) fail(strerror(err));
            break;
        }
        /* Out of ephemeral ports: the client side of every input ends in
         * TIME_WAIT, and others on the machine use ports too. Wait. */
        if (errno != EADDRNOTAVAIL || tries == 6000) fail(strerror(errno));
        nanosleep(&ms10, NULL);
    }
    ev_io_init(&c.io, on_client, fd, EV_READ);
    ev_io_start(loop, &c.io);
    /* Lowest priority: in each iteration the server accepts and reads what
     * came before the next piece is sent. */
    ev_timer_init(&c.pace, on_pace, 0., 0.);
    ev_set_priority(&c.pace, EV_MINPRI);
    c.pace.data = &c;
    ev_timer_start(loop, &c.pace);
    ev_now_update(loop);
    ev_timer_init(&c.hang, on_hang, HANG_S, 0.);
    ev_timer_start(loop, &c.hang);
    while (!c.done || server_stat("open") > 0)
        ev_run(loop, EVRUN_ONCE);
    if (server_stat("buffered") != 0) fail("bytes stay counted against max_buffered");
    ev_io_stop(loop, &c.io);
    ev_timer_stop(loop, &c.hang);
    ev_timer_stop(loop, &c.pace);
    close(fd);
    /* What the input allocated is freed before it ends, so that libFuzzer's
     * per-input leak check sees the server's own leaks, not Lua's garbage. */
    lua_gc(aiorch_runtime_lua(rt), LUA_GCCOLLECT);
    if (c.got && (c.got < 9 || memcmp(c.head, "HTTP/1.1 ", 9) != 0))
        fail("the answer is not an HTTP/1.1 response");
    return 0;
}
