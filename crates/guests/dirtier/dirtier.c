/*
 * dirtier: rewrites every page of its working set at native speed from ring 3 and catches
 * any lost or stale page.
 *
 * Command line: wss=SIZE (working set, default 128M), rate=N (pages per second, 0 = as fast
 * as it can), seconds=N (power off after about N seconds, 0 = never), report_ms=N (the
 * progress line's interval, default 1000), words=N (8-byte words written per page, spread
 * evenly over it, default 1, at most 512: more of each page changes per visit, which delta
 * encoding of re-sent pages cannot shrink as well).
 *
 * Ring 0 (emulated on this project's hosts, about 2 million instructions/s) only places the
 * working set, sets up ring 3 (rt/ring3.h) and prints; the loop runs in ring 3, natively.
 * Round r writes one 8-byte stamp, encoding (page index, r), at the start of every page (and
 * with words=N, N-1 more words derived from it), and first checks that the page still holds
 * its stamp of round r-1 (zero in round 1: fresh RAM is zero). A page that does not hold what
 * this guest last wrote there is reported as
 *   dirtier: CORRUPTION page=<i> word=<w> round=<r> expected=0x<x> found=0x<y> (<what>)
 * and the guest powers off as a failure (the VMM exits 1).
 *
 * Every report_ms (by the TSC) it prints
 *   dirtier: rate=<pages/s> pages/s rounds=<n> max_gap_us=<us> ok
 * rate: pages stamped per second over the last report interval; rounds: rounds completed
 * since boot; max_gap_us: the longest time in that interval between two consecutive TSC
 * readings of the loop (taken every 16 pages, a few microseconds apart when it runs): a
 * pause of the vCPU, such as a migration's stop-and-copy, shows there as the blackout the
 * guest felt. The time spent printing the previous report is not counted as a gap.
 */
#include "../rt/rt.h"
#include "../rt/ring3.h"

#define PAGE 4096ull
#define MIB (1ull << 20)
#define CHUNK 16               /* pages between two TSC readings */
/* stamp(i, r) = ((r << 32) | i) * K_MUL ^ K_XOR: distinct for every (i, r), never zero in
 * practice, and invertible, so a wrong value can be decoded in the report. */
#define K_MUL 0x9e3779b97f4a7c15ull
#define K_XOR 0x5bd1e9955bd1e995ull
#define K_WORD 0xc2b2ae3d27d4eb4full /* word w of a page holds its stamp ^ (w * K_WORD) */

static const char *const known[] = {"wss", "rate", "seconds", "report_ms", "words", 0};

struct params {
    u64 base;
    u64 npages;
    u64 tsc_per_sec;
    u64 rate;
    u64 seconds;
    u64 report_ms;
    u64 words;
};

static struct params params;

/* Finds `len` bytes of RAM for the working set (rt's ram_place). */
static u64 place(const struct hvm_start_info *si, u64 len, u64 avoid_lo, u64 avoid_hi)
{
    return ram_place(si, len, 2 * MIB, avoid_lo, avoid_hi);
}

/* ---- ring 3 ---- */

static inline u64 stamp(u64 page, u64 round) { return (((round << 32) | page) * K_MUL) ^ K_XOR; }

static u64 inverse(u64 k)
{
    u64 x = k; /* Newton's iteration for the inverse of an odd number modulo 2^64 */
    for (int n = 0; n < 6; n++)
        x *= 2 - k * x;
    return x;
}

static __attribute__((noreturn)) void corruption(u64 page, u64 word, u64 round, u64 expected, u64 found)
{
    struct line l = {.len = 0};
    u64 decoded = (found ^ (word * K_WORD) ^ K_XOR) * inverse(K_MUL);
    u64 page_of = decoded & 0xffffffffull, round_of = decoded >> 32;
    line_str(&l, "dirtier: CORRUPTION page=");
    line_dec(&l, page);
    line_str(&l, " word=");
    line_dec(&l, word);
    line_str(&l, " round=");
    line_dec(&l, round);
    line_str(&l, " expected=");
    line_hex(&l, expected);
    line_str(&l, " found=");
    line_hex(&l, found);
    if (found == 0) {
        line_str(&l, " (zero: the page was lost)");
    } else if (page_of == page && round_of < round) {
        line_str(&l, " (stale: this page's stamp of round ");
        line_dec(&l, round_of);
        line_str(&l, ")");
    } else if (page_of < params.npages && round_of <= round) {
        line_str(&l, " (page ");
        line_dec(&l, page_of);
        line_str(&l, "'s stamp of round ");
        line_dec(&l, round_of);
        line_str(&l, ")");
    } else {
        line_str(&l, " (not a stamp)");
    }
    line_put(&l);
    ring3_poweroff(1);
}

static void report(u64 pages, u64 ticks, u64 rounds, u64 max_gap, u64 tsc_per_sec)
{
    struct line l = {.len = 0};
    line_str(&l, "dirtier: rate=");
    line_dec(&l, ticks ? pages * tsc_per_sec / ticks : 0);
    line_str(&l, " pages/s rounds=");
    line_dec(&l, rounds);
    line_str(&l, " max_gap_us=");
    line_dec(&l, max_gap * 1000000 / tsc_per_sec);
    line_str(&l, " ok");
    line_put(&l);
}

static void run(void *arg)
{
    const struct params *p = arg;
    const u64 npages = p->npages, tps = p->tsc_per_sec, words = p->words;
    const u64 stride = PAGE / 8 / words;
    const u64 tsc_per_chunk = p->rate ? tps * CHUNK / p->rate : 0;
    const u64 tsc_per_report = tps / 1000 * p->report_ms;
    u64 last, interval_start, interval_pages = 0, max_gap = 0, next_at, started;
    {
        struct line l = {.len = 0};
        line_str(&l, "dirtier: running in ring 3");
        line_put(&l);
    }
    started = last = interval_start = next_at = rdtsc();
    for (u64 r = 1;; r++) {
        volatile u64 *pg = (volatile u64 *)p->base;
        for (u64 i = 0; i < npages; i += CHUNK) {
            u64 end = i + CHUNK < npages ? i + CHUNK : npages;
            for (u64 j = i; j < end; j++, pg += PAGE / 8) {
                u64 want = r == 1 ? 0 : stamp(j, r - 1);
                u64 next = stamp(j, r);
                for (u64 w = 0; w < words; w++) {
                    u64 expected = r == 1 ? 0 : want ^ (w * K_WORD);
                    u64 found = pg[w * stride];
                    if (found != expected)
                        corruption(j, w, r, expected, found);
                    pg[w * stride] = next ^ (w * K_WORD);
                }
            }
            interval_pages += end - i;
            u64 now = rdtsc();
            if (now - last > max_gap)
                max_gap = now - last;
            last = now;
            if (tsc_per_chunk) {
                next_at += tsc_per_chunk;
                while ((i64)(now - next_at) < 0) {
                    cpu_relax();
                    now = rdtsc();
                    if (now - last > max_gap)
                        max_gap = now - last;
                    last = now;
                }
                /* After a long pause do not race to catch up. */
                if (now - next_at > tps)
                    next_at = now;
            }
            if (now - interval_start >= tsc_per_report) {
                /* Rounds completed: the one in progress is not. */
                report(interval_pages, now - interval_start, r - 1, max_gap, tps);
                if (p->seconds && now - started >= p->seconds * tps) {
                    struct line l = {.len = 0};
                    line_str(&l, "dirtier: done");
                    line_put(&l);
                    ring3_poweroff(0);
                }
                interval_pages = 0;
                max_gap = 0;
                last = interval_start = rdtsc();
            }
        }
    }
}

/* ---- ring 0 ---- */

void guest_main(const struct hvm_start_info *si)
{
    const char *cmdline = start_cmdline(si, known, "dirtier");
    u64 wss = cmdline_option(cmdline, "wss", 128 * MIB, "dirtier");
    u64 rate = cmdline_option(cmdline, "rate", 0, "dirtier");
    u64 seconds = cmdline_option(cmdline, "seconds", 0, "dirtier");
    u64 report_ms = cmdline_option(cmdline, "report_ms", 1000, "dirtier");
    u64 words = cmdline_option(cmdline, "words", 1, "dirtier");
    if (words < 1 || words > PAGE / 8) {
        puts("dirtier: error: words must be 1 to 512, using 1\n");
        words = 1;
    }

    u64 rd_lo = 0, rd_hi = 0;
    if (si->nr_modules >= 1 && si->modlist_paddr) {
        const struct hvm_modlist_entry *m = (const void *)si->modlist_paddr;
        rd_lo = m->paddr;
        rd_hi = m->paddr + m->size;
    }
    wss &= ~(PAGE - 1);
    if (wss < PAGE)
        wss = PAGE;
    u64 base = place(si, wss, rd_lo, rd_hi);
    if (!base) {
        puts("dirtier: error: wss ");
        put_dec(wss);
        puts(" does not fit in guest RAM below 4 GiB\n");
        poweroff_failed();
    }
    u64 khz = tsc_khz();
    if (!khz) {
        puts("dirtier: error: no TSC frequency from the VMM (CPUID 0x40000010)\n");
        poweroff_failed();
    }
    params.base = base;
    params.npages = wss / PAGE;
    params.tsc_per_sec = khz * 1000;
    params.rate = rate;
    params.seconds = seconds;
    params.report_ms = report_ms ? report_ms : 1000;
    params.words = words;

    puts("dirtier: wss=");
    put_dec(wss);
    puts(" pages=");
    put_dec(params.npages);
    puts(" base=");
    put_hex(base, 1);
    puts(" rate=");
    put_dec(rate);
    puts(" words=");
    put_dec(words);
    puts(" tsc_khz=");
    put_dec(khz);
    putc('\n');
    ring3_setup(base, base + wss);
    puts("dirtier: ready\n");
    ring3_enter(run, &params);
}
