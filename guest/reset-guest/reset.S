/*
 * The smallest guest: its first instruction asks the i8042 for a CPU reset, so a run
 * of it costs the guest nothing and measures the VMM's own start-up and exit
 * (integration/examples/bench_vmm_start.rs). Entered in 64-bit mode by the Linux boot
 * protocol at 2 MiB, as microagent-vmm and Firecracker load an ELF kernel.
 */
    .globl _start
    .text
_start:
    mov $0xfe, %al
    out %al, $0x64
1:  cli
    hlt
    jmp 1b
