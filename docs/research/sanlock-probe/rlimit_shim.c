/* LD_PRELOAD shim for test scripts only: make setrlimit/prlimit of
 * RLIMIT_MEMLOCK and RLIMIT_RTPRIO report success (no-op) so sanlock 3.8.5's
 * daemon starts on a host whose hard limits cannot be raised. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>
#include <stdio.h>
#include <sys/types.h>

static int is_faked(int r) { return r == RLIMIT_MEMLOCK || r == RLIMIT_RTPRIO; }

int setrlimit(__rlimit_resource_t r, const struct rlimit *rl) {
    static int (*real)(__rlimit_resource_t, const struct rlimit *);
    if (is_faked(r)) return 0;
    if (!real) real = dlsym(RTLD_NEXT, "setrlimit");
    return real(r, rl);
}
int setrlimit64(__rlimit_resource_t r, const struct rlimit64 *rl) {
    static int (*real)(__rlimit_resource_t, const struct rlimit64 *);
    if (is_faked(r)) return 0;
    if (!real) real = dlsym(RTLD_NEXT, "setrlimit64");
    return real(r, rl);
}
int prlimit(pid_t p, __rlimit_resource_t r, const struct rlimit *n, struct rlimit *o) {
    static int (*real)(pid_t, __rlimit_resource_t, const struct rlimit *, struct rlimit *);
    if (n && is_faked(r)) { if (o) getrlimit(r, o); return 0; }
    if (!real) real = dlsym(RTLD_NEXT, "prlimit");
    return real(p, r, n, o);
}
