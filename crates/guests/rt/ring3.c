/* Ring 3 for Ferry's test guests (rt/ring3.h). */
#include "ring3.h"

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_TSS 0x28
#define PTE_USER 0x4ull
#define PTE_LARGE 0x80ull
#define ADDR_MASK 0x000ffffffffff000ull

/* The frame ring3.S builds on the ring-0 stack. */
struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct idt_gate {
    u64 lo, hi;
};

extern const u64 ring3_stubs[256];
void ring3_iret(u64 rip, u64 arg, u64 rsp);

static u64 gdt[7] __attribute__((aligned(16))) = {
    0,
    0x00af9a000000ffffull, /* 0x08: kernel code, 64-bit */
    0x00cf92000000ffffull, /* 0x10: kernel data */
    0x00cff2000000ffffull, /* 0x18: user data (DPL 3) */
    0x00affa000000ffffull, /* 0x20: user code, 64-bit (DPL 3) */
    0, 0,                  /* 0x28: the TSS (16 bytes), filled in at setup */
};
static struct tss tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));
static u8 trap_stack[16384] __attribute__((aligned(16)));
static u8 user_stack[65536] __attribute__((aligned(16)));

struct __attribute__((packed)) table_ptr {
    u16 limit;
    u64 base;
};

static void set_gate(int vec, u64 handler, int dpl)
{
    /* Present, 64-bit interrupt gate (interrupts stay off in the handler). */
    u64 attr = 0x8e | ((u64)dpl << 5);
    idt[vec].lo = (handler & 0xffff) | ((u64)SEL_KCODE << 16) | (attr << 40) |
                  (((handler >> 16) & 0xffff) << 48);
    idt[vec].hi = handler >> 32;
}

/* Sets the user bit on every paging-structure entry that maps [lo, hi) (identity-mapped
 * 2 MiB pages below 4 GiB, as rt/entry.S builds them). */
static void map_user(u64 lo, u64 hi)
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ADDR_MASK);
    for (u64 a = lo & ~((1ull << 21) - 1); a < hi; a += 1ull << 21) {
        u64 *pml4e = &pml4[(a >> 39) & 511];
        *pml4e |= PTE_USER;
        u64 *pdpt = (u64 *)(*pml4e & ADDR_MASK);
        u64 *pdpte = &pdpt[(a >> 30) & 511];
        *pdpte |= PTE_USER;
        u64 *pd = (u64 *)(*pdpte & ADDR_MASK);
        u64 *pde = &pd[(a >> 21) & 511];
        if (*pde & PTE_LARGE)
            *pde |= PTE_USER;
    }
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

void ring3_setup(u64 user_lo, u64 user_hi)
{
    u64 base = (u64)&tss;
    u64 limit = sizeof(tss) - 1;
    tss.rsp[0] = (u64)(trap_stack + sizeof(trap_stack));
    tss.iomap_base = sizeof(tss); /* no I/O bitmap: ring 3 may not touch ports */
    gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
             (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[6] = base >> 32;
    for (int v = 0; v < 256; v++)
        set_gate(v, ring3_stubs[v], v == 0x80 ? 3 : 0);

    struct table_ptr g = {sizeof(gdt) - 1, (u64)gdt};
    struct table_ptr i = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lgdt %0\n\t"
                     "pushq %1\n\t"
                     "leaq 1f(%%rip), %%rax\n\t"
                     "pushq %%rax\n\t"
                     "lretq\n"
                     "1:\n\t"
                     "movl %2, %%eax\n\t"
                     "movw %%ax, %%ds\n\t"
                     "movw %%ax, %%es\n\t"
                     "movw %%ax, %%ss\n\t"
                     "movw %%ax, %%fs\n\t"
                     "movw %%ax, %%gs\n\t"
                     "lidt %3\n\t"
                     "movw %4, %%ax\n\t"
                     "ltr %%ax"
                     :
                     : "m"(g), "i"(SEL_KCODE), "i"(SEL_KDATA), "m"(i), "i"(SEL_TSS)
                     : "rax", "memory");
    map_user((u64)__image_start, (u64)__image_end);
    map_user(user_lo, user_hi);
}

static void returned(void *arg)
{
    (void)arg;
    ring3_poweroff(0);
}

void ring3_enter(void (*fn)(void *), void *arg)
{
    /* At fn's first instruction RSP + 8 is 16-byte aligned, as after a call; its return
     * address powers off. */
    u64 *sp = (u64 *)(user_stack + sizeof(user_stack));
    *--sp = (u64)returned;
    ring3_iret((u64)fn, (u64)arg, (u64)sp);
    halt_forever();
}

static void frame_dump(const struct trap_frame *f)
{
    puts(" rip=");
    put_hex(f->rip, 1);
    puts(" cs=");
    put_hex(f->cs, 1);
    puts(" rsp=");
    put_hex(f->rsp, 1);
    puts(" error=");
    put_hex(f->error, 1);
    if (f->vector == 14) {
        u64 cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        puts(" cr2=");
        put_hex(cr2, 1);
    }
    putc('\n');
}

static int user_mode(const struct trap_frame *f) { return (f->cs & 3) == 3; }

static void call(struct trap_frame *f)
{
    switch (f->rax) {
    case RING3_WRITE: {
        const char *s = (const char *)f->rdi;
        u64 n = f->rsi > 4096 ? 4096 : f->rsi;
        for (u64 k = 0; k < n; k++)
            putc(s[k]);
        f->rax = 0;
        return;
    }
    case RING3_POWEROFF:
        if (f->rdi)
            poweroff_failed();
        poweroff();
    default:
        f->rax = ~0ull;
        return;
    }
}

/* Called by ring3.S for every vector it handles. */
void ring3_trap(struct trap_frame *f)
{
    static int ud_noted;
    if (f->vector == 0x80 && user_mode(f)) {
        call(f);
        return;
    }
    /* On this project's hosts (KVM's PVM backend: ring 3 runs natively, ring 0 is
     * emulated) an `int $0x80` in ring 3 may reach the guest as a #UD on that instruction
     * (the host's emulator does not emulate INT in long mode). It is still the guest's
     * call: do it and step over the instruction. */
    if (f->vector == 6 && user_mode(f)) {
        const u8 *ip = (const u8 *)f->rip;
        if (ip[0] == 0xcd && ip[1] == 0x80) {
            if (!ud_noted) {
                ud_noted = 1;
                puts("ring3: int $0x80 arrives as #UD here; handled as the call\n");
            }
            f->rip += 2;
            call(f);
            return;
        }
    }
    /* No device of these guests raises interrupts; one that arrives anyway (a timer a VMM
     * left running) is not a failure of the guest: say so once and go on. */
    if (f->vector >= 32) {
        static int irq_noted;
        if (!irq_noted) {
            irq_noted = 1;
            puts("ring3: ignoring unexpected interrupt vector ");
            put_dec(f->vector);
            putc('\n');
        }
        return;
    }
    puts("ring3: error: exception ");
    put_dec(f->vector);
    puts(user_mode(f) ? " in ring 3" : " in ring 0");
    frame_dump(f);
    poweroff_failed();
}

/* ---- ring 3 ---- */

void line_str(struct line *l, const char *s)
{
    while (*s && l->len < sizeof(l->buf) - 1)
        l->buf[l->len++] = *s++;
}

void line_dec(struct line *l, u64 v)
{
    char tmp[21];
    int i = 20;
    tmp[i] = 0;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    line_str(l, &tmp[i]);
}

void line_hex(struct line *l, u64 v)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[19];
    tmp[0] = '0';
    tmp[1] = 'x';
    for (int i = 0; i < 16; i++)
        tmp[2 + i] = digits[(v >> (60 - 4 * i)) & 0xf];
    tmp[18] = 0;
    line_str(l, tmp);
}

void line_put(struct line *l)
{
    l->buf[l->len++] = '\n';
    ring3_call(RING3_WRITE, (u64)l->buf, l->len);
    l->len = 0;
}

void ring3_poweroff(int failed)
{
    for (;;)
        ring3_call(RING3_POWEROFF, failed ? 1 : 0, 0);
}
