/* The SSE parser, fed every way a stream can be split. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse.h"

typedef struct {
    const char *name;
    const char *input;
    const char *expect; /* events as "event|data|id;" with id "-" when absent */
} sse_case;

static const sse_case cases[] = {
    {"one event", "data: hello\n\n", "message|hello|-;"},
    {"named event", "event: ping\ndata: {}\n\n", "ping|{}|-;"},
    {"multi-line data", "data: a\ndata: b\ndata\n\n", "message|a\nb\n|-;"},
    {"comments are skipped", ": keep-alive\n\n:x\ndata: y\n\n", "message|y|-;"},
    {"CRLF endings", "event: e\r\ndata: 1\r\n\r\n", "e|1|-;"},
    {"CR endings", "data: 1\rdata: 2\r\r", "message|1\n2|-;"},
    {"no space after colon", "data:x\n\n", "message|x|-;"},
    {"only one space is stripped", "data:  x\n\n", "message| x|-;"},
    {"id persists", "id: 7\ndata: a\n\ndata: b\n\n", "message|a|7;message|b|7;"},
    {"event without data is dropped", "event: x\n\ndata: z\n\n", "message|z|-;"},
    {"unterminated event waits", "data: a\n\ndata: b\n", "message|a|-;"},
    {"byte-order mark",
     "\xEF\xBB\xBF"
     "data: bom\n\n",
     "message|bom|-;"},
    {"unknown fields ignored", "retry: 10\nfoo: bar\ndata: k\n\n", "message|k|-;"},
    {"openai shape", "data: {\"a\":1}\n\ndata: [DONE]\n\n",
     "message|{\"a\":1}|-;message|[DONE]|-;"},
    {"empty data line", "data\n\n", "message||-;"},
};

static void render(aiorch_sse *p, char *out, size_t cap)
{
    aiorch_sse_event *ev;
    out[0] = '\0';
    while ((ev = aiorch_sse_pop(p))) {
        size_t n = strlen(out);
        snprintf(out + n, cap - n, "%s|%s|%s;", ev->event, ev->data, ev->id ? ev->id : "-");
        aiorch_sse_event_free(ev);
    }
}

/* Feeds input in pieces of `step` bytes (0: all at once). */
static int run(const sse_case *c, size_t step, char *got, size_t cap)
{
    aiorch_sse p;
    aiorch_sse_init(&p);
    size_t len = strlen(c->input);
    size_t n = step ? step : len;
    for (size_t off = 0; off < len; off += n) {
        size_t k = len - off < n ? len - off : n;
        if (aiorch_sse_feed(&p, c->input + off, k) != 0) return -1;
    }
    /* queued counts what the waiting events hold (the backpressure of
     * aiorch.http): their records and strings, and nothing once popped. */
    size_t held = 0;
    for (const aiorch_sse_event *ev = p.head; ev; ev = ev->next)
        held += sizeof *ev + ev->data_len + 1 + strlen(ev->event) + 1 +
                (ev->id ? strlen(ev->id) + 1 : 0);
    int rc = p.queued == held ? 0 : -1;
    render(&p, got, cap);
    if (p.queued != 0) rc = -1;
    aiorch_sse_free(&p);
    return rc;
}

int main(void)
{
    int failed = 0, passed = 0;
    char got[1024];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (size_t step = 0; step <= 7; step++) {
            if (run(&cases[i], step, got, sizeof got) != 0 || strcmp(got, cases[i].expect) != 0) {
                printf("FAIL %s (pieces of %zu): got [%s] want [%s]\n", cases[i].name, step, got,
                       cases[i].expect);
                failed++;
            } else {
                passed++;
            }
        }
    }
    /* A CR at the end of one piece and its LF at the start of the next is one line end. */
    aiorch_sse p;
    aiorch_sse_init(&p);
    aiorch_sse_feed(&p, "data: a\r", 8);
    aiorch_sse_feed(&p, "\ndata: b\r", 9);
    aiorch_sse_feed(&p, "\n\r\n", 3);
    render(&p, got, sizeof got);
    aiorch_sse_free(&p);
    if (strcmp(got, "message|a\nb|-;") != 0) {
        printf("FAIL split CRLF: got [%s]\n", got);
        failed++;
    } else {
        passed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
