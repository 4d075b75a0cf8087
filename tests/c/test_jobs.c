/* The job API: results, every kind of failure, cancellation, freeing a busy
 * runtime, streaming orchestrations, a pollable runtime driven by poll(2),
 * and two runtimes in two threads. Run by tests/with_mock.sh, which starts
 * the mock providers and exports their base URLs and keys. */
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "aiorch.h"
#include "check.h"
#include "outcome.h"

/* Keeps the text of {"type":"text","text":"..."} events (the mock's text has no escapes). */
static void on_event(void *ud, const char *json, size_t len)
{
    outcome *o = ud;
    const char *t;
    o->events++;
    if (o->cancel_on_event) {
        aiorch_job_cancel(o->cancel_on_event);
        o->cancel_on_event = NULL;
    }
    if (strstr(json, "\"type\":\"text\"") && (t = strstr(json, "\"text\":\"")) &&
        (size_t)(t - json) < len) {
        t += 8;
        const char *end = strchr(t, '"');
        size_t n = strlen(o->streamed);
        snprintf(o->streamed + n, sizeof o->streamed - n, "%.*s", (int)(end - t), t);
    }
}

static aiorch_job_callbacks callbacks(outcome *o)
{
    aiorch_job_callbacks cb = {.on_result = on_result, .on_error = on_error, .ud = o};
    return cb;
}

static aiorch_job *chunk(aiorch_runtime *rt, const char *code, outcome *o)
{
    aiorch_job_callbacks cb = callbacks(o);
    return aiorch_job_submit_chunk(rt, code, strlen(code), "=test", 0, NULL, &cb);
}

static void test_results_and_failures(const char *dir)
{
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    outcome ok = {0}, args = {0}, raise0 = {0}, raise1 = {0}, kind = {0}, enc = {0}, syntax = {0},
            missing = {0}, nil = {0};
    chunk(rt, "local a = require 'aiorch'; a.sleep(5); return {answer = 42, list = {1, 2}}", &ok);
    const char *argv[] = {"x", "y"};
    aiorch_job_callbacks cb = callbacks(&args);
    const char *concat = "return table.concat({...}, '+')";
    aiorch_job_submit_chunk(rt, concat, strlen(concat), NULL, 2, argv, &cb);
    chunk(rt, "error('broke at once')", &raise0);
    chunk(rt, "require('aiorch').sleep(1); error('broke later')", &raise1);
    chunk(rt, "return nil, 'rate_limited', 'slow down'", &kind);
    chunk(rt, "return {f = print}", &enc);
    chunk(rt, "return (", &syntax);
    chunk(rt, "return nil", &nil);
    char path[1024];
    snprintf(path, sizeof path, "%s/c/no-such-job.lua", dir);
    cb = callbacks(&missing);
    aiorch_job_submit_file(rt, path, 0, NULL, &cb);
    CHECK(ok.results + ok.errors + raise0.errors + missing.errors == 0,
          "nothing runs inside submit");
    CHECK(aiorch_runtime_jobs(rt) == 9, "nine jobs pending (%zu)", aiorch_runtime_jobs(rt));
    CHECK(aiorch_runtime_wait(rt) == 0, "wait: %s", aiorch_runtime_error(rt));
    CHECK(aiorch_runtime_jobs(rt) == 0, "no job left");
    CHECK(ok.results == 1 && ok.errors == 0 &&
              strcmp(ok.json, "{\"answer\":42,\"list\":[1,2]}") == 0,
          "result as JSON: %s", ok.json);
    CHECK(args.results == 1 && strcmp(args.json, "\"x+y\"") == 0, "arguments: %s", args.json);
    CHECK(raise0.errors == 1 && raise0.results == 0 && strcmp(raise0.kind, "error") == 0 &&
              strstr(raise0.message, "broke at once"),
          "a raise before the first yield: %s: %s", raise0.kind, raise0.message);
    CHECK(raise1.errors == 1 && strstr(raise1.message, "broke later"), "a raise after a yield: %s",
          raise1.message);
    CHECK(kind.errors == 1 && strcmp(kind.kind, "rate_limited") == 0 &&
              strcmp(kind.message, "slow down") == 0,
          "nil, kind, message: %s: %s", kind.kind, kind.message);
    CHECK(enc.errors == 1 && strcmp(enc.kind, "encode") == 0, "no JSON form: %s: %s", enc.kind,
          enc.message);
    CHECK(syntax.errors == 1 && strcmp(syntax.kind, "load") == 0, "syntax error: %s: %s",
          syntax.kind, syntax.message);
    CHECK(missing.errors == 1 && strcmp(missing.kind, "load") == 0 &&
              strstr(missing.message, "no-such-job"),
          "missing file: %s: %s", missing.kind, missing.message);
    CHECK(nil.results == 1 && strcmp(nil.json, "null") == 0, "nil is null: %s", nil.json);
    aiorch_runtime_free(rt);
}

/* A job that runs away is stopped by the instruction budget; the runtime
 * and the other jobs go on. */
static void test_budget(void)
{
    aiorch_options opts = {.instruction_budget = 2000000};
    aiorch_runtime *rt = aiorch_runtime_new(&opts);
    outcome spin = {0}, other = {0};
    chunk(rt, "while true do end", &spin);
    chunk(rt, "require('aiorch').sleep(20) return 'other'", &other);
    CHECK(aiorch_runtime_wait(rt) == 0, "wait");
    CHECK(spin.errors == 1 && strcmp(spin.kind, "error") == 0 &&
              strstr(spin.message, "instruction budget"),
          "runaway job: %s: %s", spin.kind, spin.message);
    CHECK(other.results == 1, "the other job ended well");
    aiorch_runtime_free(rt);
}

/* Cancelled jobs call nothing; freeing the runtime ends the others with
 * "cancelled" (ASan and valgrind see that nothing leaks). */
static void test_cancel_and_free(void)
{
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    outcome a = {0}, b = {0}, c = {0}, d = {0};
    aiorch_job *ja = chunk(rt, "require('aiorch').sleep(10000) return 1", &a);
    chunk(rt, "return 2", &b);
    aiorch_job *jc = chunk(rt, "return 3", &c);
    aiorch_job_cancel(ja); /* queued, never started */
    CHECK(aiorch_runtime_wait(rt) == 0, "wait");
    CHECK(a.results + a.errors == 0 && b.results == 1 && c.results == 1,
          "a cancelled job reports nothing");
    (void)jc;
    aiorch_job *jd = chunk(rt, "require('aiorch').sleep(10000) return 4", &d);
    for (int i = 0; i < 5; i++)
        aiorch_runtime_step(rt);
    aiorch_job_cancel(jd); /* started, waiting */
    CHECK(aiorch_runtime_jobs(rt) == 0 && d.results + d.errors == 0, "a waiting job cancelled");
    outcome e = {0}, f = {0};
    chunk(rt, "require('aiorch').sleep(10000) return 5", &e);
    chunk(rt, "return 6", &f);
    for (int i = 0; i < 5; i++)
        aiorch_runtime_step(rt);
    aiorch_runtime_free(rt);
    CHECK(e.errors == 1 && strcmp(e.kind, "cancelled") == 0 && strstr(e.message, "freed"),
          "freeing the runtime: %s: %s", e.kind, e.message);
    CHECK(f.results == 1, "a job that had ended gets its result at free (%d)", f.results);
}

static char *mock_request(char *buf, size_t size, const char *question)
{
    snprintf(buf, size, "{\"user_question\": \"%s\", \"max_tokens\": 50}", question);
    return buf;
}

static void test_orchestration(void)
{
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    outcome plain = {0}, streamed = {0}, bad = {0}, badjson = {0}, cancelled = {0};
    char req[256];
    aiorch_job_callbacks cb = callbacks(&plain);
    aiorch_job_submit_orchestration(rt, mock_request(req, sizeof req, "plain one"), "fallback",
                                    "openai,anthropic", &cb);
    cb = callbacks(&streamed);
    cb.on_event = on_event;
    aiorch_job_submit_orchestration(rt, mock_request(req, sizeof req, "streamed one"), NULL,
                                    "anthropic", &cb);
    cb = callbacks(&bad);
    aiorch_job_submit_orchestration(rt, "{\"user_question\": \"x\", \"max_tokens\": -1}", NULL,
                                    NULL, &cb);
    cb = callbacks(&badjson);
    aiorch_job_submit_orchestration(rt, "{nope", NULL, NULL, &cb);
    cb = callbacks(&cancelled);
    cb.on_event = on_event;
    aiorch_job *jc = aiorch_job_submit_orchestration(rt, mock_request(req, sizeof req, "cut"), NULL,
                                                     "openai", &cb);
    cancelled.cancel_on_event = jc; /* cancels itself from inside on_event */
    CHECK(aiorch_runtime_wait(rt) == 0, "wait: %s", aiorch_runtime_error(rt));
    CHECK(plain.results == 1 && strstr(plain.json, "\"status\":\"success\"") &&
              strstr(plain.json, "\"ia_provider_name\":\"openai\"") &&
              strstr(plain.json, "You asked: plain one"),
          "a StandardAIResponse: %s %s", plain.json, plain.message);
    CHECK(streamed.results == 1 && streamed.events > 1 &&
              strstr(streamed.json, "\"ia_provider_name\":\"anthropic\""),
          "streamed: %d events, %s", streamed.events, streamed.json);
    CHECK(strstr(streamed.json, streamed.streamed) &&
              strstr(streamed.streamed, "You asked: streamed one"),
          "the text deltas make the answer: '%s'", streamed.streamed);
    CHECK(bad.errors == 1 && strcmp(bad.kind, "invalid") == 0 && strstr(bad.message, "max_tokens"),
          "a bad request names the field: %s: %s", bad.kind, bad.message);
    CHECK(badjson.errors == 1 && strcmp(badjson.kind, "invalid") == 0 &&
              strstr(badjson.message, "request"),
          "malformed JSON: %s: %s", badjson.kind, badjson.message);
    CHECK(cancelled.events == 1 && cancelled.results + cancelled.errors == 0,
          "cancelled from on_event: %d events, nothing after", cancelled.events);
    aiorch_runtime_free(rt);
}

/* A pollable runtime, driven by poll(2) on its fd alone: timers fire
 * without the host keeping one. */
static void test_pollable(void)
{
    aiorch_options opts = {.pollable = 1};
    aiorch_runtime *rt = aiorch_runtime_new(&opts);
    int fd = aiorch_runtime_fd(rt);
    CHECK(fd >= 0, "a pollable runtime has an fd");
    outcome sleeper = {0}, orch = {0};
    char req[256];
    double t0 = now_ms();
    chunk(rt, "require('aiorch').sleep(80) return 'woke'", &sleeper);
    aiorch_job_callbacks cb = callbacks(&orch);
    aiorch_job_submit_orchestration(rt, mock_request(req, sizeof req, "polled"), "fastest", NULL,
                                    &cb);
    int wakeups = 0;
    while (aiorch_runtime_jobs(rt) > 0 && now_ms() - t0 < 10000) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 5000) > 0) wakeups++;
        aiorch_runtime_step(rt);
    }
    double ms = now_ms() - t0;
    CHECK(sleeper.results == 1 && strcmp(sleeper.json, "\"woke\"") == 0, "the sleeper woke: %s",
          sleeper.json);
    CHECK(ms >= 79 && ms < 5000, "the timer fired through the fd (%.0f ms, %d wake-ups)", ms,
          wakeups);
    CHECK(orch.results == 1 && strstr(orch.json, "You asked: polled"), "an orchestration: %s",
          orch.json);
    /* Idle: the fd wakes the host only for the runtime's own timers (curl's
     * connection upkeep), not in a busy loop. */
    int idle_wakeups = 0;
    for (double t1 = now_ms(); now_ms() - t1 < 300;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 50) > 0) idle_wakeups++;
        aiorch_runtime_step(rt);
    }
    CHECK(idle_wakeups < 10, "an idle runtime's fd stays quiet (%d wake-ups in 300 ms)",
          idle_wakeups);
    outcome late = {0};
    aiorch_job *j = chunk(rt, "require('aiorch').sleep(10000)", &late);
    aiorch_runtime_step(rt);
    (void)j;
    aiorch_runtime_free(rt); /* with the loop thread waiting and a job pending */
    CHECK(late.errors == 1 && strcmp(late.kind, "cancelled") == 0, "pending job at free: %s",
          late.kind);
}

/* One runtime per thread: each with its own loop and its own orchestrations. */
static void *thread_main(void *arg)
{
    int id = *(int *)arg, n = 20, good = 0;
    outcome *o = calloc((size_t)n, sizeof *o);
    aiorch_options opts = {.pollable = id == 1};
    aiorch_runtime *rt = aiorch_runtime_new(&opts);
    char req[256], q[64];
    for (int i = 0; i < n; i++) {
        snprintf(q, sizeof q, "thread %d question %d", id, i);
        aiorch_job_callbacks cb = callbacks(&o[i]);
        aiorch_job_submit_orchestration(rt, mock_request(req, sizeof req, q), "fastest", NULL, &cb);
    }
    int status = aiorch_runtime_wait(rt);
    for (int i = 0; i < n; i++) {
        snprintf(q, sizeof q, "You asked: thread %d question %d\"", id, i);
        good += o[i].results == 1 && strstr(o[i].json, q) != NULL;
    }
    CHECK(status == 0 && good == n, "thread %d: %d of %d answers right", id, good, n);
    aiorch_runtime_free(rt);
    free(o);
    return NULL;
}

static void test_threads(void)
{
    pthread_t t[2];
    int ids[2] = {0, 1};
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, thread_main, &ids[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
}

/* The main task's start reports a raise before its first yield. */
static void test_start(const char *dir)
{
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    char path[1024];
    snprintf(path, sizeof path, "%s/c/raises.lua", dir);
    CHECK(aiorch_runtime_start(rt, path, 0, NULL) == -1 &&
              strstr(aiorch_runtime_error(rt), "raised at once"),
          "start: %s", aiorch_runtime_error(rt));
    CHECK(!aiorch_runtime_busy(rt), "not busy");
    aiorch_runtime_free(rt);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : ".";
    if (!getenv("OPENAI_BASE_URL")) {
        printf("run me with tests/with_mock.sh\n");
        return 1;
    }
    test_results_and_failures(dir);
    test_budget();
    test_cancel_and_free();
    test_orchestration();
    test_pollable();
    test_threads();
    test_start(dir);
    return check_summary();
}
