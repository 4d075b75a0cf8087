/* Server-sent events, parsed incrementally. */
#include <stdlib.h>
#include <string.h>

#include "sse.h"

int aiorch_text_add(aiorch_sse_text *t, const char *s, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 64;
        while (cap < t->len + n + 1)
            cap *= 2;
        char *p = realloc(t->p, cap);
        if (!p) return -1;
        t->p = p;
        t->cap = cap;
    }
    memcpy(t->p + t->len, s, n);
    t->len += n;
    t->p[t->len] = '\0';
    return 0;
}

static char *text_dup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

void aiorch_sse_init(aiorch_sse *p)
{
    memset(p, 0, sizeof *p);
}

void aiorch_sse_event_free(aiorch_sse_event *ev)
{
    if (!ev) return;
    free(ev->event);
    free(ev->data);
    free(ev->id);
    free(ev);
}

void aiorch_sse_free(aiorch_sse *p)
{
    free(p->line.p);
    free(p->data.p);
    free(p->event.p);
    free(p->id.p);
    while (p->head)
        aiorch_sse_event_free(aiorch_sse_pop(p));
    memset(p, 0, sizeof *p);
}

/* The bytes an event holds: its record and its strings. */
static size_t event_size(const aiorch_sse_event *ev)
{
    return sizeof *ev + ev->data_len + 1 + strlen(ev->event) + 1 +
           (ev->id ? strlen(ev->id) + 1 : 0);
}

aiorch_sse_event *aiorch_sse_pop(aiorch_sse *p)
{
    aiorch_sse_event *ev = p->head;
    if (!ev) return NULL;
    p->head = ev->next;
    if (!p->head) p->tail = NULL;
    p->queued -= event_size(ev);
    ev->next = NULL;
    return ev;
}

/* A blank line: the buffered fields become one event. */
static int dispatch(aiorch_sse *p)
{
    int rc = 0;
    if (p->have_data) {
        aiorch_sse_event *ev = calloc(1, sizeof *ev);
        size_t n = p->data.len;
        if (n && p->data.p[n - 1] == '\n') n--; /* the last data line's LF */
        if (!ev) return -1;
        if (p->data.p) {
            /* The buffer becomes the event's: no copy, and a stream keeps
             * no data buffer between its events. */
            p->data.p[n] = '\0';
            ev->data = p->data.p;
            p->data.p = NULL;
            p->data.cap = 0;
        } else {
            ev->data = text_dup("", 0);
        }
        ev->data_len = n;
        ev->event = p->event.len ? text_dup(p->event.p, p->event.len) : text_dup("message", 7);
        ev->id = p->have_id ? text_dup(p->id.p ? p->id.p : "", p->id.len) : NULL;
        if (!ev->data || !ev->event || (p->have_id && !ev->id)) {
            aiorch_sse_event_free(ev);
            rc = -1;
        } else {
            if (p->tail)
                p->tail->next = ev;
            else
                p->head = ev;
            p->tail = ev;
            p->queued += event_size(ev);
        }
    }
    p->data.len = 0;
    p->event.len = 0;
    p->have_data = 0;
    return rc;
}

static int field(aiorch_sse *p, const char *line, size_t len)
{
    if (len == 0) return dispatch(p);
    if (line[0] == ':') return 0; /* a comment */
    const char *colon = memchr(line, ':', len);
    size_t nlen = colon ? (size_t)(colon - line) : len;
    const char *value = colon ? colon + 1 : line + len;
    size_t vlen = (size_t)(line + len - value);
    if (vlen && value[0] == ' ') value++, vlen--;
    if (nlen == 4 && memcmp(line, "data", 4) == 0) {
        p->have_data = 1;
        return aiorch_text_add(&p->data, value, vlen) || aiorch_text_add(&p->data, "\n", 1) ? -1
                                                                                            : 0;
    }
    if (nlen == 5 && memcmp(line, "event", 5) == 0) {
        p->event.len = 0;
        return aiorch_text_add(&p->event, value, vlen);
    }
    if (nlen == 2 && memcmp(line, "id", 2) == 0 && !memchr(value, '\0', vlen)) {
        p->id.len = 0;
        p->have_id = 1;
        return aiorch_text_add(&p->id, value, vlen);
    }
    return 0; /* retry and unknown fields are ignored */
}

int aiorch_sse_feed(aiorch_sse *p, const char *buf, size_t len)
{
    const char *end = buf + len;
    if (!p->started && len) {
        /* A UTF-8 byte-order mark may open the stream; it may come split. */
        static const char bom[] = "\xEF\xBB\xBF";
        size_t have = p->line.len;
        while (buf < end && have < 3 && (unsigned char)*buf == (unsigned char)bom[have]) {
            if (aiorch_text_add(&p->line, buf, 1)) return -1;
            buf++, have++;
        }
        if (have == 3) {
            p->line.len = 0;
            p->started = 1;
        } else if (buf < end) {
            p->started = 1; /* not a BOM: what was held is ordinary text */
        } else {
            return 0;
        }
    }
    if (p->skip_lf && buf < end) {
        if (*buf == '\n') buf++;
        p->skip_lf = 0;
    }
    while (buf < end) {
        const char *eol = buf;
        while (eol < end && *eol != '\n' && *eol != '\r')
            eol++;
        if (eol == end) return aiorch_text_add(&p->line, buf, (size_t)(end - buf));
        int rc;
        if (p->line.len) {
            if (aiorch_text_add(&p->line, buf, (size_t)(eol - buf))) return -1;
            rc = field(p, p->line.p, p->line.len);
            p->line.len = 0;
        } else {
            rc = field(p, buf, (size_t)(eol - buf));
        }
        if (rc) return -1;
        if (*eol == '\r') {
            if (eol + 1 == end)
                p->skip_lf = 1;
            else if (eol[1] == '\n')
                eol++;
        }
        buf = eol + 1;
    }
    return 0;
}
