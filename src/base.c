/* The bottom layer: what every other file of the runtime may use, and
 * which uses none of them. Reports, the clock, and Lua's allocator. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

void aiorch_report(aiorch_runtime *rt, const char *fmt, ...)
{
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    rt->on_error(rt->error_ud, buf);
}

double aiorch_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Lua's allocator, for every block of a state the runtime creates. Most
 * of Lua's blocks are small and short-lived, and malloc and free cost ~200
 * instructions a pair there (12% of a gateway request): freed blocks of up
 * to 256 bytes are kept on lists by size class, 16 bytes apart, and reused.
 * A small block is always allocated with its class's full size, so the
 * size Lua gives back names its class. The lists hold up to BLOCK_KEEP
 * bytes together: the collector frees a whole cycle's garbage in one sweep,
 * and lists too short for it (2,048 blocks a class once) sent the rest to
 * free and the next cycle's allocations back to malloc (60 a request).
 * aiorch_alloc_trim returns them to malloc. Under ASan all go to malloc,
 * so that misuse is still caught. */
#define BLOCK_CLASSES 16
#define BLOCK_KEEP (8u << 20)

#if defined(__SANITIZE_ADDRESS__)
#define KEEP_BLOCKS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KEEP_BLOCKS 0
#endif
#endif
#ifndef KEEP_BLOCKS
#define KEEP_BLOCKS 1
#endif

static void block_free(aiorch_runtime *rt, void *p, size_t size)
{
    size_t k = (size + 15) / 16;
    if (KEEP_BLOCKS && k >= 1 && k <= BLOCK_CLASSES && rt->kept + k * 16 <= BLOCK_KEEP) {
        *(void **)p = rt->blocks[k];
        rt->blocks[k] = p;
        rt->kept += k * 16;
        return;
    }
    free(p);
}

static void *block_alloc(aiorch_runtime *rt, size_t size)
{
    size_t k = (size + 15) / 16;
    if (k > BLOCK_CLASSES) return malloc(size);
    if (rt->blocks[k]) {
        void *p = rt->blocks[k];
        rt->blocks[k] = *(void **)p;
        rt->kept -= k * 16;
        return p;
    }
    return malloc(k * 16);
}

/* lua_Alloc; ud is the runtime */
void *aiorch_lua_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    aiorch_runtime *rt = ud;
    void *p;

    if (nsize == 0) {
        if (ptr) block_free(rt, ptr, osize);
        return NULL;
    }
    if (!ptr) return block_alloc(rt, nsize);
    if (osize > BLOCK_CLASSES * 16 && nsize > BLOCK_CLASSES * 16) return realloc(ptr, nsize);
    if ((nsize + 15) / 16 == (osize + 15) / 16) return ptr; /* the same class */
    p = block_alloc(rt, nsize);
    if (!p) return NULL;
    memcpy(p, ptr, osize < nsize ? osize : nsize);
    block_free(rt, ptr, osize);
    return p;
}

void aiorch_alloc_trim(aiorch_runtime *rt)
{
    for (int k = 0; k <= BLOCK_CLASSES; k++) {
        while (rt->blocks[k]) {
            void *p = rt->blocks[k];
            rt->blocks[k] = *(void **)p;
            free(p);
        }
    }
    rt->kept = 0;
}

/* A helper thread takes no signal: they stay the host's main thread's,
 * whose loop they must interrupt (nginx's worker sets its flags from its
 * handlers, then returns from epoll_wait to act on them). */
int aiorch_thread_start(pthread_t *t, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    int rc;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}
