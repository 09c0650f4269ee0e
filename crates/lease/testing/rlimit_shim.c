/* Test-only LD_PRELOAD shim for Ferry's lease tests (never used on real hosts).
 *
 * sanlock 3.8's daemon raises RLIMIT_MEMLOCK and RLIMIT_RTPRIO to unlimited at start and
 * exits if it cannot. Test machines whose hard limits are lower still run it with
 * -l 0 -h 0 (no mlockall, no realtime priority), so the raise is not needed: this shim
 * answers success for those two limits and passes every other call on. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>
#include <sys/types.h>

static int skipped(int resource)
{
	return resource == RLIMIT_MEMLOCK || resource == RLIMIT_RTPRIO;
}

int setrlimit(__rlimit_resource_t resource, const struct rlimit *limit)
{
	int (*next)(__rlimit_resource_t, const struct rlimit *);

	if (skipped(resource))
		return 0;
	next = (int (*)(__rlimit_resource_t, const struct rlimit *))dlsym(RTLD_NEXT, "setrlimit");
	return next(resource, limit);
}

int setrlimit64(__rlimit_resource_t resource, const struct rlimit64 *limit)
{
	int (*next)(__rlimit_resource_t, const struct rlimit64 *);

	if (skipped(resource))
		return 0;
	next = (int (*)(__rlimit_resource_t, const struct rlimit64 *))dlsym(RTLD_NEXT, "setrlimit64");
	return next(resource, limit);
}

int prlimit(pid_t pid, __rlimit_resource_t resource, const struct rlimit *set, struct rlimit *old)
{
	int (*next)(pid_t, __rlimit_resource_t, const struct rlimit *, struct rlimit *);

	if (set && skipped(resource)) {
		if (old)
			getrlimit(resource, old);
		return 0;
	}
	next = (int (*)(pid_t, __rlimit_resource_t, const struct rlimit *, struct rlimit *))
		dlsym(RTLD_NEXT, "prlimit");
	return next(pid, resource, set, old);
}
