/* Incremental parser for server-sent events (the WHATWG event-stream format).
 * Bytes go in as they arrive, split anywhere; whole events come out. */
#ifndef AIORCH_SSE_H
#define AIORCH_SSE_H

#include <stddef.h>

typedef struct aiorch_sse_event {
    char *event; /* "message" unless the stream named it */
    char *data;  /* data lines joined with "\n" */
    char *id;    /* the last event id seen, or NULL */
    size_t data_len;
    struct aiorch_sse_event *next;
} aiorch_sse_event;

typedef struct aiorch_sse_text {
    char *p;
    size_t len, cap;
} aiorch_sse_text;

typedef struct aiorch_sse {
    aiorch_sse_text line, data, event, id;
    int have_id;
    int have_data;
    int skip_lf; /* the last chunk ended in CR: a leading LF belongs to it */
    int started; /* past a possible byte-order mark */
    aiorch_sse_event *head, *tail;
    size_t queued; /* bytes held by queued events (records and strings) */
} aiorch_sse;

/* Appends n bytes (kept NUL-terminated); 0, or -1 when out of memory. */
int aiorch_text_add(aiorch_sse_text *t, const char *s, size_t n);

void aiorch_sse_init(aiorch_sse *p);
void aiorch_sse_free(aiorch_sse *p);
/* Returns 0, or -1 when out of memory. */
int aiorch_sse_feed(aiorch_sse *p, const char *buf, size_t len);
/* The oldest complete event (the caller frees it), or NULL. */
aiorch_sse_event *aiorch_sse_pop(aiorch_sse *p);
void aiorch_sse_event_free(aiorch_sse_event *ev);

#endif
