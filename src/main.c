/* The aiorch command: a runtime running scripts/aiorch/main.lua (ask, run, demo). */
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <sys/resource.h>

#include "aiorch.h"

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a peer that hangs up is an error result, not a death */
    /* Each request in flight holds a socket: allow as many as the system lets us. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    aiorch_runtime *rt = aiorch_runtime_new(NULL);
    if (!rt) return 1;
    char entry[PATH_MAX];
    snprintf(entry, sizeof entry, "%s/scripts/aiorch/main.lua", aiorch_runtime_root(rt));
    int status = aiorch_runtime_run(rt, entry, argc - 1, argv + 1);
    if (status != 0 && *aiorch_runtime_error(rt))
        fprintf(stderr, "aiorch: %s\n", aiorch_runtime_error(rt));
    aiorch_runtime_free(rt);
    return status;
}
