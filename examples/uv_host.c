/* uv_host.c: aiorch on a libuv loop, through the pollable runtime: libuv
 * watches one fd and calls aiorch_runtime_step when it is readable.
 * Asks N questions at once (default 100) and prints each answer as
 * "<i> <StandardAIResponse JSON>"; exits 1 unless every one succeeded.
 *   cc uv_host.c $(pkg-config --cflags --libs aiorch libuv) -o uv_host
 *   ./uv_host 100 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <aiorch.h>

typedef struct question {
    int index;
    struct host *host;
} question;

typedef struct host {
    aiorch_runtime *rt;
    uv_poll_t poll;
    int left, failed;
} host;

/* uv_poll_cb: the runtime has something ready (a socket, a timer, a job). */
static void on_ready(uv_poll_t *w, int status, int events)
{
    (void)status;
    (void)events;
    host *h = w->data;
    aiorch_runtime_step(h->rt);
}

static void answered(host *h)
{
    if (--h->left == 0) uv_close((uv_handle_t *)&h->poll, NULL); /* then uv_run returns */
}

static void on_result(void *ud, const char *json, size_t len)
{
    question *q = ud;
    printf("%d %.*s\n", q->index, (int)len, json);
    fflush(stdout); /* a whole line each, whatever else writes meanwhile */
    if (!strstr(json, "\"status\":\"success\"")) q->host->failed++;
    answered(q->host);
}

static void on_error(void *ud, const char *kind, const char *message)
{
    question *q = ud;
    fprintf(stderr, "uv_host: question %d: %s: %s\n", q->index, kind, message);
    q->host->failed++;
    answered(q->host);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 100;
    uv_loop_t *loop = uv_default_loop();
    aiorch_options opts = {.pollable = 1};
    host h = {.rt = aiorch_runtime_new(&opts), .left = n};
    question *qs = calloc((size_t)n, sizeof *qs);
    if (!h.rt || !qs || n <= 0) return 1;

    uv_poll_init(loop, &h.poll, aiorch_runtime_fd(h.rt));
    h.poll.data = &h;
    uv_poll_start(&h.poll, UV_READABLE, on_ready);

    for (int i = 0; i < n; i++) {
        char request[256];
        snprintf(request, sizeof request,
                 "{\"user_question\": \"question %d\", \"max_tokens\": 50}", i);
        qs[i] = (question){.index = i, .host = &h};
        aiorch_job_callbacks cb = {.on_result = on_result, .on_error = on_error, .ud = &qs[i]};
        aiorch_job_submit_orchestration(h.rt, request, "fastest", "openai,anthropic", &cb);
    }
    uv_run(loop, UV_RUN_DEFAULT);

    fprintf(stderr, "uv_host: %d answers, %d failed\n", n, h.failed);
    aiorch_runtime_free(h.rt);
    uv_loop_close(loop);
    free(qs);
    return h.failed ? 1 : 0;
}
