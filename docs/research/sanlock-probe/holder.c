/* holder: register with sanlock, optionally set a killpath, acquire one
 * resource lease, hold it, release it. Logs every step and every signal with
 * wall-clock ms so timings can be read off.
 * usage: holder [-t hold_s] [-w] [-e on_usr1: 0 ignore|1 exit|2 release+continue]
 *               [-R restrict_flags] [-k killpath [-P] [-a args]] LS:RES:PATH:OFF
 *   -w   SANLK_ACQUIRE_OWNER_NOWAIT (fail fast instead of waiting for owner expiry)
 *   -P   SANLK_KILLPATH_PID (sanlock appends the pid to killpath args) */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <sanlock.h>
#include <sanlock_resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <time.h>
#include <errno.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static double mono(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
#define LOG(...) do { printf("[%.3f pid %d] ", now(), getpid()); printf(__VA_ARGS__); printf("\n"); fflush(stdout); } while (0)

static volatile sig_atomic_t got_sig;
static void on_sig(int s) { got_sig = s; }

int main(int argc, char **argv) {
    int hold = 5, nowait = 0, on_usr1 = 0, pidflag = 0, opt; unsigned rflags = 0;
    char *killpath = NULL, *kargs = "";
    while ((opt = getopt(argc, argv, "t:we:R:k:Pa:")) != -1) switch (opt) {
        case 't': hold = atoi(optarg); break;
        case 'w': nowait = 1; break;
        case 'e': on_usr1 = atoi(optarg); break;
        case 'R': rflags = strtoul(optarg, 0, 0); break;
        case 'k': killpath = optarg; break;
        case 'P': pidflag = 1; break;
        case 'a': kargs = optarg; break;
        default: return 2;
    }
    if (optind >= argc) { fprintf(stderr, "need LS:RES:PATH:OFF\n"); return 2; }
    struct sanlk_resource *res = NULL;
    int rv = sanlock_str_to_res(argv[optind], &res);
    if (rv) { LOG("str_to_res %d", rv); return 1; }
    signal(SIGTERM, on_sig); signal(SIGUSR1, on_sig); signal(SIGINT, on_sig);

    double t0 = mono();
    int sock = sanlock_register();
    LOG("register sock=%d (%.1f ms)", sock, (mono() - t0) * 1e3);
    if (sock < 0) return 1;
    if (rflags) { rv = sanlock_restrict(sock, rflags); LOG("restrict 0x%x rv=%d", rflags, rv); }
    if (killpath) {
        char a[SANLK_HELPER_ARGS_LEN]; snprintf(a, sizeof a, "%s", kargs);
        rv = sanlock_killpath(sock, pidflag ? SANLK_KILLPATH_PID : 0, killpath, a);
        LOG("killpath %s '%s' pidflag=%d rv=%d", killpath, kargs, pidflag, rv);
    }
    t0 = mono();
    rv = sanlock_acquire(sock, -1, nowait ? SANLK_ACQUIRE_OWNER_NOWAIT : 0, 1, &res, NULL);
    LOG("acquire %s:%s rv=%d (%s) took %.1f ms", res->lockspace_name, res->name, rv,
        rv ? strerror(rv < 0 ? -rv : rv) : "ok", (mono() - t0) * 1e3);
    if (rv) return 3;
    char *state = NULL; int cnt = 0;
    rv = sanlock_inquire(sock, -1, 0, &cnt, &state);
    LOG("inquire rv=%d count=%d state=%s", rv, cnt, state ? state : "");
    free(state);

    double end = mono() + hold;
    while (hold < 0 || mono() < end) {
        usleep(100000);
        if (got_sig) {
            int s = got_sig; got_sig = 0;
            LOG("got signal %d (%s)", s, strsignal(s));
            if (s == SIGUSR1 && on_usr1 == 0) { LOG("SIGUSR1: would pause vCPUs; keep running"); continue; }
            if (s == SIGUSR1 && on_usr1 == 2) {
                LOG("SIGUSR1: pausing vCPUs, releasing lease");
                t0 = mono(); rv = sanlock_release(sock, -1, 0, 1, &res);
                LOG("release rv=%d took %.1f ms", rv, (mono() - t0) * 1e3); continue;
            }
            if (s == SIGTERM && on_usr1 == 3) { LOG("SIGTERM ignored (testing escalation)"); continue; }
            break;
        }
    }
    t0 = mono();
    rv = sanlock_release(sock, -1, 0, 1, &res);
    LOG("release rv=%d took %.1f ms", rv, (mono() - t0) * 1e3);
    return 0;
}
