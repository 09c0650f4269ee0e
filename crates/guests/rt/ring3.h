/*
 * Ring 3 for Ferry's test guests: on this project's hosts guest code at CPL 3 runs natively
 * while CPL 0 is emulated (docs/design.md), so a guest that wants speed runs its workload in
 * user mode and calls back into ring 0 only for what needs it (the serial console, power-off).
 *
 * ring3_setup() loads a GDT with ring-3 code and data segments and a TSS, an IDT whose
 * exception vectors print what happened and power off as a failure (interrupt vectors are
 * noted once and ignored), and a DPL-3 gate at vector 0x80 (the only way back: `syscall`
 * does not reach ring 0 on these hosts; there `int $0x80` itself arrives as a #UD on the
 * instruction, which the runtime takes as the same call). It marks the guest image and
 * [user_lo, user_hi) user-accessible in the entry stub's page tables (the image as a whole,
 * descriptor tables and page tables included: a test guest trusts its own ring-3 code).
 * ring3_enter() then drops to ring 3 (iretq, interrupts on) for good.
 *
 * Everything below the "ring 3" line may be called from ring 3: it only touches its
 * arguments and the stack, and reaches ring 0 through `int $0x80`.
 */
#ifndef FERRY_GUEST_RING3_H
#define FERRY_GUEST_RING3_H

#include "rt.h"

/* Ring 0: call once, before ring3_enter. */
void ring3_setup(u64 user_lo, u64 user_hi);
/* Ring 0: runs fn(arg) in ring 3 on its own stack; never returns. If fn returns, the guest
 * powers off cleanly. */
__attribute__((noreturn)) void ring3_enter(void (*fn)(void *), void *arg);

/* ---- ring 3 ---- */

/* The calls through `int $0x80`: RAX the call, RDI and RSI its arguments. */
#define RING3_WRITE 1    /* RDI: bytes, RSI: length (at most 4096): written to the console */
#define RING3_POWEROFF 2 /* RDI: 0 = clean power-off, else power off as a failure */

static inline u64 ring3_call(u64 nr, u64 a, u64 b)
{
    u64 ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "D"(a), "S"(b) : "memory");
    return ret;
}

/* A console line assembled in ring 3 and written with one call. */
struct line {
    char buf[200];
    u32 len;
};

void line_str(struct line *l, const char *s);
void line_dec(struct line *l, u64 v);
void line_hex(struct line *l, u64 v); /* "0x" and 16 digits */
/* Writes the line with a newline and empties it. */
void line_put(struct line *l);
__attribute__((noreturn)) void ring3_poweroff(int failed);

#endif
