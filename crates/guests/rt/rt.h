/* Runtime for Ferry's test guests: PVH start info, serial console, time, command line. */
#ifndef FERRY_GUEST_RT_H
#define FERRY_GUEST_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

/* The PVH boot ABI's structures (Xen's arch-x86/hvm/start_info.h). */
struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_modlist_entry {
    u64 paddr;
    u64 size;
    u64 cmdline_paddr;
    u64 reserved;
};

struct hvm_memmap_table_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

#define HVM_START_MAGIC 0x336ec578u
#define HVM_MEMMAP_RAM 1

/* Guest image bounds from the linker script. */
extern char __image_start[], __image_end[];

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause"); }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Serial console (COM1). */
void putc(char c);
void puts(const char *s);           /* no newline added */
void put_dec(u64 v);
void put_hex(u64 v, int digits);    /* "0x" + at least `digits` digits */

/* Stops: power off through the i8042 reset line, or halt for ever. */
__attribute__((noreturn)) void poweroff(void);
/* Powers off after writing a failure status to port 0xf4: the VMM exits non-zero. */
__attribute__((noreturn)) void poweroff_failed(void);
__attribute__((noreturn)) void halt_forever(void);

/* TSC frequency in kHz from CPUID 0x40000010, or 0 if the VMM does not publish it. */
u64 tsc_khz(void);

/* Command line: the value of `key=` as a string (pointer into the line, ends at a space or
 * NUL), or 0. */
const char *cmdline_get(const char *cmdline, const char *key);
/* Parses a decimal number with an optional K/M/G suffix; returns 0 on success. */
int parse_size(const char *s, u64 *out);
/* The size option `key` of `cmdline` (parse_size), or `def` if absent; a bad value prints
 * "<guest>: error: bad value for KEY, using DEF" and gives `def`. */
u64 cmdline_option(const char *cmdline, const char *key, u64 def, const char *guest);

/* Finds `len` bytes of RAM below 4 GiB (what the entry stub identity-maps), starting at or
   above the image rounded up to `align`, outside [avoid_lo, avoid_hi); 0 if there is none. */
u64 ram_place(const struct hvm_start_info *si, u64 len, u64 align, u64 avoid_lo, u64 avoid_hi);
/* Calls `unknown` for each key not in the NULL-terminated `known` list. */
void cmdline_check(const char *cmdline, const char *const *known, const char *guest);
/* A guest's start: checks the PVH start info (powers off with "<guest>: error: no PVH start
 * info" if it is not one) and returns its command line (0 if none), checked against `known`. */
const char *start_cmdline(const struct hvm_start_info *si, const char *const *known, const char *guest);

void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);

#endif
