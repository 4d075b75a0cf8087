/* ev_host.c: aiorch on the host's own libev loop, beside the host's watchers.
 * Streams the answer to a question token by token, while a timer of the
 * host's ticks on the same loop.
 *   cc ev_host.c $(pkg-config --cflags --libs aiorch) -lev -o ev_host
 *   ./ev_host "Tell me a story" */
#include <ev.h>
#include <stdio.h>
#include <string.h>

#include <aiorch.h>

typedef struct host {
    struct ev_loop *loop;
    ev_timer ticker;
    int ticks, events, status;
} host;

/* ev_timer: the host's own work, on the loop it shares with the runtime. */
static void tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    ((host *)w->data)->ticks++;
}

/* Each stream event; the text ones carry the next piece of the answer. */
static void on_event(void *ud, const char *json, size_t len)
{
    host *h = ud;
    h->events++;
    if (strstr(json, "\"type\":\"text\"")) printf("event: %.*s\n", (int)len, json);
    fflush(stdout);
}

static void on_result(void *ud, const char *json, size_t len)
{
    host *h = ud;
    printf("result: %.*s\n", (int)len, json);
    h->status = strstr(json, "\"status\":\"success\"") ? 0 : 1;
    ev_timer_stop(h->loop, &h->ticker);
    ev_break(h->loop, EVBREAK_ALL);
}

static void on_error(void *ud, const char *kind, const char *message)
{
    host *h = ud;
    fprintf(stderr, "ev_host: %s: %s\n", kind, message);
    ev_timer_stop(h->loop, &h->ticker);
    ev_break(h->loop, EVBREAK_ALL);
}

int main(int argc, char **argv)
{
    host h = {.loop = EV_DEFAULT, .status = 1};
    char request[1024];
    snprintf(request, sizeof request, "{\"user_question\": \"%s\", \"max_tokens\": 200}",
             argc > 1 ? argv[1] : "Tell me a story");

    aiorch_options opts = {.loop = h.loop}; /* the runtime's watchers join the host's loop */
    aiorch_runtime *rt = aiorch_runtime_new(&opts);
    if (!rt) return 1;
    ev_timer_init(&h.ticker, tick, 0.001, 0.001);
    h.ticker.data = &h;
    ev_timer_start(h.loop, &h.ticker);

    aiorch_job_callbacks cb = {
        .on_result = on_result, .on_error = on_error, .on_event = on_event, .ud = &h};
    if (!aiorch_job_submit_orchestration(rt, request, "fallback", NULL, &cb)) return 1;
    ev_run(h.loop, 0); /* the host's loop drives everything */

    printf("%d events, %d ticks of the host's timer meanwhile\n", h.events, h.ticks);
    aiorch_runtime_free(rt);
    ev_loop_destroy(h.loop);
    return h.status;
}
