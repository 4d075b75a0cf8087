/* hello.c: ask a question from C and print the StandardAIResponse.
 *   cc hello.c $(pkg-config --cflags --libs aiorch) -o hello && ./hello "What is a monad?" */
#include <stdio.h>

#include <aiorch.h>

static void on_result(void *ud, const char *json, size_t len)
{
    printf("%.*s\n", (int)len, json);
    *(int *)ud = 0;
}

static void on_error(void *ud, const char *kind, const char *message)
{
    fprintf(stderr, "hello: %s: %s\n", kind, message);
    (void)ud;
}

int main(int argc, char **argv)
{
    int status = 1;
    char request[1024];
    /* A real program would build the JSON with a JSON library. */
    snprintf(request, sizeof request, "{\"user_question\": \"%s\"}", argc > 1 ? argv[1] : "Hi");
    aiorch_runtime *rt = aiorch_runtime_new(NULL); /* its own loop */
    if (!rt) return 1;
    aiorch_job_callbacks cb = {.on_result = on_result, .on_error = on_error, .ud = &status};
    aiorch_job_submit_orchestration(rt, request, "fallback", NULL, &cb);
    aiorch_runtime_wait(rt); /* runs the loop until every job has reported */
    aiorch_runtime_free(rt);
    return status;
}
