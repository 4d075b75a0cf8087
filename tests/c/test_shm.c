/* The shared dictionary (src/shm.c) from several processes: totals stay
 * exact under contention, a process that dies holding the lock wedges
 * nobody and corrupts nothing, a full segment says so. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shm.h"

#define PROCS 4
#define ROUNDS 20000

static int failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static aiorch_shm *fresh(size_t size)
{
    char err[256];
    aiorch_shm *d = aiorch_shm_create(size, err, sizeof err);
    if (!d) {
        fprintf(stderr, "create: %s\n", err);
        exit(1);
    }
    return d;
}

static double get(aiorch_shm *d, const char *k)
{
    double v = -1;
    if (aiorch_shm_get(d, k, strlen(k), &v) != AIORCH_SHM_OK) return -1;
    return v;
}

static double incr(aiorch_shm *d, const char *k, double n)
{
    double init = 0, out = -1;
    aiorch_shm_incr(d, k, strlen(k), n, &init, 0, &out);
    return out;
}

/* Runs fn(d, i) in PROCS children at once; returns how many exited 0. */
static int in_children(aiorch_shm *d, void (*fn)(aiorch_shm *, int))
{
    pid_t pids[PROCS];
    int i, ok = 0;
    for (i = 0; i < PROCS; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            fn(d, i);
            _exit(0);
        }
    }
    for (i = 0; i < PROCS; i++) {
        int st;
        if (waitpid(pids[i], &st, 0) == pids[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0) ok++;
    }
    return ok;
}

static void hammer_incr(aiorch_shm *d, int who)
{
    char key[32];
    int i;
    for (i = 0; i < ROUNDS; i++) {
        incr(d, "total", 1);
        snprintf(key, sizeof key, "k%d", i % 50); /* shared keys, made and found concurrently */
        incr(d, key, 1);
        if (i % 100 == 0) {
            snprintf(key, sizeof key, "own%d", who);
            incr(d, key, 100);
        }
    }
}

/* Increments by compare-and-set, retrying on a change, as a GCRA would. */
static void hammer_cas(aiorch_shm *d, int who)
{
    int i;
    (void)who;
    for (i = 0; i < ROUNDS / 4; i++) {
        for (;;) {
            double cur = 0, v = get(d, "cas");
            int r = v < 0 ? aiorch_shm_cas(d, "cas", 3, NULL, 1, 0, &cur)
                          : aiorch_shm_cas(d, "cas", 3, &v, v + 1, 0, &cur);
            if (r == AIORCH_SHM_OK) break;
            if (r != AIORCH_SHM_CHANGED && r != AIORCH_SHM_NOT_FOUND) _exit(2);
        }
    }
}

static void hammer_many(aiorch_shm *d, int who)
{
    aiorch_shm_delta ops[3] = {{"m.a", 3, 1}, {"m.b", 3, 2}, {"m.c", 3, -1}};
    double out[3];
    int i;
    (void)who;
    for (i = 0; i < ROUNDS / 4; i++)
        if (aiorch_shm_incr_many(d, ops, 3, out) != AIORCH_SHM_OK) _exit(2);
}

static void test_concurrency(void)
{
    aiorch_shm *d = fresh(1 << 20);
    int i, ok;
    double sum = 0;
    char key[32];
    ok = in_children(d, hammer_incr);
    CHECK(ok == PROCS, "%d of %d children finished", ok, PROCS);
    CHECK(get(d, "total") == PROCS * ROUNDS, "total %.0f, not %d", get(d, "total"), PROCS * ROUNDS);
    for (i = 0; i < 50; i++) {
        snprintf(key, sizeof key, "k%d", i);
        sum += get(d, key);
    }
    CHECK(sum == PROCS * ROUNDS, "the shared keys hold %.0f, not %d", sum, PROCS * ROUNDS);
    for (i = 0; i < PROCS; i++) {
        snprintf(key, sizeof key, "own%d", i);
        CHECK(get(d, key) == ROUNDS, "%s is %.0f", key, get(d, key));
    }
    ok = in_children(d, hammer_cas);
    CHECK(ok == PROCS, "cas: %d of %d children finished", ok, PROCS);
    CHECK(get(d, "cas") == PROCS * (ROUNDS / 4), "cas total %.0f, not %d", get(d, "cas"),
          PROCS * (ROUNDS / 4));
    ok = in_children(d, hammer_many);
    CHECK(ok == PROCS, "incr_many: %d of %d children finished", ok, PROCS);
    CHECK(get(d, "m.a") == PROCS * (ROUNDS / 4) && get(d, "m.b") == 2 * PROCS * (ROUNDS / 4) &&
              get(d, "m.c") == -PROCS * (ROUNDS / 4),
          "incr_many totals %.0f %.0f %.0f", get(d, "m.a"), get(d, "m.b"), get(d, "m.c"));
    aiorch_shm_close(d);
}

/* A child dies holding the lock in the middle of an insert (1) or a
 * delete (2): the parent's next call recovers the lock, repairs, and
 * every entry is still there or free again. */
static void test_dead_holder(int point)
{
    aiorch_shm *d = fresh(1 << 16);
    aiorch_shm_stats st0, st;
    pid_t pid;
    int status, i;
    char key[32];
    for (i = 0; i < 100; i++) {
        snprintf(key, sizeof key, "key%d", i);
        incr(d, key, i);
    }
    aiorch_shm_stats_get(d, &st0);
    pid = fork();
    if (pid == 0) {
        aiorch_shm_crash_at(d, point);
        if (point == 1)
            incr(d, "new", 1);
        else
            aiorch_shm_delete(d, "key7", 4);
        _exit(0); /* not reached */
    }
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 99,
          "point %d: the child did not die in the lock", point);
    /* would block forever on a plain mutex */
    CHECK(incr(d, "after", 1) == 1, "point %d: the dictionary is wedged", point);
    aiorch_shm_stats_get(d, &st);
    CHECK(st.repairs == 1, "point %d: %llu repairs", point, (unsigned long long)st.repairs);
    for (i = 0; i < 100; i++) {
        double want = (point == 2 && i == 7) ? -1 : i;
        snprintf(key, sizeof key, "key%d", i);
        CHECK(get(d, key) == want, "point %d: %s is %.0f", point, key, get(d, key));
    }
    CHECK(get(d, "new") == -1, "point %d: the half-made entry is visible", point);
    /* the dead child's entry is free again: the segment fills to its capacity */
    CHECK(st.used == st0.used + 1 - (point == 2), "point %d: used %u after, %u before", point,
          st.used, st0.used);
    for (i = 0; i < (int)st.capacity; i++) {
        snprintf(key, sizeof key, "fill%d", i);
        if (incr(d, key, 1) != 1) break;
    }
    aiorch_shm_stats_get(d, &st);
    CHECK(st.used == st.capacity, "point %d: filled to %u of %u", point, st.used, st.capacity);
    aiorch_shm_close(d);
}

static void test_full_and_expiry(void)
{
    aiorch_shm *d = fresh(AIORCH_SHM_MIN_SIZE);
    aiorch_shm_stats st;
    double init = 0, out, v;
    aiorch_shm_delta ops[2] = {{"a", 1, 1}, {"b", 1, 1}};
    char key[32];
    int i, r = 0;
    aiorch_shm_stats_get(d, &st);
    CHECK(st.capacity > 100, "a 64 KiB segment holds %u entries", st.capacity);
    for (i = 0; (unsigned)i < st.capacity; i++) {
        snprintf(key, sizeof key, "k%d", i);
        r = aiorch_shm_incr(d, key, strlen(key), 1, &init, i < 10 ? 50 : 0, &out);
        if (r != AIORCH_SHM_OK) break;
    }
    CHECK(r == AIORCH_SHM_OK, "filling stopped at %d: %d", i, r);
    CHECK(aiorch_shm_set(d, "one more", 8, 1, 0) == AIORCH_SHM_FULL, "a full segment took a key");
    CHECK(aiorch_shm_incr_many(d, ops, 2, &out) == AIORCH_SHM_FULL, "incr_many on a full segment");
    CHECK(get(d, "k200") == 1, "a full segment lost a key");
    {
        struct timespec ts = {0, 80 * 1000 * 1000}; /* k0..k9 expire: their room is taken back */
        nanosleep(&ts, NULL);
    }
    CHECK(get(d, "k3") == -1, "an expired key is still there");
    CHECK(aiorch_shm_set(d, "one more", 8, 7, 0) == AIORCH_SHM_OK,
          "expired entries were not reused");
    CHECK(get(d, "one more") == 7, "the new key");
    CHECK(aiorch_shm_add(d, "one more", 8, 9, 0) == AIORCH_SHM_EXISTS, "add over a present key");
    CHECK(aiorch_shm_delete(d, "one more", 8) == AIORCH_SHM_OK, "delete");
    CHECK(aiorch_shm_delete(d, "one more", 8) == AIORCH_SHM_NOT_FOUND, "delete twice");
    CHECK(aiorch_shm_incr(d, "absent", 6, 1, NULL, 0, &out) == AIORCH_SHM_NOT_FOUND,
          "incr without init");
    v = 5;
    CHECK(aiorch_shm_cas(d, "k20", 3, &v, 2, 0, &out) == AIORCH_SHM_CHANGED && out == 1,
          "cas with a stale value");
    aiorch_shm_stats_get(d, &st);
    CHECK(st.full >= 2, "full counted %llu times", (unsigned long long)st.full);
    aiorch_shm_close(d);
}

/* A descriptor passed on is attached, and both views see one segment;
 * something else is refused. */
static void test_attach(void)
{
    aiorch_shm *d = fresh(1 << 16), *e;
    char err[256];
    int fd = dup(aiorch_shm_fd(d)), fds[2];
    e = aiorch_shm_attach(fd, err, sizeof err);
    CHECK(e != NULL, "attach: %s", err);
    if (e) {
        incr(d, "x", 2);
        CHECK(incr(e, "x", 3) == 5, "two views, two segments");
        aiorch_shm_close(e);
    }
    if (pipe(fds) == 0) {
        CHECK(aiorch_shm_attach(fds[0], err, sizeof err) == NULL, "a pipe was attached");
        close(fds[0]);
        close(fds[1]);
    }
    aiorch_shm_close(d);
}

int main(void)
{
    test_concurrency();
    test_dead_holder(1);
    test_dead_holder(2);
    test_full_and_expiry();
    test_attach();
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("shm: all passed\n");
    return 0;
}
