/* A fixed-size dictionary of numbers in shared memory, for the processes of
 * one server (the master and its workers): string keys, double values, an
 * expiry per entry. One process-shared robust mutex guards it; a process
 * that dies holding it costs the others one repair pass, never a wedge.
 * No Lua here: src/shm_lua.c is the binding (aiorch.shm). */
#ifndef AIORCH_SHM_H
#define AIORCH_SHM_H

#include <stddef.h>
#include <stdint.h>

/* The longest key, in bytes. */
#define AIORCH_SHM_KEY_MAX 224
/* Bounds of a segment's size, in bytes. */
#define AIORCH_SHM_MIN_SIZE (64 * 1024)
#define AIORCH_SHM_MAX_SIZE ((size_t)1 << 30)

/* Results: 0 is success; the others are expected outcomes. */
enum {
    AIORCH_SHM_OK = 0,
    AIORCH_SHM_FULL = -1,      /* no entry free, even after dropping the expired */
    AIORCH_SHM_NOT_FOUND = -2, /* absent (or expired) */
    AIORCH_SHM_EXISTS = -3,    /* add: present already */
    AIORCH_SHM_CHANGED = -4,   /* cas: the value was not the expected one */
    AIORCH_SHM_ERROR = -5      /* a system call failed, or the segment is not ours */
};

typedef struct aiorch_shm aiorch_shm;

typedef struct aiorch_shm_item {
    char key[AIORCH_SHM_KEY_MAX + 1];
    size_t len;
    double value;
} aiorch_shm_item;

typedef struct aiorch_shm_delta {
    const char *key;
    size_t len;
    double n;
} aiorch_shm_delta;

typedef struct aiorch_shm_stats {
    size_t size;       /* bytes mapped */
    uint32_t capacity; /* entries */
    uint32_t used;
    uint64_t repairs; /* times a dead holder's lock was recovered */
    uint64_t full;    /* inserts refused for want of room */
} aiorch_shm_stats;

/* A new anonymous segment of `size` bytes (a memfd on Linux; elsewhere a
 * POSIX shm object unlinked at once): nothing names it, so nothing is left
 * behind when the last process holding it goes. err gets a message. */
aiorch_shm *aiorch_shm_create(size_t size, char *err, size_t errlen);
/* Maps the segment behind an inherited descriptor, which it then owns. */
aiorch_shm *aiorch_shm_attach(int fd, char *err, size_t errlen);
/* Unmaps it and closes its descriptor (the segment lives on in others). */
void aiorch_shm_close(aiorch_shm *d);
/* The segment's descriptor (to pass to a child), or -1 once released. */
int aiorch_shm_fd(const aiorch_shm *d);
/* Closes the descriptor, keeping the mapping. */
void aiorch_shm_release_fd(aiorch_shm *d);

/* CLOCK_MONOTONIC in ms: the clock of expiry, the same in every process. */
double aiorch_shm_now(void);

/* ttl_ms: 0 never expires. Keys are 1 to AIORCH_SHM_KEY_MAX bytes. */
int aiorch_shm_get(aiorch_shm *d, const char *key, size_t len, double *value);
int aiorch_shm_set(aiorch_shm *d, const char *key, size_t len, double value, double ttl_ms);
int aiorch_shm_add(aiorch_shm *d, const char *key, size_t len, double value, double ttl_ms);
/* Adds n; an absent key starts at *init (NOT_FOUND when init is NULL) and
 * gets ttl_ms; a present one keeps its expiry. */
int aiorch_shm_incr(aiorch_shm *d, const char *key, size_t len, double n, const double *init,
                    double ttl_ms, double *out);
/* Sets new when the value is *old (old NULL: when absent); else CHANGED,
 * with the value in *cur (NOT_FOUND when it is absent). */
int aiorch_shm_cas(aiorch_shm *d, const char *key, size_t len, const double *old, double new_value,
                   double ttl_ms, double *cur);
int aiorch_shm_delete(aiorch_shm *d, const char *key, size_t len);
/* Adds each delta (absent keys start at 0, without expiry), all or none;
 * out[i] gets key i's new value. */
int aiorch_shm_incr_many(aiorch_shm *d, const aiorch_shm_delta *ops, size_t n, double *out);
/* Copies the live entries whose key starts with prefix into items, at
 * most cap of them; *total gets how many there are (more than cap: call
 * again with room for them). */
int aiorch_shm_items(aiorch_shm *d, const char *prefix, size_t plen, aiorch_shm_item *items,
                     size_t cap, size_t *total);
void aiorch_shm_stats_get(aiorch_shm *d, aiorch_shm_stats *st);

/* For tests: the process _exits while holding the lock, in the middle of
 * the next insert (1) or delete (2), to show that nobody is wedged. */
void aiorch_shm_crash_at(aiorch_shm *d, int point);

#endif
