/* The runtime's C API: instances, shared loops, budgets, teardown. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ev.h>

#include "aiorch.h"
#include "check.h"

static char dir[512];

static char *script(const char *name)
{
    static char path[1024];
    snprintf(path, sizeof path, "%s/c/%s", dir, name);
    return path;
}

/* Two runtimes on one host loop run their scripts at the same time. */
static void test_shared_loop(void)
{
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    aiorch_options opts = {.loop = loop};
    aiorch_runtime *a = aiorch_runtime_new(&opts);
    aiorch_runtime *b = aiorch_runtime_new(&opts);
    CHECK(a && b, "two runtimes");
    char *args_a[] = {"a", "5"}, *args_b[] = {"b", "5"};
    ev_tstamp t0 = ev_time();
    CHECK(aiorch_runtime_start(a, script("two_runtimes.lua"), 2, args_a) == 0, "%s",
          aiorch_runtime_error(a));
    CHECK(aiorch_runtime_start(b, script("two_runtimes.lua"), 2, args_b) == 0, "%s",
          aiorch_runtime_error(b));
    while (aiorch_runtime_busy(a) || aiorch_runtime_busy(b))
        ev_run(loop, EVRUN_ONCE);
    double ms = (ev_time() - t0) * 1000;
    /* 5 x 20 ms each: concurrently about 100 ms, one after the other 200
     * (AIORCH_TEST_SLOWDOWN, under valgrind: only the lower bound holds). */
    const char *slow = getenv("AIORCH_TEST_SLOWDOWN");
    CHECK(ms >= 95 && (ms < 190 || (slow && atof(slow) > 1)),
          "two runtimes interleave (took %.0f ms)", ms);
    aiorch_runtime_free(a);
    aiorch_runtime_free(b);
    ev_loop_destroy(loop);
}

/* Two runtimes with their own loops, one after the other and freed in either order. */
static void test_own_loops(void)
{
    aiorch_runtime *a = aiorch_runtime_new(NULL);
    aiorch_runtime *b = aiorch_runtime_new(NULL);
    char *args[] = {"x", "1"};
    CHECK(aiorch_runtime_run(a, script("two_runtimes.lua"), 2, args) == 0, "run a");
    CHECK(aiorch_runtime_run(b, script("two_runtimes.lua"), 2, args) == 0, "run b");
    CHECK(aiorch_runtime_loop(a) != aiorch_runtime_loop(b), "each has its own loop");
    aiorch_runtime_free(b);
    aiorch_runtime_free(a);
}

static void test_budget(void)
{
    aiorch_options opts = {.instruction_budget = 2000000};
    aiorch_runtime *rt = aiorch_runtime_new(&opts);
    int status = aiorch_runtime_run(rt, script("runaway.lua"), 0, NULL);
    CHECK(status == 7, "runaway task stopped, others went on (status %d: %s)", status,
          aiorch_runtime_error(rt));
    aiorch_runtime_free(rt);
}

static void test_errors(void)
{
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    int status = aiorch_runtime_run(rt, script("no-such-file.lua"), 0, NULL);
    CHECK(status == 1 && strstr(aiorch_runtime_error(rt), "no-such-file"), "missing script: %s",
          aiorch_runtime_error(rt));
    aiorch_runtime_free(rt);
}

/* Freeing a busy runtime aborts its transfers and timers (ASan checks for leaks). */
static void test_free_while_busy(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    bind(fd, (struct sockaddr *)&sa, sizeof sa);
    listen(fd, 8);
    getsockname(fd, (struct sockaddr *)&sa, &len);
    char port[16];
    snprintf(port, sizeof port, "%d", ntohs(sa.sin_port));
    char *args[] = {port};

    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    CHECK(aiorch_runtime_start(rt, script("pending.lua"), 1, args) == 0, "start");
    for (int i = 0; i < 20; i++)
        ev_run(aiorch_runtime_loop(rt), EVRUN_NOWAIT);
    CHECK(aiorch_runtime_busy(rt), "still busy");
    aiorch_runtime_free(rt);
    /* The client's connection was closed: accept it and read EOF. */
    int c = accept(fd, NULL, NULL);
    char buf[4096];
    ssize_t n = 0, got;
    while ((got = read(c, buf, sizeof buf)) > 0)
        n += got;
    CHECK(c >= 0 && got == 0 && n > 0, "the pending request was sent, then its socket closed");
    close(c);
    close(fd);
}

int main(int argc, char **argv)
{
    snprintf(dir, sizeof dir, "%s", argc > 1 ? argv[1] : ".");
    test_shared_loop();
    test_own_loops();
    test_budget();
    test_errors();
    test_free_while_busy();
    return check_summary();
}
