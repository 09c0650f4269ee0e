/*
 * Ring 3 support (rt/ring3.h): the interrupt entry stubs and the drop to ring 3.
 *
 * Every stub leaves the same frame for ring3_trap() (struct trap_frame in ring3.c): the
 * general registers, the vector, the error code (0 when the CPU pushes none) and the CPU's
 * own frame (RIP, CS, RFLAGS, RSP, SS). The stack is 16-byte aligned at the call.
 */
        .text

        /* One stub per vector, each in its own 16 bytes (at most 12 are used); the CPU
         * pushes an error code for exceptions 8, 10-14, 17, 21, 29 and 30, the others
         * push a 0 in its place. */
        .balign 16
trap_stubs:
        .set    vec, 0
        .rept   256
        .balign 16
        .if     (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq   $0
        .endif
        pushq   $vec
        jmp     trap_common
        .set    vec, vec + 1
        .endr

trap_common:
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %rbp
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        movq    %rsp, %rdi
        cld
        call    ring3_trap
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rbp
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rbx
        popq    %rax
        addq    $16, %rsp               /* vector and error code */
        iretq

/* void ring3_iret(u64 rip, u64 arg, u64 rsp): enters ring 3 at RIP with RDI = arg. */
        .globl  ring3_iret
ring3_iret:
        movq    %rdi, %rax
        movq    %rsi, %rdi
        movl    $0x1b, %ecx             /* user data, RPL 3 */
        movw    %cx, %ds
        movw    %cx, %es
        pushq   $0x1b                   /* SS */
        pushq   %rdx                    /* RSP */
        pushq   $0x202                  /* RFLAGS: IF on */
        pushq   $0x23                   /* CS: 64-bit user code, RPL 3 */
        pushq   %rax                    /* RIP */
        xorl    %eax, %eax
        xorl    %ecx, %ecx
        xorl    %edx, %edx
        xorl    %esi, %esi
        iretq

        /* The stubs' addresses by vector. */
        .section .rodata
        .balign 8
        .globl  ring3_stubs
ring3_stubs:
        .set    vec, 0
        .rept   256
        .quad   trap_stubs + vec * 16
        .set    vec, vec + 1
        .endr
