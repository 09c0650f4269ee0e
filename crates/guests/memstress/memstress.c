/*
 * memstress: a page-stamping memory writer that catches any lost or stale page.
 *
 * Command line: wss=SIZE (working set, default 64M), seed=N (default 1), rate=N (pages
 * per second, 0 = as fast as it can), passes=N (power off after N passes; 0 = for ever),
 * every=1 (print every pass's line; by default, when the VMM gives the TSC frequency, at most
 * two a second, with a progress line each second within a long pass).
 *
 * On pass p it checks that every page of the working set still holds the stamp of pass
 * p-1 (zero for p = 1: fresh RAM is zero), then writes the stamp of pass p: a 64-bit value
 * from the seed, the page index and the pass, in the page's first 8 bytes and its bitwise
 * NOT in the last 8. A page a migration or restore lost or left stale shows as
 *   memstress: CORRUPTION page=<i> expected=0x<x> found=0x<y>
 * after which memstress stops working (halts) so the evidence stays in memory.
 */
#include "../rt/rt.h"

#define PAGE 4096ull
#define WORDS_PER_PAGE (PAGE / 8)
#define K_SEED 0x9e3779b97f4a7c15ull
#define K_PASS 0xc2b2ae3d27d4eb4full
#define K_PAGE 0x165667b19e3779f9ull
#define MIB (1ull << 20)

static const char *const known[] = {"wss", "seed", "rate", "passes", "every", 0};

/* The stamp base of pass p; page i's stamp is (base + i * K_PAGE) | 1. */
static u64 pass_base(u64 seed, u64 p) { return (seed * K_SEED) ^ (p * K_PASS); }

static u64 option(const char *cmdline, const char *key, u64 def)
{
    return cmdline_option(cmdline, key, def, "memstress");
}

/* Finds `len` bytes of RAM for the working set (rt's ram_place). */
static u64 place(const struct hvm_start_info *si, u64 len, u64 avoid_lo, u64 avoid_hi)
{
    return ram_place(si, len, MIB, avoid_lo, avoid_hi);
}

static __attribute__((noreturn)) void corruption(u64 page, u64 expected, u64 found)
{
    puts("memstress: CORRUPTION page=");
    put_dec(page);
    puts(" expected=");
    put_hex(expected, 16);
    puts(" found=");
    put_hex(found, 16);
    putc('\n');
    halt_forever();
}

static void pass_line(u64 p)
{
    puts("memstress: pass ");
    put_dec(p);
    putc('\n');
}

void guest_main(const struct hvm_start_info *si)
{
    const char *cmdline = start_cmdline(si, known, "memstress");
    u64 wss = option(cmdline, "wss", 64 * MIB);
    u64 seed = option(cmdline, "seed", 1);
    u64 rate = option(cmdline, "rate", 0);
    u64 passes = option(cmdline, "passes", 0);
    u64 every = option(cmdline, "every", 0);

    u64 rd_lo = 0, rd_hi = 0;
    if (si->nr_modules >= 1 && si->modlist_paddr) {
        const struct hvm_modlist_entry *m = (const void *)si->modlist_paddr;
        u64 sum = 0;
        rd_lo = m->paddr;
        rd_hi = m->paddr + m->size;
        for (u64 off = 0; off + 8 <= m->size; off += PAGE)
            sum += *(volatile const u64 *)(m->paddr + off);
        puts("memstress: initrd addr=");
        put_hex(m->paddr, 1);
        puts(" size=");
        put_dec(m->size);
        puts(" sum=");
        put_hex(sum, 16);
        putc('\n');
    }

    wss &= ~(PAGE - 1);
    if (wss < PAGE)
        wss = PAGE;
    u64 base = place(si, wss, rd_lo, rd_hi);
    if (!base) {
        puts("memstress: error: wss ");
        put_dec(wss);
        puts(" does not fit in guest RAM\n");
        poweroff_failed();
    }
    u64 npages = wss / PAGE;
    u64 khz = tsc_khz();
    u64 tsc_per_sec = khz * 1000;
    u64 tsc_per_page = (rate && khz) ? tsc_per_sec / rate : 0;
    if (rate && !khz)
        puts("memstress: no TSC frequency from the VMM; ignoring rate\n");

    puts("memstress: wss=");
    put_dec(wss);
    puts(" pages=");
    put_dec(npages);
    puts(" base=");
    put_hex(base, 1);
    puts(" seed=");
    put_dec(seed);
    puts(" rate=");
    put_dec(rate);
    putc('\n');
    puts("memstress: ready\n");

    u64 last_print = rdtsc();
    u64 next_page_at = last_print;
    for (u64 p = 1;; p++) {
        u64 mask = p == 1 ? 0 : ~0ull;
        u64 prev = pass_base(seed, p - 1);
        u64 cur = pass_base(seed, p);
        volatile u64 *pg = (volatile u64 *)base;
        for (u64 i = 0; i < npages; i++, pg += WORDS_PER_PAGE) {
            u64 want = (prev | 1) & mask;
            u64 w0 = pg[0];
            u64 w1 = pg[WORDS_PER_PAGE - 1];
            if (w0 != want)
                corruption(i, want, w0);
            if (w1 != (~(prev | 1) & mask))
                corruption(i, ~(prev | 1) & mask, w1);
            pg[0] = cur | 1;
            pg[WORDS_PER_PAGE - 1] = ~(cur | 1);
            prev += K_PAGE;
            cur += K_PAGE;
            if (tsc_per_page) {
                next_page_at += tsc_per_page;
                u64 now;
                while ((i64)((now = rdtsc()) - next_page_at) < 0)
                    cpu_relax();
                /* After a pause (checkpoint, migration) do not race to catch up. */
                if (now - next_page_at > tsc_per_sec)
                    next_page_at = now;
            }
            if (khz && (i & 255) == 255) {
                u64 now = rdtsc();
                if (now - last_print >= tsc_per_sec) {
                    puts("memstress: pass ");
                    put_dec(p);
                    puts(": page ");
                    put_dec(i + 1);
                    puts(" of ");
                    put_dec(npages);
                    putc('\n');
                    last_print = now;
                }
            }
        }
        u64 now = rdtsc();
        int last = passes && p >= passes;
        if (every || !khz || p == 1 || last || now - last_print >= tsc_per_sec / 2) {
            pass_line(p);
            last_print = now;
        }
        if (last) {
            puts("memstress: done\n");
            poweroff();
        }
    }
}
