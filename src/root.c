/* Where the runtime's scripts are: ROOT holds scripts/ and strategies/.
 * An installed file finds them relative to itself, so that a prefix copied
 * elsewhere still works; a build tree uses its source tree. */
#define _GNU_SOURCE /* dladdr1 */
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Not internal.h: <link.h> brings <elf.h>, whose EV_CURRENT clashes with <ev.h>. */
char *aiorch_root_find(void);

static int has_scripts(const char *root)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/scripts/aiorch/main.lua", root) >= (int)sizeof path)
        return 0;
    return access(path, R_OK) == 0;
}

/* The directory of the file that holds this code: a shared library or the
 * Lua module (dladdr), else the program itself (/proc/self/exe). */
static int self_dir(char *out)
{
    Dl_info info;
    struct link_map *map = NULL;
    int found = 0;
    if (dladdr1((void *)aiorch_root_find, &info, (void **)&map, RTLD_DL_LINKMAP) && map &&
        map->l_name && map->l_name[0] && info.dli_fname)
        found = realpath(info.dli_fname, out) != NULL;
    if (!found && !realpath("/proc/self/exe", out)) return 0;
    char *slash = strrchr(out, '/');
    if (!slash) return 0;
    *slash = '\0';
    return 1;
}

char *aiorch_root_find(void)
{
    static const char *const relative[] = {AIORCH_LIB_TO_ROOT, AIORCH_CMOD_TO_ROOT,
                                           AIORCH_BIN_TO_ROOT};
    const char *env = getenv("AIORCH_ROOT");
    char dir[PATH_MAX], path[PATH_MAX * 2], real[PATH_MAX];

    if (env && *env) return strdup(env);
    if (self_dir(dir)) {
        for (size_t i = 0; i < sizeof relative / sizeof *relative; i++) {
            snprintf(path, sizeof path, "%s/%s", dir, relative[i]);
            if (has_scripts(path) && realpath(path, real)) return strdup(real);
        }
        /* A file of the build tree uses its sources, even with an older install around. */
        if (realpath(AIORCH_BUILD_DIR, real) && strncmp(dir, real, strlen(real)) == 0 &&
            (dir[strlen(real)] == '/' || dir[strlen(real)] == '\0') &&
            has_scripts(AIORCH_SOURCE_ROOT))
            return strdup(AIORCH_SOURCE_ROOT);
    }
    /* A static library linked into a program installed elsewhere, then a build tree. */
    if (has_scripts(AIORCH_INSTALL_ROOT)) return strdup(AIORCH_INSTALL_ROOT);
    if (has_scripts(AIORCH_SOURCE_ROOT)) return strdup(AIORCH_SOURCE_ROOT);
    return strdup(AIORCH_INSTALL_ROOT); /* errors then name where the scripts belong */
}
