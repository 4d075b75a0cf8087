/* The shared dictionary (shm.h): one segment holds a header, a table of
 * buckets and fixed-size entries, chained by index.
 *
 *   [header: magic, sizes, free list, counts, the robust mutex]
 *   [buckets: uint32 index of a chain's first entry, 0 for none]
 *   [entries: 256 bytes each: next, hash, key length, value, expiry, key]
 *
 * Every change is ordered so that a process that stops at any instruction
 * leaves chains that are whole: an entry is filled before it is linked and
 * unlinked before it is freed. What such a stop can leave is an entry on no
 * chain and no free list; the next locker gets EOWNERDEAD and repair()
 * rebuilds the free list from what the chains reach. Entries never used
 * yet are handed out from `fresh` up, so a large segment's untouched pages
 * cost no memory. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* memfd_create */
#endif

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "shm.h"

#define SHM_MAGIC 0x736f6961u /* "aios" */
#define SHM_VERSION 1u
#define SHM_ALIGN 64

typedef struct shm_header {
    uint32_t magic, version;
    uint64_t size;
    uint32_t nbuckets, nentries;
    uint32_t free_head; /* a freed entry, 0 for none */
    uint32_t fresh;     /* the first entry never used; nentries + 1 once all were */
    uint32_t used;
    uint32_t pad;
    uint64_t repairs, full;
    pthread_mutex_t lock;
} shm_header;

typedef struct shm_entry {
    uint32_t next; /* the chain, or the free list */
    uint32_t hash;
    uint8_t klen;
    uint8_t mark; /* repair's: reached from a bucket */
    uint8_t pad[6];
    double value;
    double expires; /* aiorch_shm_now() ms; 0: never */
    char key[AIORCH_SHM_KEY_MAX];
} shm_entry;

_Static_assert(sizeof(shm_entry) == 256, "an entry is 256 bytes");
_Static_assert(AIORCH_SHM_KEY_MAX <= 255, "klen is a byte");

struct aiorch_shm {
    shm_header *h;
    uint32_t *buckets;
    shm_entry *entries;
    size_t size;
    int fd;
    int crash_at;
};

static size_t align_up(size_t n)
{
    return (n + SHM_ALIGN - 1) & ~(size_t)(SHM_ALIGN - 1);
}

/* The layout of a segment of `size` bytes: about one bucket per entry. */
static int layout(size_t size, uint32_t *nb, uint32_t *ne, size_t *boff, size_t *eoff)
{
    size_t head = align_up(sizeof(shm_header)), avail, b = 1, n;
    if (size < AIORCH_SHM_MIN_SIZE || size > AIORCH_SHM_MAX_SIZE) return -1;
    avail = size - head;
    while ((b * 2) * (sizeof(uint32_t) + sizeof(shm_entry)) <= avail)
        b *= 2;
    n = (avail - align_up(b * sizeof(uint32_t))) / sizeof(shm_entry);
    *nb = (uint32_t)b;
    *ne = (uint32_t)n;
    *boff = head;
    *eoff = head + align_up(b * sizeof(uint32_t));
    return 0;
}

double aiorch_shm_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* FNV-1a */
static uint32_t hash_key(const char *k, size_t n)
{
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= (unsigned char)k[i];
        h *= 16777619u;
    }
    return h;
}

static shm_entry *entry_at(aiorch_shm *d, uint32_t idx)
{
    return &d->entries[idx - 1];
}

static int expired(const shm_entry *e, double now)
{
    return e->expires > 0 && e->expires <= now;
}

static double expiry(double ttl_ms, double now)
{
    return ttl_ms > 0 ? now + ttl_ms : 0;
}

/* After a holder died: every chain is cut where it stops making sense (an
 * index out of range, an entry reached twice, a key that is not its
 * bucket's), and every entry no chain reaches is free again. */
static void repair(aiorch_shm *d)
{
    shm_header *h = d->h;
    uint32_t nb = h->nbuckets, ne = h->nentries, i, b, used = 0;
    if (h->fresh < 1 || h->fresh > ne + 1) h->fresh = ne + 1;
    for (i = 1; i < h->fresh; i++)
        entry_at(d, i)->mark = 0;
    for (b = 0; b < nb; b++) {
        uint32_t *link = &d->buckets[b];
        while (*link) {
            uint32_t idx = *link;
            shm_entry *e;
            if (idx >= h->fresh) {
                *link = 0;
                break;
            }
            e = entry_at(d, idx);
            if (e->mark || e->klen == 0 || e->klen > AIORCH_SHM_KEY_MAX ||
                hash_key(e->key, e->klen) != e->hash || (e->hash & (nb - 1)) != b) {
                *link = 0;
                break;
            }
            e->mark = 1;
            used++;
            link = &e->next;
        }
    }
    h->free_head = 0;
    for (i = h->fresh - 1; i >= 1; i--) {
        shm_entry *e = entry_at(d, i);
        if (e->mark) continue;
        e->next = h->free_head;
        h->free_head = i;
    }
    h->used = used;
    h->repairs++;
}

static int shm_lock(aiorch_shm *d)
{
    int r = pthread_mutex_lock(&d->h->lock);
    if (r == EOWNERDEAD) {
        repair(d);
        pthread_mutex_consistent(&d->h->lock);
        return 0;
    }
    return r == 0 ? 0 : AIORCH_SHM_ERROR;
}

static void shm_unlock(aiorch_shm *d)
{
    pthread_mutex_unlock(&d->h->lock);
}

/* Unlinks the entry *link points to and frees it. */
static void unlink_free(aiorch_shm *d, uint32_t *link)
{
    shm_header *h = d->h;
    uint32_t idx = *link;
    shm_entry *e = entry_at(d, idx);
    *link = e->next;
    if (d->crash_at == 2) _exit(99);
    e->next = h->free_head;
    h->free_head = idx;
    h->used--;
}

/* The link that points to key's live entry, or NULL; expired entries met
 * on the way are freed. */
static uint32_t *find_link(aiorch_shm *d, const char *key, size_t len, uint32_t hash, double now)
{
    uint32_t *link = &d->buckets[hash & (d->h->nbuckets - 1)];
    while (*link) {
        shm_entry *e = entry_at(d, *link);
        if (expired(e, now)) {
            unlink_free(d, link);
            continue;
        }
        if (e->hash == hash && e->klen == len && memcmp(e->key, key, len) == 0) return link;
        link = &e->next;
    }
    return NULL;
}

static shm_entry *find(aiorch_shm *d, const char *key, size_t len, uint32_t hash, double now)
{
    uint32_t *link = find_link(d, key, len, hash, now);
    return link ? entry_at(d, *link) : NULL;
}

/* Frees every expired entry. */
static void sweep(aiorch_shm *d, double now)
{
    uint32_t b;
    for (b = 0; b < d->h->nbuckets; b++) {
        uint32_t *link = &d->buckets[b];
        while (*link) {
            if (expired(entry_at(d, *link), now))
                unlink_free(d, link);
            else
                link = &entry_at(d, *link)->next;
        }
    }
}

static uint32_t free_count(const shm_header *h)
{
    return h->nentries - h->used;
}

/* A new entry for key (absent), linked; NULL when there is no room. */
static shm_entry *insert(aiorch_shm *d, const char *key, size_t len, uint32_t hash, double value,
                         double expires, double now)
{
    shm_header *h = d->h;
    uint32_t idx, *bucket;
    shm_entry *e;
    if (!h->free_head && h->fresh > h->nentries) sweep(d, now);
    if (h->free_head) {
        idx = h->free_head;
        h->free_head = entry_at(d, idx)->next;
    } else if (h->fresh <= h->nentries) {
        idx = h->fresh++;
    } else {
        h->full++;
        return NULL;
    }
    if (d->crash_at == 1) _exit(99);
    e = entry_at(d, idx);
    bucket = &d->buckets[hash & (h->nbuckets - 1)];
    memcpy(e->key, key, len);
    e->klen = (uint8_t)len;
    e->hash = hash;
    e->value = value;
    e->expires = expires;
    e->next = *bucket;
    *bucket = idx; /* published: whole from here on */
    h->used++;
    return e;
}

static int key_ok(const char *key, size_t len)
{
    return key && len >= 1 && len <= AIORCH_SHM_KEY_MAX;
}

static aiorch_shm *map_segment(int fd, size_t size, char *err, size_t errlen)
{
    aiorch_shm *d;
    void *p;
    uint32_t nb, ne;
    size_t boff, eoff;
    if (layout(size, &nb, &ne, &boff, &eoff) < 0) {
        snprintf(err, errlen, "a segment is %u to %zu bytes, not %zu",
                 (unsigned)AIORCH_SHM_MIN_SIZE, AIORCH_SHM_MAX_SIZE, size);
        return NULL;
    }
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        snprintf(err, errlen, "mmap: %s", strerror(errno));
        return NULL;
    }
    d = calloc(1, sizeof *d);
    if (!d) {
        munmap(p, size);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    d->h = p;
    d->buckets = (uint32_t *)((char *)p + boff);
    d->entries = (shm_entry *)((char *)p + eoff);
    d->size = size;
    d->fd = fd;
    return d;
}

static int new_fd(char *err, size_t errlen)
{
    int fd;
#ifdef __linux__
    fd = memfd_create("aiorch-state", MFD_CLOEXEC);
#else
    char name[64];
    int tries;
    for (tries = 0; tries < 100; tries++) {
        snprintf(name, sizeof name, "/aiorch-%ld-%ld-%d", (long)getpid(), (long)time(NULL), tries);
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd >= 0 || errno != EEXIST) break;
    }
    if (fd >= 0) {
        shm_unlink(name); /* anonymous from here on */
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
#endif
    if (fd < 0) snprintf(err, errlen, "cannot create a shared memory segment: %s", strerror(errno));
    return fd;
}

aiorch_shm *aiorch_shm_create(size_t size, char *err, size_t errlen)
{
    pthread_mutexattr_t attr;
    shm_header *h;
    aiorch_shm *d;
    uint32_t nb, ne;
    size_t boff, eoff;
    int fd, r;
    if (layout(size, &nb, &ne, &boff, &eoff) < 0) {
        snprintf(err, errlen, "a segment is %u to %zu bytes, not %zu",
                 (unsigned)AIORCH_SHM_MIN_SIZE, AIORCH_SHM_MAX_SIZE, size);
        return NULL;
    }
    fd = new_fd(err, errlen);
    if (fd < 0) return NULL;
    if (ftruncate(fd, (off_t)size) < 0) {
        snprintf(err, errlen, "cannot size the shared memory segment: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    d = map_segment(fd, size, err, errlen);
    if (!d) {
        close(fd);
        return NULL;
    }
    h = d->h; /* zero-filled by ftruncate: every bucket empty */
    h->size = size;
    h->nbuckets = nb;
    h->nentries = ne;
    h->fresh = 1;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    r = pthread_mutex_init(&h->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    if (r != 0) {
        snprintf(err, errlen, "pthread_mutex_init: %s", strerror(r));
        aiorch_shm_close(d);
        return NULL;
    }
    h->version = SHM_VERSION;
    h->magic = SHM_MAGIC; /* last: a segment with it is ready */
    return d;
}

aiorch_shm *aiorch_shm_attach(int fd, char *err, size_t errlen)
{
    struct stat st;
    aiorch_shm *d;
    shm_header *h;
    uint32_t nb, ne;
    size_t boff, eoff;
    if (fstat(fd, &st) < 0) {
        snprintf(err, errlen, "descriptor %d: %s", fd, strerror(errno));
        return NULL;
    }
    d = map_segment(fd, (size_t)st.st_size, err, errlen);
    if (!d) return NULL;
    h = d->h;
    if (layout(d->size, &nb, &ne, &boff, &eoff) < 0) nb = ne = 0; /* map_segment checked it */
    if (h->magic != SHM_MAGIC || h->version != SHM_VERSION || h->size != d->size ||
        h->nbuckets != nb || h->nentries != ne) {
        snprintf(err, errlen, "descriptor %d is not an aiorch shared memory segment", fd);
        munmap(d->h, d->size);
        free(d);
        return NULL;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return d;
}

void aiorch_shm_close(aiorch_shm *d)
{
    if (!d) return;
    munmap(d->h, d->size);
    if (d->fd >= 0) close(d->fd);
    free(d);
}

int aiorch_shm_fd(const aiorch_shm *d)
{
    return d->fd;
}

void aiorch_shm_release_fd(aiorch_shm *d)
{
    if (d->fd >= 0) close(d->fd);
    d->fd = -1;
}

void aiorch_shm_crash_at(aiorch_shm *d, int point)
{
    d->crash_at = point;
}

int aiorch_shm_get(aiorch_shm *d, const char *key, size_t len, double *value)
{
    shm_entry *e;
    int r;
    if (!key_ok(key, len)) return AIORCH_SHM_ERROR;
    if ((r = shm_lock(d)) != 0) return r;
    e = find(d, key, len, hash_key(key, len), aiorch_shm_now());
    if (e) *value = e->value;
    shm_unlock(d);
    return e ? AIORCH_SHM_OK : AIORCH_SHM_NOT_FOUND;
}

/* set (add = 0) or add (add = 1) */
static int store(aiorch_shm *d, const char *key, size_t len, double value, double ttl_ms, int add)
{
    uint32_t hash = hash_key(key, len);
    double now;
    shm_entry *e;
    int r;
    if (!key_ok(key, len)) return AIORCH_SHM_ERROR;
    if ((r = shm_lock(d)) != 0) return r;
    now = aiorch_shm_now();
    e = find(d, key, len, hash, now);
    if (e && add) {
        r = AIORCH_SHM_EXISTS;
    } else if (e) {
        e->value = value;
        e->expires = expiry(ttl_ms, now);
    } else if (!insert(d, key, len, hash, value, expiry(ttl_ms, now), now)) {
        r = AIORCH_SHM_FULL;
    }
    shm_unlock(d);
    return r;
}

int aiorch_shm_set(aiorch_shm *d, const char *key, size_t len, double value, double ttl_ms)
{
    return store(d, key, len, value, ttl_ms, 0);
}

int aiorch_shm_add(aiorch_shm *d, const char *key, size_t len, double value, double ttl_ms)
{
    return store(d, key, len, value, ttl_ms, 1);
}

int aiorch_shm_incr(aiorch_shm *d, const char *key, size_t len, double n, const double *init,
                    double ttl_ms, double *out)
{
    uint32_t hash = hash_key(key, len);
    double now;
    shm_entry *e;
    int r;
    if (!key_ok(key, len)) return AIORCH_SHM_ERROR;
    if ((r = shm_lock(d)) != 0) return r;
    now = aiorch_shm_now();
    e = find(d, key, len, hash, now);
    if (e) {
        e->value += n;
        *out = e->value;
    } else if (!init) {
        r = AIORCH_SHM_NOT_FOUND;
    } else if ((e = insert(d, key, len, hash, *init + n, expiry(ttl_ms, now), now))) {
        *out = e->value;
    } else {
        r = AIORCH_SHM_FULL;
    }
    shm_unlock(d);
    return r;
}

int aiorch_shm_cas(aiorch_shm *d, const char *key, size_t len, const double *old, double new_value,
                   double ttl_ms, double *cur)
{
    uint32_t hash = hash_key(key, len);
    double now;
    shm_entry *e;
    int r;
    if (!key_ok(key, len)) return AIORCH_SHM_ERROR;
    if ((r = shm_lock(d)) != 0) return r;
    now = aiorch_shm_now();
    e = find(d, key, len, hash, now);
    if (!old && e) {
        *cur = e->value;
        r = AIORCH_SHM_CHANGED;
    } else if (!old) {
        if (!insert(d, key, len, hash, new_value, expiry(ttl_ms, now), now)) r = AIORCH_SHM_FULL;
    } else if (!e) {
        r = AIORCH_SHM_NOT_FOUND;
    } else if (e->value != *old) {
        *cur = e->value;
        r = AIORCH_SHM_CHANGED;
    } else {
        e->value = new_value;
        e->expires = expiry(ttl_ms, now);
    }
    shm_unlock(d);
    return r;
}

int aiorch_shm_delete(aiorch_shm *d, const char *key, size_t len)
{
    uint32_t *link;
    int r;
    if (!key_ok(key, len)) return AIORCH_SHM_ERROR;
    if ((r = shm_lock(d)) != 0) return r;
    link = find_link(d, key, len, hash_key(key, len), aiorch_shm_now());
    if (link)
        unlink_free(d, link);
    else
        r = AIORCH_SHM_NOT_FOUND;
    shm_unlock(d);
    return r;
}

int aiorch_shm_incr_many(aiorch_shm *d, const aiorch_shm_delta *ops, size_t n, double *out)
{
    size_t i, missing = 0;
    double now;
    int r;
    for (i = 0; i < n; i++)
        if (!key_ok(ops[i].key, ops[i].len)) return AIORCH_SHM_ERROR;
    if ((r = shm_lock(d)) != 0) return r;
    now = aiorch_shm_now();
    for (i = 0; i < n; i++)
        if (!find(d, ops[i].key, ops[i].len, hash_key(ops[i].key, ops[i].len), now)) missing++;
    if (missing > free_count(d->h)) sweep(d, now);
    if (missing > free_count(d->h)) {
        d->h->full++;
        shm_unlock(d);
        return AIORCH_SHM_FULL;
    }
    for (i = 0; i < n; i++) {
        uint32_t hash = hash_key(ops[i].key, ops[i].len);
        shm_entry *e = find(d, ops[i].key, ops[i].len, hash, now);
        if (e)
            e->value += ops[i].n;
        else
            e = insert(d, ops[i].key, ops[i].len, hash, ops[i].n, 0, now);
        out[i] = e ? e->value : 0; /* e: room was checked above */
    }
    shm_unlock(d);
    return AIORCH_SHM_OK;
}

int aiorch_shm_items(aiorch_shm *d, const char *prefix, size_t plen, aiorch_shm_item *items,
                     size_t cap, size_t *total)
{
    size_t n = 0;
    double now;
    uint32_t b;
    int r;
    *total = 0;
    if ((r = shm_lock(d)) != 0) return r;
    now = aiorch_shm_now();
    for (b = 0; b < d->h->nbuckets; b++) {
        uint32_t idx;
        for (idx = d->buckets[b]; idx; idx = entry_at(d, idx)->next) {
            shm_entry *e = entry_at(d, idx);
            if (expired(e, now) || e->klen < plen || memcmp(e->key, prefix, plen) != 0) continue;
            if (n < cap) {
                memcpy(items[n].key, e->key, e->klen);
                items[n].key[e->klen] = '\0';
                items[n].len = e->klen;
                items[n].value = e->value;
            }
            n++;
        }
    }
    shm_unlock(d);
    *total = n;
    return AIORCH_SHM_OK;
}

void aiorch_shm_stats_get(aiorch_shm *d, aiorch_shm_stats *st)
{
    memset(st, 0, sizeof *st);
    st->size = d->size;
    if (shm_lock(d) != 0) return;
    st->capacity = d->h->nentries;
    st->used = d->h->used;
    st->repairs = d->h->repairs;
    st->full = d->h->full;
    shm_unlock(d);
}
