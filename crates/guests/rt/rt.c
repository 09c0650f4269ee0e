/* Runtime for Ferry's test guests. */
#include "rt.h"

#define COM1 0x3f8
#define LSR_THR_EMPTY 0x20

void putc(char c)
{
    while (!(inb(COM1 + 5) & LSR_THR_EMPTY))
        cpu_relax();
    outb(COM1, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

void put_hex(u64 v, int digits)
{
    static const char hex[] = "0123456789abcdef";
    char buf[19];
    int n = 0;
    u64 t = v;
    do {
        n++;
        t >>= 4;
    } while (t);
    if (n < digits)
        n = digits;
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < n; i++)
        buf[2 + n - 1 - i] = hex[(v >> (4 * i)) & 0xf];
    buf[2 + n] = 0;
    puts(buf);
}

void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void poweroff(void)
{
    outb(0x64, 0xfe);
    halt_forever();
}

void poweroff_failed(void)
{
    /* The VMM's exit status port (0xf4): the run ends as a failure, not a clean power-off. */
    outb(0xf4, 1);
    poweroff();
}

u64 tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a < 0x40000010)
        return 0;
    cpuid(0x40000010, 0, &a, &b, &c, &d);
    return a;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

const char *cmdline_get(const char *cmdline, const char *key)
{
    if (!cmdline)
        return 0;
    const char *p = cmdline;
    while (*p) {
        while (is_space(*p))
            p++;
        const char *k = key;
        const char *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (!*k && *q == '=')
            return q + 1;
        while (*p && !is_space(*p))
            p++;
    }
    return 0;
}

int parse_size(const char *s, u64 *out)
{
    u64 v = 0;
    int digits = 0;
    while (*s >= '0' && *s <= '9') {
        v = v * 10 + (u64)(*s - '0');
        s++;
        digits++;
    }
    if (!digits)
        return -1;
    switch (*s) {
    case 'k': case 'K': v <<= 10; s++; break;
    case 'm': case 'M': v <<= 20; s++; break;
    case 'g': case 'G': v <<= 30; s++; break;
    default: break;
    }
    if (*s && !is_space(*s))
        return -1;
    *out = v;
    return 0;
}

void cmdline_check(const char *cmdline, const char *const *known, const char *guest)
{
    if (!cmdline)
        return;
    const char *p = cmdline;
    while (*p) {
        while (is_space(*p))
            p++;
        if (!*p)
            break;
        const char *start = p;
        while (*p && *p != '=' && !is_space(*p))
            p++;
        int len = (int)(p - start);
        int found = 0;
        for (int i = 0; known[i]; i++) {
            int j = 0;
            while (j < len && known[i][j] == start[j])
                j++;
            if (j == len && known[i][j] == 0) {
                found = 1;
                break;
            }
        }
        if (!found) {
            puts(guest);
            puts(": ignoring unknown option ");
            for (int j = 0; j < len; j++)
                putc(start[j]);
            putc('\n');
        }
        while (*p && !is_space(*p))
            p++;
    }
}

void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

u64 cmdline_option(const char *cmdline, const char *key, u64 def, const char *guest)
{
    const char *v = cmdline_get(cmdline, key);
    u64 out;
    if (!v)
        return def;
    if (parse_size(v, &out)) {
        puts(guest);
        puts(": error: bad value for ");
        puts(key);
        puts(", using ");
        put_dec(def);
        putc('\n');
        return def;
    }
    return out;
}

const char *start_cmdline(const struct hvm_start_info *si, const char *const *known, const char *guest)
{
    const char *cmdline = 0;
    if (si->magic != HVM_START_MAGIC) {
        puts(guest);
        puts(": error: no PVH start info\n");
        poweroff_failed();
    }
    if (si->cmdline_paddr)
        cmdline = (const char *)si->cmdline_paddr;
    cmdline_check(cmdline, known, guest);
    return cmdline;
}

u64 ram_place(const struct hvm_start_info *si, u64 len, u64 align, u64 avoid_lo, u64 avoid_hi)
{
    const u64 page = 4096, low_limit = 4ull << 30;
    const struct hvm_memmap_table_entry *map = (const void *)si->memmap_paddr;
    u64 floor = ((u64)__image_end + align - 1) & ~(align - 1);
    if (si->version < 1 || !si->memmap_paddr)
        return 0;
    for (u32 i = 0; i < si->memmap_entries; i++) {
        if (map[i].type != HVM_MEMMAP_RAM)
            continue;
        u64 lo = map[i].addr, hi = map[i].addr + map[i].size;
        if (hi > low_limit)
            hi = low_limit;
        if (lo < floor)
            lo = floor;
        lo = (lo + page - 1) & ~(page - 1);
        /* Try below the avoided range, then above it. */
        u64 cand[2] = {lo, avoid_hi > lo ? (avoid_hi + page - 1) & ~(page - 1) : lo};
        for (int c = 0; c < 2; c++) {
            u64 a = cand[c];
            if (a + len > hi || a + len < a)
                continue;
            if (avoid_hi > avoid_lo && a < avoid_hi && avoid_lo < a + len)
                continue;
            return a;
        }
    }
    return 0;
}
