//! The entry point and the Xen ELF notes.
//!
//! Xen starts a PV x86_64 guest at `ENTRY` in 64-bit mode with paging on, every page of the
//! initial image mapped at `VIRT_BASE + pfn * 4096`, `%rsi` = the virtual address of
//! `start_info`, and a small bootstrap stack. `_start` switches to our own stack (in .bss)
//! and calls [`crate::kernel_main`] with `start_info`'s address.
//!
//! The notes (`public/elfnote.h`) tell the domain builder how to load us: the generic loader,
//! virtual base 0 and paddr offset 0 (linked at 0, see `link.ld`), the entry point, and the
//! page Xen fills with hypercall stubs (32 bytes per hypercall number).

/// Size of the kernel stack (in .bss).
pub const STACK_SIZE: usize = 64 * 1024;

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .globl _start
_start:
    cld
    lea {stack}+{stack_size}(%rip), %rsp
    xor %ebp, %ebp
    mov %rsi, %rdi
    call {main}
0:  ud2
    jmp 0b

    .section .text.hypercall_page, "ax"
    .balign 4096
    .globl hypercall_page
hypercall_page:
    .skip 4096

    .section .note.Xen, "a", @note

    .balign 4
    .long 4, 12f - 11f, 6          /* XEN_ELFNOTE_GUEST_OS */
    .asciz "Xen"
11: .asciz "Mayfly"
12: .balign 4

    .long 4, 22f - 21f, 7          /* XEN_ELFNOTE_GUEST_VERSION */
    .asciz "Xen"
21: .asciz "0.1"
22: .balign 4

    .long 4, 32f - 31f, 5          /* XEN_ELFNOTE_XEN_VERSION */
    .asciz "Xen"
31: .asciz "xen-3.0"
32: .balign 4

    .long 4, 42f - 41f, 8          /* XEN_ELFNOTE_LOADER */
    .asciz "Xen"
41: .asciz "generic"
42: .balign 4

    .long 4, 8, 3                  /* XEN_ELFNOTE_VIRT_BASE */
    .asciz "Xen"
    .quad 0

    .long 4, 8, 4                  /* XEN_ELFNOTE_PADDR_OFFSET */
    .asciz "Xen"
    .quad 0

    .long 4, 8, 1                  /* XEN_ELFNOTE_ENTRY */
    .asciz "Xen"
    .quad _start

    .long 4, 8, 2                  /* XEN_ELFNOTE_HYPERCALL_PAGE */
    .asciz "Xen"
    .quad hypercall_page

    .text
"#,
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym crate::kernel_main,
    options(att_syntax)
);

/// The kernel stack. Only `_start` names it (it loads `%rsp` with its end); Rust code never
/// reads or writes it as a value.
#[repr(C, align(4096))]
pub struct Stack([u8; STACK_SIZE]);

#[no_mangle]
static mut STACK: Stack = Stack([0; STACK_SIZE]);
