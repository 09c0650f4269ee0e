/*
 * PVH entry for Ferry's test guests.
 *
 * The VMM enters _start32 in 32-bit protected mode, paging off, flat segments, with EBX
 * holding the physical address of struct hvm_start_info. We switch to 64-bit long mode
 * with identity-mapped 2 MiB pages over the first 4 GiB (static tables: no loop to run,
 * since this machine's KVM emulates every guest instruction) and call
 * guest_main(start_info).
 */

/* The PVH note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), the 32-bit entry point. */
        .section .note.Xen, "a"
        .balign 4
        .long   4
        .long   4
        .long   18
        .asciz  "Xen"
        .long   _start32

        .section .text.entry, "ax"
        .code32
        .globl  _start32
_start32:
        /* First instruction: the POST port write Ferry's boot timer records. */
        outb    %al, $0x80
        movl    %ebx, %edi

        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax             /* CR4.PAE */
        movl    %eax, %cr4
        movl    $0xc0000080, %ecx       /* EFER */
        rdmsr
        orl     $0x100, %eax            /* EFER.LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax       /* CR0.PG | CR0.PE */
        movl    %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $0x08, $start64

        .code64
start64:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        movq    $stack_top, %rsp
        /* RDI: start_info (zero-extended by the 32-bit move above). */
        call    guest_main
1:      cli
        hlt
        jmp     1b

        .section .rodata
        .balign 16
gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf92000000ffff      /* 0x10: data */
gdt_ptr:
        .word   gdt_ptr - gdt - 1
        .long   gdt

        .section .data.pagetables, "aw"
        .balign 4096
pml4:
        .quad   pdpt + 0x3
        .fill   511, 8, 0
pdpt:
        .quad   pd + 0x3
        .quad   pd + 0x1000 + 0x3
        .quad   pd + 0x2000 + 0x3
        .quad   pd + 0x3000 + 0x3
        .fill   508, 8, 0
pd:
        .set    page, 0
        .rept   2048
        .quad   (page << 21) | 0x83     /* present, writable, 2 MiB */
        .set    page, page + 1
        .endr

        .section .bss
        .balign 16
stack:
        .skip   16384
stack_top:
