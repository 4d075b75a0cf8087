/* What one job of the job API reported (test_jobs.c, test_host.c): its
 * results and errors, counted and the last one kept. on_result and
 * on_error are its aiorch_job_callbacks; events and streamed are filled
 * by a test's own on_event. */
#ifndef AIORCH_TESTS_OUTCOME_H
#define AIORCH_TESTS_OUTCOME_H

#include <stdio.h>

#include "aiorch.h"

typedef struct outcome {
    int results, errors, events;
    char json[8192];
    char kind[64];
    char message[1024];
    char streamed[8192];
    aiorch_job *cancel_on_event; /* cancels this job at the first event */
} outcome;

static inline void on_result(void *ud, const char *json, size_t len)
{
    outcome *o = ud;
    o->results++;
    snprintf(o->json, sizeof o->json, "%.*s", (int)len, json);
}

static inline void on_error(void *ud, const char *kind, const char *message)
{
    outcome *o = ud;
    o->errors++;
    snprintf(o->kind, sizeof o->kind, "%s", kind);
    snprintf(o->message, sizeof o->message, "%s", message);
}

#endif
