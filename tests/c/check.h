/* The C tests' checks: CHECK counts a pass, or prints where and why it
 * failed (from any thread); check_summary() prints the counts and gives
 * the exit code. Each test is one file that includes this once. */
#ifndef AIORCH_TESTS_CHECK_H
#define AIORCH_TESTS_CHECK_H

#include <stdio.h>
#include <time.h>

static int failures, passes;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            __atomic_add_fetch(&passes, 1, __ATOMIC_RELAXED);                                      \
        } else {                                                                                   \
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);                                    \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                            \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
        }                                                                                          \
    } while (0)

static inline int check_summary(void)
{
    printf("%d passed, %d failed\n", passes, failures);
    return failures ? 1 : 0;
}

static inline double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

#endif
