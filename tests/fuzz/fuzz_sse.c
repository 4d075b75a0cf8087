/* libFuzzer target: the incremental SSE parser (src/sse.c).
 *
 * Input: one byte k (low 3 bits), k 16-bit split points, then the stream.
 * The stream is fed whole, split at those points, and one byte at a time;
 * all three must give the same events, and each event must be well formed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_sse: check failed: %s (line %d)\n", #cond, __LINE__);            \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void add_field(aiorch_sse_text *out, const char *s, size_t n)
{
    uint32_t len = (uint32_t)n;
    CHECK(aiorch_text_add(out, (const char *)&len, sizeof len) == 0);
    CHECK(aiorch_text_add(out, s, n) == 0);
}

/* Pops every event into out, checking each. */
static void drain(aiorch_sse *p, aiorch_sse_text *out)
{
    aiorch_sse_event *ev;
    while ((ev = aiorch_sse_pop(p))) {
        size_t elen = strlen(ev->event); /* a NUL in the name may cut it short */
        CHECK(!strchr(ev->event, '\r') && !strchr(ev->event, '\n'));
        CHECK(ev->data[ev->data_len] == '\0' && !memchr(ev->data, '\r', ev->data_len));
        CHECK(!ev->id || (!strchr(ev->id, '\r') && !strchr(ev->id, '\n')));
        add_field(out, ev->event, elen);
        add_field(out, ev->data, ev->data_len);
        add_field(out, ev->id ? ev->id : "-", ev->id ? strlen(ev->id) : 1);
        aiorch_sse_event_free(ev);
    }
    CHECK(p->queued == 0);
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* Feeds the stream in pieces ending at cuts (sorted), then a blank line
 * that flushes a pending event; returns the events seen. */
static void run(const char *s, size_t len, const size_t *cuts, size_t ncuts, aiorch_sse_text *out)
{
    aiorch_sse p;
    size_t off = 0;
    aiorch_sse_init(&p);
    for (size_t i = 0; i <= ncuts; i++) {
        size_t end = i < ncuts ? cuts[i] : len;
        CHECK(aiorch_sse_feed(&p, s + off, end - off) == 0);
        drain(&p, out);
        off = end;
    }
    CHECK(aiorch_sse_feed(&p, "\n\n", 2) == 0);
    drain(&p, out);
    aiorch_sse_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    aiorch_sse_text whole = {0}, split = {0}, bytes = {0};
    size_t cuts[8], k, len;
    const char *s;

    if (size < 1) return 0;
    k = data[0] & 7;
    if (size < 1 + 2 * k) return 0;
    s = (const char *)data + 1 + 2 * k;
    len = size - 1 - 2 * k;
    for (size_t i = 0; i < k; i++)
        cuts[i] = (size_t)(data[1 + 2 * i] | data[2 + 2 * i] << 8) % (len + 1);
    qsort(cuts, k, sizeof cuts[0], cmp_size);

    run(s, len, NULL, 0, &whole);
    run(s, len, cuts, k, &split);
    size_t *each = malloc((len ? len : 1) * sizeof *each);
    CHECK(each);
    for (size_t i = 0; i < len; i++)
        each[i] = i + 1;
    run(s, len, each, len, &bytes);
    free(each);

    CHECK(split.len == whole.len && (!whole.len || memcmp(split.p, whole.p, whole.len) == 0));
    CHECK(bytes.len == whole.len && (!whole.len || memcmp(bytes.p, whole.p, whole.len) == 0));
    free(whole.p);
    free(split.p);
    free(bytes.p);
    return 0;
}
